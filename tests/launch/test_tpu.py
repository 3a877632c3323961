"""TPU VM launch: the slice table, the gcloud commands, and the generated driver script
run against a fake `gcloud` that simulates preemptions."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from parti_jax.launch import install, tpu
from parti_jax.launch.common import LaunchError, LaunchSpec
from tests.launch.fake_gcloud import calls, fake_gcloud_env

CMD = ("parti-jax", "train", "--gin_file=runs/x.gin", "--workdir=gs://bucket/run 1")


def _spec(accelerator: str, **kw) -> LaunchSpec:
    return tpu.spec_for_slice(LaunchSpec(command=CMD, name="job", **kw), accelerator)


@pytest.mark.parametrize(
    "accelerator,chips,hosts,devices_per_host",
    [
        ("v4-8", 4, 1, 4),
        ("v4-32", 16, 4, 4),
        ("v5p-128", 64, 16, 4),
        ("v5litepod-8", 8, 1, 8),
        ("v5litepod-16", 16, 4, 4),
        ("v6e-4", 4, 1, 4),
        ("v6e-256", 256, 64, 4),
        ("v3-32", 16, 4, 8),  # two TensorCores (devices) per chip
        ("v2-8", 4, 1, 8),
    ],
)
def test_slice_table(accelerator, chips, hosts, devices_per_host):
    s = tpu.tpu_slice(accelerator)
    assert (s.chips, s.hosts, s.devices_per_host) == (chips, hosts, devices_per_host)
    assert s.num_devices == hosts * devices_per_host


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ("v5e-16", "v5litepod-16"),
        ("v4-6", "multiples of 8"),
        ("v6e-12", "one of 1, 4, 8"),
        ("v9z-8", "unknown TPU generation"),
        ("tpu", "GENERATION-SIZE"),
    ],
)
def test_bad_accelerator_types(bad, fragment):
    with pytest.raises(LaunchError, match=fragment):
        tpu.tpu_slice(bad)


def test_every_worker_runs_the_same_command():
    spec = _spec("v5litepod-16", num_slices=2, env={"WANDB_MODE": "offline"}, fsdp=16, dcn_data=2)
    plan = tpu.tpu_plan(spec, tpu.TpuTarget(zone="us-west4-a", accelerator_type="v5litepod-16"))
    assert plan.nodes == ("job-0", "job-1")
    assert "--node-count=2" in plan.create and "--node-prefix=job" in plan.create
    assert len(plan.run) == 2
    for node, argv in zip(plan.nodes, plan.run):
        assert argv[:6] == ("gcloud", "compute", "tpus", "tpu-vm", "ssh", node)
        assert "--worker=all" in argv
        assert argv[-1] == f"--command={plan.remote_command}"
    remote = plan.remote_command
    assert "PARTI_JAX_NUM_PROCESSES=8" in remote  # 2 slices x 4 hosts
    assert "PARTI_JAX_PROCESS_ID" not in remote  # JAX reads it from the TPU metadata
    assert "PARTI_JAX_AUTO_DETECT=1" in remote
    assert "PARTI_JAX_MESH=data=1,fsdp=16,tensor=1,dcn_data=2" in remote
    assert shlex.join(CMD) in remote
    # Logs: one file per worker of every slice.
    assert len(plan.logs) == 8
    assert {dest for _, dest in plan.logs} == {
        f"tpu_logs/job-{n}-worker{w}.log" for n in range(2) for w in range(4)
    }


def test_create_variants():
    spec = _spec("v4-8")
    plain = tpu.tpu_plan(spec, tpu.TpuTarget(zone="z", accelerator_type="v4-8", project="p"))
    assert plain.create[:6] == ("gcloud", "compute", "tpus", "tpu-vm", "create", "job")
    assert "--version=tpu-ubuntu2204-base" in plain.create and "--project=p" in plain.create
    assert plain.delete[-1] == "--quiet" and plain.healthy_state == "READY"
    spot = tpu.tpu_plan(spec, tpu.TpuTarget(zone="z", accelerator_type="v4-8", spot=True))
    assert spot.create[3:5] == ("queued-resources", "create")
    assert "--node-id=job" in spot.create and spot.create[-1] == "--spot"
    assert "--force" in spot.delete and spot.healthy_state == "ACTIVE"


def test_spec_mismatches_name_both_numbers():
    target = tpu.TpuTarget(zone="z", accelerator_type="v4-32")
    wrong_hosts = LaunchSpec(command=CMD, num_hosts=2, devices_per_host=4)
    with pytest.raises(LaunchError, match=r"v4-32 has 4 host\(s\).*is 2"):
        tpu.tpu_plan(wrong_hosts, target)
    bad_mesh = _spec("v4-32", data=2, fsdp=4)
    with pytest.raises(LaunchError, match=r"= 8 devices, not the slice's 16 devices"):
        tpu.tpu_plan(bad_mesh, target)
    with pytest.raises(LaunchError, match="--zone"):
        tpu.tpu_plan(_spec("v4-32"), tpu.TpuTarget(accelerator_type="v4-32"))


def test_script_is_valid_bash():
    spec = _spec("v5litepod-16", num_slices=2)
    plan = tpu.tpu_plan(spec, tpu.TpuTarget(zone="z", accelerator_type="v5litepod-16", spot=True))
    text = tpu.tpu_script(plan)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def _run_script(tmp_path: Path, command, *, preemptions: int, max_restarts: int = 3):
    fake = tmp_path / "fake"
    env = fake_gcloud_env(fake, preemptions=preemptions)
    spec = tpu.spec_for_slice(LaunchSpec(command=tuple(command), name="job"), "v4-16")
    target = tpu.TpuTarget(
        zone="z",
        accelerator_type="v4-16",
        spot=True,
        max_restarts=max_restarts,
        poll_seconds=1,
        install=False,
        remote_log=str(tmp_path / "remote" / "run.log"),
        log_dir=str(tmp_path / "logs"),
    )
    script = tmp_path / "job.tpu.sh"
    script.write_text(tpu.tpu_script(tpu.tpu_plan(spec, target)))
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    return proc, calls(fake)


def test_script_recreates_slice_after_preemption_and_reruns(tmp_path):
    argv = [
        sys.executable,
        "-c",
        "import json, os, sys; print(json.dumps([os.environ['PARTI_JAX_NUM_PROCESSES'], *sys.argv[1:]]))",
        "a b",
        "it's",
    ]
    proc, calls = _run_script(tmp_path, argv, preemptions=1)
    assert proc.returncode == 0, proc.stderr
    creates = [c for c in calls if "queued-resources create" in c]
    runs = [c for c in calls if "PARTI_JAX_NUM_PROCESSES" in c]
    deletes = [c for c in calls if "queued-resources delete" in c]
    assert len(creates) == 2 and len(runs) == 2 and len(deletes) == 2
    assert "restart 1 of 3" in proc.stderr
    # The command got its arguments intact through every layer of quoting.
    assert json.dumps(["2", "a b", "it's"]) in proc.stdout
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["job-worker0.log", "job-worker1.log"]
    assert json.dumps(["2", "a b", "it's"]) in (tmp_path / "logs" / "job-worker0.log").read_text()


def test_script_failure_on_healthy_slice_is_not_retried(tmp_path):
    proc, calls = _run_script(
        tmp_path, [sys.executable, "-c", "import sys; sys.exit(7)"], preemptions=0
    )
    assert proc.returncode == 7
    assert sum("queued-resources create" in c for c in calls) == 1
    assert "not a preemption" in proc.stderr


def test_script_gives_up_after_max_restarts(tmp_path):
    proc, calls = _run_script(tmp_path, ["true"], preemptions=5, max_restarts=1)
    assert proc.returncode == 1
    assert sum("queued-resources create" in c for c in calls) == 2
    assert "giving up after 1 restart(s)" in proc.stderr


def test_install_ships_wheel_constraints_and_setup_script(tmp_path):
    spec = _spec("v4-32", num_slices=2)
    wheel = tmp_path / "dist" / install.wheel_name()
    target = tpu.TpuTarget(
        zone="z", accelerator_type="v4-32", wheel=str(wheel), script=str(tmp_path / "job.tpu.sh")
    )
    plan = tpu.tpu_plan(spec, target)
    setup = str(tmp_path / "job.setup.sh")
    constraints = str(tmp_path / "dist" / "constraints.txt")
    assert plan.shipped == (str(wheel), constraints, setup) and plan.setup_path == setup
    for node, steps in zip(plan.nodes, plan.install):
        mkdir, scp, run = steps
        assert mkdir[-1] == "--command=mkdir -p parti_jax/dist"
        assert scp[3:5] == ("tpu-vm", "scp") and "--worker=all" in scp
        assert scp[5:9] == (str(wheel), constraints, setup, f"{node}:parti_jax/dist/")
        assert run[-1] == "--command=bash parti_jax/dist/job.setup.sh"
    # The set-up script finds the files next to itself and installs jax[tpu] at the pin.
    assert 'WHEEL="$HERE"/' + install.wheel_name() in plan.setup_script
    assert 'CONSTRAINTS="$HERE"/constraints.txt' in plan.setup_script
    assert (
        "ACCELERATOR=tpu" in plan.setup_script
        and 'VENV="$HOME"/parti_jax/venv' in plan.setup_script
    )
    # The command runs with that venv first on PATH.
    assert plan.remote_command.startswith('export PATH="$HOME/parti_jax/venv/bin:')
    subprocess.run(["bash", "-n"], input=tpu.describe(plan), text=True, check=True)

    custom = tpu.tpu_plan(spec, dataclasses.replace(target, install_command="pip install x"))
    assert [len(steps) for steps in custom.install] == [1, 1] and not custom.shipped
    assert custom.install[0][0][-1] == "--command=pip install x" and not custom.setup_path
    assert tpu.tpu_plan(spec, dataclasses.replace(target, install=False)).install == ()


def test_run_tpu_names_a_missing_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path / 'fake'}:{os.environ['PATH']}")
    fake_gcloud_env(tmp_path / "fake")
    target = tpu.TpuTarget(
        zone="z", accelerator_type="v4-8", wheel=str(tmp_path / install.wheel_name())
    )
    plan = tpu.tpu_plan(_spec("v4-8"), target)
    with pytest.raises(
        LaunchError, match=r"wheel file .* does not exist; build it with `scripts/build_wheel.sh`"
    ):
        tpu.run_tpu(plan)
    assert "# note: not built yet: " in tpu.describe(plan)  # the dry run says so too


def test_driver_copies_files_to_every_worker_and_stops_when_setup_fails(tmp_path):
    """The install step end to end under the fake gcloud: the files arrive in the worker's
    ~/parti_jax/dist, the set-up script runs there and fails (no Python 3.11 given), and
    the driver stops without running the command or retrying."""
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / install.wheel_name()).write_bytes(b"not really a wheel")
    (dist / "constraints.txt").write_text("jax==0.10.2\n")
    not_311 = tmp_path / "python3.10"
    not_311.write_text("#!/bin/sh\nexit 1\n")
    not_311.chmod(0o755)
    spec = tpu.spec_for_slice(LaunchSpec(command=("true",), name="job"), "v4-8")
    target = tpu.TpuTarget(
        zone="z",
        accelerator_type="v4-8",
        spot=True,
        poll_seconds=1,
        wheel=str(dist / install.wheel_name()),
        python=str(not_311),
        script=str(tmp_path / "job.tpu.sh"),
        log_dir=str(tmp_path / "logs"),
    )
    plan = tpu.tpu_plan(spec, target)
    env = fake_gcloud_env(tmp_path / "fake", home=tmp_path / "worker")
    Path(plan.setup_path).write_text(plan.setup_script)
    Path(plan.script_path).write_text(tpu.tpu_script(plan))
    proc = subprocess.run(
        ["bash", plan.script_path], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    shipped = sorted(p.name for p in (tmp_path / "worker" / "parti_jax" / "dist").iterdir())
    assert shipped == sorted([install.wheel_name(), "constraints.txt", "job.setup.sh"])
    assert f"PARTI_JAX_PYTHON={not_311} is not a Python 3.11" in proc.stderr
    assert "installing on the workers failed (not a preemption)" in proc.stderr
    made = calls(tmp_path / "fake")
    assert not any("PARTI_JAX_NUM_PROCESSES" in c for c in made)  # the command never ran
    assert sum("queued-resources create" in c for c in made) == 1
