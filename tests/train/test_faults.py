"""Faults a run must survive: a damaged newest checkpoint (fall back to the newest intact
one, say which step was bad and why in one line, keep the bad one aside), and kill -9 /
SIGTERM at random points of `parti-jax train`, during saves too (the same losses and data
order as an uninterrupted run, each step logged once, no temporary folders left).

The fault-injection test runs 8 kill points on a local work dir and 3 on a gs:// one (the
GCS emulator, tests/gcs_testing.py: saves there are not renamed into place but finished
by orbax's commit_success.txt); a larger sweep is opt-in:

    PARTI_JAX_FAULT_KILLS=40 PARTI_JAX_FAULT_SEED=1 \\
        .venv/bin/python -m pytest -n 0 -q tests/train/test_faults.py -k kill
"""

import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from parti_jax import storage
from parti_jax.train import checkpoints, loop, metrics
from tests.train import cli_testing as ct
from tests.train.test_loop import train


def _cut_array_file(step_dir: Path) -> None:
    """Truncates the largest array-data file to half its size."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    biggest = max(files, key=lambda f: f.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)


def _delete_position(step_dir: Path) -> None:
    for f in (step_dir / "data").glob("shard_*"):
        f.unlink()


# The corruptions of the issue, and what the one line must say.
DAMAGE = {
    "array file cut short": (_cut_array_file, r"state/.*(byte range|Truncated)"),
    "data position deleted": (_delete_position, r"data: no data position file"),
    "_METADATA deleted": (lambda d: (d / "state" / "_METADATA").unlink(), r"_METADATA is missing"),
    "d/ deleted": (lambda d: shutil.rmtree(d / "state" / "d"), r"NOT_FOUND: .*state/d/"),
    "data/ deleted": (lambda d: shutil.rmtree(d / "data"), r"data \(the data position\) is m"),
}
TOY = loop.LoopConfig(num_steps=12, log_every=1, checkpoint_every=4, keep_checkpoints=2)


def _steps_and_losses(workdir) -> list[tuple[int, float]]:
    lines = metrics.read_metrics(storage.join(workdir, "metrics.jsonl"))
    return [(m["step"], m["loss"]) for m in lines]


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train(workdir, TOY)
    return _steps_and_losses(workdir)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back(damage, toy_reference, tmp_path, capsys):
    corrupt, why = DAMAGE[damage]
    train(tmp_path, dataclasses.replace(TOY, num_steps=8))
    corrupt(tmp_path / "checkpoints" / "8")
    capsys.readouterr()

    assert train(tmp_path, TOY).step == 12
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if " is damaged" in line]
    assert re.search(rf"checkpoints/8 is damaged: .*{why}", line), line
    assert f"resumed from {tmp_path}/checkpoints/4" in out
    assert _steps_and_losses(tmp_path) == toy_reference  # each step once, the same losses
    folders = ct.checkpoint_folders(tmp_path)
    assert folders[:2] == ["12", "8"] and re.fullmatch(r"8\.corrupt-\d{8}-\d{6}", folders[2])


def test_no_intact_checkpoint_or_a_damaged_choice_is_one_line(tmp_path):
    train(tmp_path, dataclasses.replace(TOY, num_steps=8))
    for step in ("4", "8"):
        (tmp_path / "checkpoints" / step / "state" / "_METADATA").unlink()
    pattern = r"checkpoints: no intact checkpoint; tried steps \[8, 4\], each damaged"
    with pytest.raises(checkpoints.CheckpointError, match=pattern):
        train(tmp_path, TOY)
    pattern = r"checkpoints/4 is damaged \(see above\); restore another step \(steps there are"
    with pytest.raises(checkpoints.CheckpointError, match=pattern):
        train(tmp_path, dataclasses.replace(TOY, restore_step=4))
    assert ct.checkpoint_folders(tmp_path) == ["4", "8"]  # nothing set aside when nothing restores


COMMON = (
    "train/LoopConfig.log_every=1",
    "train/LoopConfig.checkpoint_every=4",
    "train/LoopConfig.log_data_hash=True",
    "train/LoopConfig.tensorboard=False",
)


def _records(workdir) -> tuple[list, list]:
    """(step, loss) of metrics.jsonl and (step, hash) of the data-hash log."""
    hashes = ct.read_jsonl(storage.join(workdir, "data_hash.process_0.jsonl"))
    return _steps_and_losses(workdir), [(h["step"], h["data_hash"]) for h in hashes]


def test_cli_falls_back_from_a_cut_array_file(tmp_path):
    run = tmp_path / "run"
    ct.run(ct.train_args(run, "train/LoopConfig.num_steps=12", *COMMON))
    uninterrupted = _records(run)
    _cut_array_file(run / "checkpoints" / "12")

    proc = ct.run(ct.train_args(run, "train/LoopConfig.num_steps=12", *COMMON))
    (line,) = [line for line in proc.stdout.splitlines() if " is damaged" in line]
    assert re.search(r"checkpoints/12 is damaged: .*(byte range|Truncated)", line), line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"resumed from {run}/checkpoints/8" in proc.stdout
    assert _records(run) == uninterrupted  # steps 9-12 again: the same losses and data
    assert re.fullmatch(r"12\.corrupt-\d{8}-\d{6}", ct.checkpoint_folders(run)[1])

    # --restore_step names a step that is not there: one line listing the steps there.
    args = [*ct.train_args(run, "train/LoopConfig.num_steps=12", *COMMON), "--restore_step=5"]
    proc = subprocess.run(args, env=ct.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"parti-jax: error: {run}/checkpoints: no checkpoint for step 5; steps there are [8, 12]"
    )


@pytest.mark.slow
def test_processes_agree_on_the_fallback(tmp_path):
    """Only process 1 finds its data position gone: both processes resume from step 4."""
    two = ("train/LoopConfig.log_every=1", "train/LoopConfig.checkpoint_every=4")
    ct.run_processes(tmp_path, [*two, "train/LoopConfig.num_steps=8"])
    before = dict(_steps_and_losses(tmp_path))
    (tmp_path / "checkpoints" / "8" / "data" / "shard_1_of_2.json").unlink()

    outputs = ct.run_processes(tmp_path, [*two, "train/LoopConfig.num_steps=8"])
    assert "checkpoints/8 is damaged on another process" in outputs[0]
    assert re.search(r"process 1: checkpoint \S+/8 is damaged: data/shard_1_of_2", outputs[1])
    assert f"resumed from {tmp_path}/checkpoints/4" in outputs[0]
    after = _steps_and_losses(tmp_path)
    assert [s for s, _ in after] == list(range(1, 9))
    assert all(loss == pytest.approx(before[s], rel=1e-6) for s, loss in after)
    assert re.fullmatch(r"8\.corrupt-\d{8}-\d{6}", ct.checkpoint_folders(tmp_path)[-1])


# ------------------------------------------------------------------ kill -9 / SIGTERM

KILLS = int(os.environ.get("PARTI_JAX_FAULT_KILLS", "8"))
SEED = int(os.environ.get("PARTI_JAX_FAULT_SEED", "0"))
# The 8 kill points of the default run: (moment, signal); a larger sweep draws them.
# 'preempt' is SIGTERM, then SIGKILL during the save it starts (a grace period running
# out): that step is off the checkpoint cadence, so no later save replaces its folder.
PLAN = [
    ("save", signal.SIGKILL),
    ("step", signal.SIGTERM),
    ("start", signal.SIGKILL),
    ("preempt", signal.SIGTERM),
    ("save", signal.SIGTERM),
    ("step", signal.SIGKILL),
    ("preempt", signal.SIGTERM),
    ("start", signal.SIGTERM),
]
# On gs:// (each run also talks to the emulator in the test process): a kill during a save,
# a preemption whose save is cut short, a kill during start-up.
GCS_PLAN = [("save", signal.SIGKILL), ("preempt", signal.SIGTERM), ("start", signal.SIGKILL)]
TMP = ".orbax-checkpoint-tmp"


def _tmp_folders(workdir) -> list[str]:
    """Saves under way or cut short: orbax's temporary folders; on GCS, where a save is
    written in place, `<step>` folders without commit_success.txt."""
    names = ct.checkpoint_folders(workdir)
    if not storage.is_url(workdir):
        return [n for n in names if TMP in n]
    committed = set(ct.committed_steps(workdir))
    return [n for n in names if n.isdigit() and int(n) not in committed]


def _last_step(workdir) -> int:
    try:
        lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
    except FileNotFoundError:
        return 0
    found = re.search(r'"step": (\d+)', lines[-1]) if lines else None
    return int(found.group(1)) if found else 0


def _kill_at(workdir, args: list[str], moment: str, sig: int, rng, log) -> dict:
    """Starts the run and sends `sig` at `moment`: while a new save's temporary folder
    exists, a few steps after the resume, at a random time during start-up, or (preempt)
    SIGTERM a few steps after the resume and SIGKILL during the save that starts."""
    committed = ct.committed_steps(workdir)
    poll = 0.05 if storage.is_url(workdir) else 0.002  # the emulator serves this process too
    target_step = max([*committed, _last_step(workdir)]) + rng.randint(1, 6)
    after_s = rng.uniform(0.2, 3.0)
    stale = set(_tmp_folders(workdir))  # left by an earlier kill, removed at start
    proc = subprocess.Popen(args, env=ct.env(), stdout=log, stderr=subprocess.STDOUT)
    start, saving, termed = time.monotonic(), False, False
    try:
        while proc.poll() is None:
            assert time.monotonic() - start < 240, f"no {moment} kill point within 240 s"
            new = set(_tmp_folders(workdir)) - stale
            saving = bool(new)
            if moment == "preempt" and termed and any(int(n.split(".")[0]) % 4 for n in new):
                sig = signal.SIGKILL  # during the save SIGTERM started (off the cadence)
            elif not (
                (moment == "save" and saving)
                or (moment in ("step", "preempt") and _last_step(workdir) >= target_step)
                or (moment == "start" and time.monotonic() - start >= after_s)
            ):
                time.sleep(poll)
                continue
            proc.send_signal(sig)
            if moment != "preempt" or sig == signal.SIGKILL:
                break
            termed = True
        else:
            assert termed, f"the run ended (exit {proc.returncode}) before the kill"
    finally:
        proc.wait(timeout=120)
    allowed = {-signal.SIGKILL} if sig == signal.SIGKILL else {143, -signal.SIGTERM}
    assert proc.returncode in allowed, (moment, sig, proc.returncode)
    return {"during_save": saving, "tmp_left": bool(set(_tmp_folders(workdir)) - stale)}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_kill_9_and_sigterm_at_random_points_resume_identically(where, tmp_path, request):
    t0 = time.monotonic()
    rng = random.Random(SEED)
    base = PLAN if where == "local" else GCS_PLAN
    count = KILLS if where == "local" else min(KILLS, len(GCS_PLAN))
    plan = base[:count] + [
        (
            rng.choice(["save", "step", "start", "preempt"]),
            rng.choice([signal.SIGKILL, signal.SIGTERM]),
        )
        for _ in range(count - len(base))
    ]
    num_steps = 40 + 12 * count  # more than the kills can reach: every kill lands
    args = lambda w: ct.train_args(w, f"train/LoopConfig.num_steps={num_steps}", *COMMON)  # noqa: E731
    reference = tmp_path / "reference"
    ct.run(args(reference))

    workdir = tmp_path / "killed" if where == "local" else request.getfixturevalue("gcs").url("k")
    kills = []
    with open(tmp_path / "killed.log", "w") as log:
        for moment, sig in plan:
            kills.append(_kill_at(workdir, args(workdir), moment, sig, rng, log))
    ct.run(args(workdir))  # the last run goes to the end

    assert _records(workdir) == _records(reference)  # losses and data order, each step once
    assert _tmp_folders(workdir) == []  # the next run removed the cut saves' folders
    assert ct.checkpoint_folders(workdir) == ct.checkpoint_folders(
        reference
    )  # and no checkpoint was ever damaged
    if len(kills) >= len(base):
        assert any(k["tmp_left"] for k in kills), "no kill cut a save short"
    print(
        f"fault injection ({where}): {len(kills)} kill points "
        f"({sum(k['during_save'] for k in kills)} during a save, {sum(k['tmp_left'] for k in kills)} leaving its temporary folder), "
        f"{len(kills) + 2} runs with the reference and the final one, resumed identically, "
        f"{time.monotonic() - t0:.0f} s"
    )
