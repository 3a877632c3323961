"""`parti-jax launch`: dry runs for every target, gin configs, missing binaries, bad flags."""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from parti_jax.cli import flags
from parti_jax.cli import main as cli
from parti_jax.launch import install

TRAIN = ["parti-jax", "train", "--gin_file=runs/x.gin", "--workdir=gs://bucket/run1"]


def _launch(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["launch", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_tpu_dry_run(capsys):
    rc, out, _ = _launch(
        capsys,
        "tpu",
        "--zone=us-central2-b",
        "--accelerator_type=v4-32",
        "--num_slices=2",
        "--name=big",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 0
    assert (
        "queued-resources create big --zone=us-central2-b --node-count=2 --node-prefix=big" in out
    )
    ssh_runs = [line.strip() for line in out.splitlines() if "PARTI_JAX_NUM_PROCESSES" in line]
    assert len(ssh_runs) == 2
    # The same command on every worker of both slices; only the node name differs.
    assert ssh_runs[0].replace("big-0", "NODE") == ssh_runs[1].replace("big-1", "NODE").rstrip()
    remote = shlex.split(ssh_runs[0].rstrip(" &"))[-1]
    assert "--worker=all" in ssh_runs[0]
    assert "PARTI_JAX_NUM_PROCESSES=8" in remote and shlex.join(TRAIN) in remote


def test_install_flags_reach_the_setup_scripts(capsys, tmp_path):
    wheel = tmp_path / install.wheel_name()
    rc, out, _ = _launch(
        capsys,
        "tpu",
        "--zone=z",
        "--accelerator_type=v5p-8",
        "--name=w",
        f"--wheel={wheel}",
        "--python=/usr/bin/python3.11",
        "--extras=data",
        f"--script={tmp_path / 'w.tpu.sh'}",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 0
    driver, setup = out.split(f"# ---- {tmp_path / 'w.setup.sh'}: copied", 1)
    scp = next(line for line in driver.splitlines() if "tpu-vm scp" in line)
    assert (
        f"{wheel} {tmp_path / 'constraints.txt'} {tmp_path / 'w.setup.sh'} w:parti_jax/dist/" in scp
    )
    assert "PYTHON=/usr/bin/python3.11 " in setup and "EXTRAS=data " in setup
    assert "ACCELERATOR=tpu " in setup and f"# note: not built yet: {wheel}" in setup

    rc, out, _ = _launch(
        capsys,
        "slurm",
        "--name=j",
        "--num_hosts=2",
        "--devices_per_host=8",
        f"--venv={tmp_path / 'venvs' / 'pj'}",
        f"--wheel={wheel}",
        f"--script={tmp_path / 'j.sbatch'}",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 0
    assert f"bash {tmp_path / 'j.setup.sh'} || " in out
    assert f"export PATH={tmp_path / 'venvs' / 'pj' / 'bin'}:" in out
    # The wheel is found where it was built (shared filesystem), CUDA jax for GPU nodes.
    assert f"WHEEL={wheel}  " in out and "ACCELERATOR=cuda " in out
    rc, _, err = _launch(capsys, "slurm", f"--wheel={wheel}", "--dry_run", "--", *TRAIN)
    assert rc == 2 and "pass --venv=/shared/PATH" in err
    rc, _, err = _launch(capsys, "tpu", "--registry=r", "--dry_run", "--", *TRAIN)
    assert rc == 2 and "--registry does not apply to the tpu target" in err


def test_gke_dry_run(capsys):
    yaml = pytest.importorskip("yaml")
    rc, out, _ = _launch(
        capsys,
        "gke",
        "--registry=europe-docker.pkg.dev/proj/repo",
        "--accelerator=v6e-16",
        "--name=g",
        "--dry_run",
        "--command",
        shlex.join(TRAIN),
    )
    assert rc == 0
    build, rest = out.split("# g.jobset.yaml\n", 1)
    image = f"europe-docker.pkg.dev/proj/repo/parti-jax:{install.VERSION}-tpu"
    assert f"docker build --build-arg ACCELERATOR=tpu -t {image} .\n" in build
    manifest_text, commands = rest.split("# submit", 1)
    manifest = yaml.safe_load(manifest_text)
    container = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PARTI_JAX_COORDINATOR"] == "g-slice-0-0.g:8482"
    assert env["PARTI_JAX_NUM_PROCESSES"] == "4"
    assert container["image"] == image
    assert container["command"][-1].endswith("exec " + shlex.join(TRAIN))
    assert "kubectl apply -f g.jobset.yaml" in commands


def test_slurm_dry_run(capsys):
    rc, out, _ = _launch(
        capsys,
        "slurm",
        "--num_hosts=2",
        "--devices_per_host=8",
        "--one_process_per_device",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 0
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=8" in out
    assert "export PARTI_JAX_NUM_PROCESSES=16" in out
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in out
    assert "PARTI_JAX_PROCESS_ID=$SLURM_PROCID" in out and shlex.join(TRAIN) in out
    assert out.rstrip().endswith("sbatch parti-jax.sbatch")


def test_local_dry_run(capsys):
    rc, out, _ = _launch(
        capsys,
        "local",
        "--num_processes=2",
        "--devices_per_process=4",
        "--mesh=data=2,fsdp=4",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("env ")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert f"PARTI_JAX_PROCESS_ID={i}" in line and "PARTI_JAX_NUM_PROCESSES=2" in line
        assert "--xla_force_host_platform_device_count=4" in line
        assert "PARTI_JAX_MESH=data=2,fsdp=4,tensor=1" in line
        assert line.endswith(shlex.join(TRAIN))


def test_local_run(capsys, tmp_path):
    code = "import os; print('hello', os.environ['PARTI_JAX_PROCESS_ID'])"
    rc, out, err = _launch(
        capsys,
        "local",
        "--num_processes=2",
        f"--log_dir={tmp_path}",
        "--",
        sys.executable,
        "-c",
        code,
    )
    assert rc == 0, err
    assert "[0] hello 0" in out and "[1] hello 1" in out
    assert "all 2 processes exited 0" in err


def test_mesh_mismatch_names_both_numbers(capsys):
    rc, _, err = _launch(
        capsys,
        "tpu",
        "--zone=z",
        "--accelerator_type=v5litepod-16",
        "--mesh=data=2,fsdp=4",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 2
    assert re.search(r"= 8 devices, not the slice's 16 devices", err)


@pytest.mark.parametrize(
    "target,flags_,binary,hint",
    [
        ("tpu", ["--zone=z", "--accelerator_type=v4-8"], "gcloud", "Google Cloud CLI"),
        ("gke", ["--image=i", "--accelerator=v4-8"], "kubectl", "install kubectl"),
        ("slurm", ["--num_hosts=2"], "sbatch", "SLURM"),
    ],
)
def test_missing_binary_is_named_and_dry_run_still_works(
    capsys, monkeypatch, tmp_path, target, flags_, binary, hint
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "")
    rc, _, err = _launch(capsys, target, *flags_, "--", *TRAIN)
    assert rc == 2
    assert f"`{binary}` was not found on PATH" in err and hint in err and "--dry_run" in err
    rc, out, _ = _launch(capsys, target, *flags_, "--dry_run", "--", *TRAIN)
    assert rc == 0 and shlex.join(TRAIN) in out


def test_gin_config_with_flag_overrides(capsys, tmp_path):
    gin_file = tmp_path / "my_tpu.gin"
    gin_file.write_text(
        "LaunchSpec.name = 'from-gin'\n"
        "LaunchSpec.env = {'FROM_GIN': '1'}\n"
        "TpuTarget.zone = 'europe-west4-a'\n"
        "TpuTarget.accelerator_type = 'v5litepod-8'\n"
        "TpuTarget.spot = True\n"
    )
    rc, out, _ = _launch(
        capsys,
        "tpu",
        f"--gin_file={gin_file}",
        "--zone=us-east1-d",
        "--env=FROM_FLAG=2",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert rc == 0
    assert "queued-resources create from-gin --zone=us-east1-d" in out  # flag beats gin
    assert "--accelerator-type=v5litepod-8" in out and "--spot" in out
    assert "FROM_GIN=1 FROM_FLAG=2" in out


@pytest.mark.parametrize("name", [n for n in flags.list_gin_files() if n.startswith("launch/")])
def test_shipped_launch_gin_files(capsys, name):
    target = name.split("/")[1].split("_")[0]
    extra = {"tpu": ["--zone=z"], "gke": ["--image=i"]}.get(target, [])
    rc, out, err = _launch(capsys, target, f"--gin_file={name}", *extra, "--dry_run", "--", *TRAIN)
    assert rc == 0, err
    assert shlex.join(TRAIN) in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["local", "--dry_run"], "no command to run"),
        (["local", "--command=echo hi", "--", "echo"], "not both"),
        (["slurm", "--zone=z", "--", "x"], "--zone does not apply to the slurm target"),
        (["local", "--mesh=pipeline=2", "--", "x"], "pipeline=2"),
        (["local", "--env=NOEQUALS", "--", "x"], "--env NAME=VALUE"),
        (["local", "--env=PARTI_JAX_PROCESS_ID=3", "--dry_run", "--", "x"], "may not set"),
        (["tpu", "--zone=z", "--accelerator_type=v5e-8", "--dry_run", "--", "x"], "v5litepod-8"),
        (["local", "--name=Bad_Name", "--dry_run", "--", "x"], "--name"),
    ],
)
def test_bad_input_gives_one_line_error(capsys, args, message):
    rc, _, err = _launch(capsys, *args)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
