"""`parti-jax launch local` with the real trainer: a killed process stops the run,
all processes restart, and training resumes from the checkpoint.

2 processes x 2 CPU devices (gloo collectives on 127.0.0.1) run
`parti-jax train --gin_file=runs/tiny_train.gin`; once the first checkpoint is
committed, one process gets SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from parti_jax.launch import local

CHECKPOINT_EVERY = 5
NUM_STEPS = 30


def _steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if "loss" in record:
            out.append(int(record["step"]))
    return out


def _committed_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    if not root.exists():
        return []
    # orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when committed.
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_killed_trainer_stops_all_restarts_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable, "-m", "parti_jax", "train", "--gin_file=runs/tiny_train.gin",
        f"--workdir={workdir}", f"--gin.train/LoopConfig.num_steps={NUM_STEPS}",
        f"--gin.train/LoopConfig.checkpoint_every={CHECKPOINT_EVERY}",
        "--gin.train/LoopConfig.log_every=1", "--gin.train/LoopConfig.async_checkpoints=False",
    ]  # fmt: skip
    status = io.StringIO()
    launcher = local.LocalLauncher(
        command,
        num_processes=2,
        devices_per_process=2,
        log_dir=tmp_path / "logs",
        max_restarts=1,
        term_timeout_s=5,
        status=status,
    )
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", launcher.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while not _committed_steps(workdir):
            assert thread.is_alive(), f"the run ended before a checkpoint: {status.getvalue()}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        first_pids = launcher.pids
        killed_at = time.monotonic()
        os.kill(first_pids[1], signal.SIGKILL)
        # The launcher notices, stops process 0 (SIGTERM, SIGKILL after 5 s) and restarts.
        while launcher.pids == first_pids or not launcher.pids:
            assert time.monotonic() - killed_at < 30, "the launcher did not restart promptly"
            time.sleep(0.05)
        restart_s = time.monotonic() - killed_at
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive(), "launcher hung"
    log = status.getvalue()
    assert result["rc"] == 0, log + (tmp_path / "logs" / "process_0.log").read_text()[-3000:]
    assert launcher.restarts == 1
    assert "process 1 failed (signal 9)" in log and "restart 1 of 1" in log
    assert restart_s < 30

    text = (tmp_path / "logs" / "process_0.log").read_text()
    found = re.findall(r"resumed from (\S+)/checkpoints/(\d+)", text)
    assert len(found) == 1 and found[0][0] == str(workdir), text[-3000:]
    resumed_from = int(found[0][1])
    assert resumed_from > 0 and resumed_from % CHECKPOINT_EVERY == 0
    # metrics.jsonl: the first run's steps 1..k (k >= the checkpoint), then the
    # restarted run's steps from the checkpoint on, not from 0.
    steps = _steps(workdir / "metrics.jsonl")
    second = list(range(resumed_from + 1, NUM_STEPS + 1))
    first = steps[: len(steps) - len(second)]
    assert steps[len(first) :] == second, steps
    assert first == list(range(1, len(first) + 1)) and len(first) >= resumed_from, steps
    assert _committed_steps(workdir)[-1] == NUM_STEPS
