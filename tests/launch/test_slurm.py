"""SLURM batch scripts: the #SBATCH header, and the script run under fake scontrol/srun
(coordinator, process ids, SIGTERM forwarding and requeue)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parti_jax.launch import slurm
from parti_jax.launch.common import LaunchError, LaunchSpec

FAKE_SCONTROL = textwrap.dedent(
    """\
    #!/bin/bash
    case "$1" in
      show) printf 'node01\\nnode02\\n' ;;
      requeue) echo "requeue $2" >> "$FAKE_DIR/calls" ;;
    esac
    """
)
# Runs SLURM_NTASKS copies of `bash -c LINE` like srun would, forwarding SIGTERM to them.
FAKE_SRUN = textwrap.dedent(
    """\
    #!/bin/bash
    echo "srun $*" >> "$FAKE_DIR/calls"
    while [[ "$1" != bash ]]; do shift; done
    line="$3"
    pids=()
    trap 'echo TERM >> "$FAKE_DIR/calls"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$((i % TASKS_PER_NODE)) bash -c "$line" &
      pids+=($!)
    done
    until wait; do :; done
    """
)

REPORT = (
    "import json, os, sys; "
    "keys = ['PARTI_JAX_COORDINATOR', 'PARTI_JAX_NUM_PROCESSES', 'PARTI_JAX_PROCESS_ID', "
    "'CUDA_VISIBLE_DEVICES', 'MY_VAR']; "
    "pid = os.environ['PARTI_JAX_PROCESS_ID']; "
    "json.dump({k: os.environ.get(k) for k in keys} | {'argv': sys.argv[1:]}, "
    "open(os.path.join(sys.argv[1], 'task_' + pid + '.json'), 'w'))"
)


def _fake_env(tmp_path: Path, ntasks: int, tasks_per_node: int) -> dict[str, str]:
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        path = fake / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        FAKE_DIR=str(fake),
        SLURM_JOB_ID="1234",
        SLURM_JOB_NODELIST="node[01-02]",
        SLURM_NTASKS=str(ntasks),
        TASKS_PER_NODE=str(tasks_per_node),
    )


def test_header():
    spec = LaunchSpec(command=("parti-jax", "train"), name="run", num_hosts=4, devices_per_host=8)
    target = slurm.SlurmTarget(
        partition="gpu", account="acct", time="2:00:00", sbatch_args=("--exclusive",)
    )
    header = [
        line
        for line in slurm.sbatch_script(spec, target).splitlines()
        if line.startswith("#SBATCH")
    ]
    assert header == [
        "#SBATCH --job-name=run",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --time=2:00:00",
        "#SBATCH --output=slurm_logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@120",
        "#SBATCH --exclusive",
    ]
    cpu = slurm.sbatch_script(spec, slurm.SlurmTarget(gpus=False, requeue=False))
    assert "--gpus-per-node" not in cpu and "--requeue" not in cpu and "trap" not in cpu


def test_script_under_fake_slurm_sets_coordinator_and_ids(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    spec = LaunchSpec(
        command=(sys.executable, "-c", REPORT, str(out), "a b", "it's"),
        num_hosts=2,
        devices_per_host=2,
        processes_per_host=2,
        env={"MY_VAR": "x y"},
    )
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.sbatch_script(spec, slurm.SlurmTarget(one_process_per_device=True)))
    env = _fake_env(tmp_path, ntasks=4, tasks_per_node=2)
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    tasks = [json.loads((out / f"task_{i}.json").read_text()) for i in range(4)]
    port = 1234 % 4096 + 61440
    assert all(t["PARTI_JAX_COORDINATOR"] == f"node01:{port}" for t in tasks)
    assert all(t["PARTI_JAX_NUM_PROCESSES"] == "4" for t in tasks)
    assert [t["PARTI_JAX_PROCESS_ID"] for t in tasks] == ["0", "1", "2", "3"]
    assert [t["CUDA_VISIBLE_DEVICES"] for t in tasks] == ["0", "1", "0", "1"]
    assert all(t["MY_VAR"] == "x y" and t["argv"] == [str(out), "a b", "it's"] for t in tasks)


def test_wrong_task_count_fails_early(tmp_path):
    spec = LaunchSpec(command=("true",), num_hosts=2, devices_per_host=1)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.sbatch_script(spec, slurm.SlurmTarget()))
    proc = subprocess.run(
        ["bash", str(script)],
        env=_fake_env(tmp_path, ntasks=3, tasks_per_node=1),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "expected 2 tasks, SLURM gave 3" in proc.stderr


def test_sigterm_reaches_tasks_then_requeues(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    trainer = (
        "import os, signal, sys, time; out = sys.argv[1]; i = os.environ['PARTI_JAX_PROCESS_ID']; "
        "signal.signal(signal.SIGTERM, lambda *a: (open(os.path.join(out, 'saved_' + i), 'w')"
        ".write('checkpoint'), sys.exit(0))); "
        "open(os.path.join(out, 'ready_' + i), 'w').close(); time.sleep(30)"
    )
    spec = LaunchSpec(
        command=(sys.executable, "-c", trainer, str(out)), num_hosts=2, devices_per_host=1
    )
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.sbatch_script(spec, slurm.SlurmTarget(port=5555)))
    env = _fake_env(tmp_path, ntasks=2, tasks_per_node=1)
    proc = subprocess.Popen(["bash", str(script)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all((out / f"ready_{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert all((out / f"saved_{i}").read_text() == "checkpoint" for i in range(2))
    calls = (tmp_path / "fake" / "calls").read_text().splitlines()
    assert "TERM" in calls and calls[-1] == "requeue 1234"
    assert "time limit or preemption" in stderr


def test_bad_input_is_named():
    spec = LaunchSpec(command=("x",), num_hosts=2, devices_per_host=8, processes_per_host=8)
    with pytest.raises(LaunchError, match="one_process_per_device"):
        slurm.sbatch_script(spec, slurm.SlurmTarget())
    with pytest.raises(LaunchError, match="num_slices"):
        slurm.sbatch_script(LaunchSpec(command=("x",), num_slices=2), slurm.SlurmTarget())
    with pytest.raises(LaunchError, match=r"= 4 devices, not the slice's 16 devices"):
        slurm.sbatch_script(
            LaunchSpec(command=("x",), num_hosts=2, devices_per_host=8, data=2, fsdp=2),
            slurm.SlurmTarget(),
        )
    with pytest.raises(LaunchError, match="sbatch_args"):
        slurm.sbatch_script(
            LaunchSpec(command=("x",)), slurm.SlurmTarget(sbatch_args=("exclusive",))
        )


def test_venv_is_installed_before_srun_and_first_on_path(tmp_path):
    """With --venv the batch script runs the set-up script first (here a stand-in that
    makes the venv's bin/), then every task finds the venv's programs first on PATH; a
    failed install ends the job before srun."""
    out = tmp_path / "out"
    out.mkdir()
    venv = tmp_path / "shared" / "venv"
    spec = LaunchSpec(command=("where-am-i", str(out)), name="job", num_hosts=2)
    target = slurm.SlurmTarget(gpus=False, venv=str(venv), script=str(tmp_path / "job.sbatch"))
    plan = slurm.slurm_plan(spec, target)
    assert plan.setup_path == str(tmp_path / "job.setup.sh")
    assert "ACCELERATOR=cpu " in plan.setup_script and f"VENV={venv} " in plan.setup_script
    Path(plan.script_path).write_text(plan.script)
    stand_in = (
        f"mkdir -p {venv}/bin && printf '#!/bin/sh\\ntouch \"$1/task_$PARTI_JAX_PROCESS_ID\"\\n' "
        f"> {venv}/bin/where-am-i && chmod +x {venv}/bin/where-am-i && echo installed >> {out}/log"
    )
    Path(plan.setup_path).write_text(stand_in)
    env = _fake_env(tmp_path, ntasks=2, tasks_per_node=1)
    proc = subprocess.run(
        ["bash", plan.script_path], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "log").read_text() == "installed\n"
    assert sorted(p.name for p in out.glob("task_*")) == ["task_0", "task_1"]

    Path(plan.setup_path).write_text("exit 3")
    (tmp_path / "fake" / "calls").unlink()
    proc = subprocess.run(
        ["bash", plan.script_path], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "installing parti_jax failed" in proc.stderr
    assert not (tmp_path / "fake" / "calls").exists()  # srun never ran


def test_install_flags_need_a_venv_and_a_built_wheel(tmp_path, monkeypatch):
    spec = LaunchSpec(command=("x",))
    with pytest.raises(LaunchError, match="pass --venv=/shared/PATH"):
        slurm.sbatch_script(spec, slurm.SlurmTarget(extras="data"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    target = slurm.SlurmTarget(venv=str(tmp_path / "v"), wheel=str(tmp_path / "missing.whl"))
    with pytest.raises(LaunchError, match=r"missing.whl does not exist; build it with"):
        slurm.run_slurm(slurm.slurm_plan(spec, target))
