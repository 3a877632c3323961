"""The local launcher: N CPU processes, all stopped and restarted when one dies.

The children are a small Python program (no jax) that loops over steps,
appends its progress to a per-process file and "checkpoints" a step counter.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from parti_jax.launch import local
from parti_jax.launch.common import LaunchError

PROGRAM = textwrap.dedent(
    """
    import json, os, sys, time
    out, total = sys.argv[1], int(sys.argv[2])
    pid = int(os.environ["PARTI_JAX_PROCESS_ID"])
    env = {k: os.environ.get(k) for k in (
        "PARTI_JAX_PROCESS_ID", "PARTI_JAX_NUM_PROCESSES", "PARTI_JAX_COORDINATOR",
        "PARTI_JAX_RESTART", "XLA_FLAGS", "JAX_PLATFORMS", "MY_FLAG")}
    with open(os.path.join(out, f"env_{pid}_{env['PARTI_JAX_RESTART']}.json"), "w") as f:
        json.dump(env, f)
    ckpt = os.path.join(out, f"ckpt_{pid}.txt")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    progress = os.path.join(out, f"progress_{pid}.txt")
    with open(progress, "a") as f:
        f.write(f"start {start} pid {os.getpid()}\\n")
    for step in range(start, total):
        time.sleep(0.05)
        with open(progress, "a") as f:
            f.write(f"step {step} pid {os.getpid()}\\n")
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(step + 1))
        os.replace(ckpt + ".tmp", ckpt)
    print(f"process {pid} done at {total}", flush=True)
    """
)


@pytest.fixture()
def program(tmp_path: Path) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM)
    (tmp_path / "out").mkdir()
    return path


def _progress(out: Path, pid: int) -> list[str]:
    path = out / f"progress_{pid}.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_all_exit_zero_returns_zero_and_sets_env(tmp_path, program):
    out = tmp_path / "out"
    echo = io.StringIO()
    status = io.StringIO()
    launcher = local.LocalLauncher(
        [sys.executable, str(program), str(out), "3"],
        num_processes=2,
        devices_per_process=4,
        log_dir=tmp_path / "logs",
        max_restarts=2,
        env={"MY_FLAG": "a b"},
        echo=echo,
        status=status,
    )
    assert launcher.run() == 0
    assert launcher.restarts == 0
    envs = [json.loads((out / f"env_{i}_0.json").read_text()) for i in range(2)]
    assert [e["PARTI_JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert all(e["PARTI_JAX_NUM_PROCESSES"] == "2" for e in envs)
    coordinators = {e["PARTI_JAX_COORDINATOR"] for e in envs}
    assert len(coordinators) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", coordinators.pop())
    assert all("--xla_force_host_platform_device_count=4" in e["XLA_FLAGS"] for e in envs)
    # The parent's (conftest's) device count is replaced, not duplicated.
    assert all(e["XLA_FLAGS"].count("device_count") == 1 for e in envs)
    assert all(e["JAX_PLATFORMS"] == "cpu" and e["MY_FLAG"] == "a b" for e in envs)
    for i in range(2):
        log = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} done at 3" in log
        assert f"[{i}] process {i} done at 3" in echo.getvalue()
    assert "all 2 processes exited 0" in status.getvalue()


def test_killed_process_stops_all_relaunches_and_resumes(tmp_path, program):
    out = tmp_path / "out"
    total = 40
    launcher = local.LocalLauncher(
        [sys.executable, str(program), str(out), str(total)],
        num_processes=2,
        devices_per_process=2,
        log_dir=tmp_path / "logs",
        max_restarts=3,
        term_timeout_s=5,
        status=io.StringIO(),
    )
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", launcher.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(line.startswith("step") for line in _progress(out, 1)) < 5:
            assert time.monotonic() < deadline, "process 1 made no progress"
            assert thread.is_alive()
            time.sleep(0.02)
        victim = int(_progress(out, 1)[0].split()[-1])
        os.kill(victim, signal.SIGKILL)
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive(), "launcher hung"
    assert result["rc"] == 0
    assert launcher.restarts == 1
    for pid in range(2):
        lines = _progress(out, pid)
        starts = [line for line in lines if line.startswith("start")]
        # Both processes were started twice: the survivor was stopped and relaunched too.
        assert len(starts) == 2, lines
        first_pid, second_pid = (s.split()[-1] for s in starts)
        assert first_pid != second_pid
        resumed_at = int(starts[1].split()[1])
        assert 0 < resumed_at < total, "the relaunch did not resume from the counter"
        after = [int(line.split()[1]) for line in lines[lines.index(starts[1]) + 1 :]]
        assert after == list(range(resumed_at, total))
        assert (out / f"ckpt_{pid}.txt").read_text() == str(total)
    restarted_env = json.loads((out / "env_0_1.json").read_text())
    assert restarted_env["PARTI_JAX_RESTART"] == "1"
    launcher_log = (tmp_path / "logs" / "launcher.log").read_text()
    assert "process 1 failed (signal 9)" in launcher_log
    assert "restart 1 of 3" in launcher_log


def test_restarts_exhausted_returns_failure_with_message(tmp_path):
    status = io.StringIO()
    launcher = local.LocalLauncher(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        num_processes=2,
        log_dir=tmp_path / "logs",
        max_restarts=1,
        status=status,
    )
    assert launcher.run() == 3
    assert launcher.restarts == 1
    text = status.getvalue()
    assert "giving up" in text and "max_restarts=1" in text and "exit code 3" in text


def test_process_ignoring_sigterm_is_killed_without_hang(tmp_path):
    # Process 0 fails at once; process 1 ignores SIGTERM and would sleep for a minute.
    code = textwrap.dedent(
        f"""
        import os, signal, sys, time
        if os.environ["PARTI_JAX_PROCESS_ID"] == "0":
            time.sleep(0.2)
            sys.exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(tmp_path / "pid")!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        """
    )
    start = time.monotonic()
    rc = local.run_local(
        [sys.executable, "-c", code],
        num_processes=2,
        log_dir=tmp_path / "logs",
        max_restarts=0,
        term_timeout_s=0.5,
        quiet=True,
    )
    assert rc == 1
    assert time.monotonic() - start < 20
    stubborn = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(stubborn, 0)


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(LaunchError, match="num_processes"):
        local.LocalLauncher(["true"], num_processes=0, log_dir=tmp_path)
    with pytest.raises(LaunchError, match="max_restarts"):
        local.LocalLauncher(["true"], num_processes=1, log_dir=tmp_path, max_restarts=-1)


def test_xla_flags_keep_other_flags():
    flags = local.xla_flags_with_devices("--foo=1 --xla_force_host_platform_device_count=8", 2)
    assert flags.split() == ["--foo=1", "--xla_force_host_platform_device_count=2"]


def test_sigterm_to_launcher_reaches_every_process(tmp_path):
    """The launcher passes SIGTERM on (the trainer's checkpoint-on-preemption), then exits."""
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        out = {str(tmp_path)!r}
        i = os.environ["PARTI_JAX_PROCESS_ID"]
        def save(*_):
            open(os.path.join(out, "saved_" + i), "w").write("checkpoint")
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        open(os.path.join(out, "ready_" + i), "w").close()
        time.sleep(60)
        """
    )
    launcher_code = (
        "import sys; from parti_jax.launch import run_local; "
        f"sys.exit(run_local([sys.executable, '-c', {child!r}], 2, "
        f"log_dir={str(tmp_path / 'logs')!r}, max_restarts=3, term_timeout_s=10))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher_code], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready_{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert all((tmp_path / f"saved_{i}").read_text() == "checkpoint" for i in range(2))
    assert "stopped by signal 15" in stderr and "restart 1" not in stderr
