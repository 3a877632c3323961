"""Issue 16's reproductions on the command line: a run refuses another kind's work dir and
one that another run writes, in one line and before writing anything; the lock goes at exit
(SIGTERM included), and a multi-process run holds it once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

import gin
from parti_jax import workdir as W
from parti_jax.cli import main as cli
from tests.test_workdir import snapshot
from tests.train.cli_testing import env, free_port, read_jsonl, train_args


def run(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    finally:
        gin.clear_config()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("parti-jax: error: ") and err.count("\n") == 1, err
    return err


def vqgan_dir(tmp_path, marked: bool):
    """A train-vqgan work dir: marked by a claim, or from before kinds (vqgan_meta.json)."""
    folder = tmp_path / "vqgan"
    if marked:
        W.claim_workdir(folder, "train-vqgan")
        W.release_workdir(folder)
    else:
        folder.mkdir()
        (folder / "vqgan_meta.json").write_text('{"config": {}}')
    (folder / "config.gin").write_text("# the VQGAN run's config\n")
    (folder / "checkpoints").mkdir()
    return folder


@pytest.mark.parametrize("marked", [False, True])
def test_train_refuses_a_train_vqgan_dir_without_overwriting_its_config(tmp_path, capsys, marked):
    folder = vqgan_dir(tmp_path, marked)
    before = snapshot(folder)
    assert run("train", "--gin_file=runs/tiny_train.gin", f"--workdir={folder}") == 2
    err = one_error_line(capsys)
    file = W.KIND_FILE if marked else "vqgan_meta.json"
    assert f"is a `parti-jax train-vqgan` work directory ({file}); `parti-jax train` " in err
    assert snapshot(folder) == before  # config.gin included


def test_sample_refuses_a_training_run_instead_of_writing_into_it(tmp_path, capsys):
    folder = tmp_path / "t2i"
    folder.mkdir()
    (folder / "model_config.json").write_text('{"model_config": {}}')
    (folder / "metrics.jsonl").write_text('{"step": 20, "loss": 1.0}\n')
    before = snapshot(folder)
    code = run(
        "sample", "--gin_file=runs/shapes_sample.gin", f"--workdir={folder}",
        "--prompt=a red circle", f"--t2i={folder}",
    )  # fmt: skip
    assert code == 2
    assert "is a `parti-jax train` work directory (model_config.json); `parti-jax sample` " in (
        one_error_line(capsys)
    )
    assert snapshot(folder) == before  # no PNGs, manifest.json or gin files


def test_a_dir_another_run_writes_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "samples"
    W.claim_workdir(out, "sample")
    W.release_workdir(out)
    holder = W.Lease(W.location(out), "sample").acquire()  # as if another run held it
    try:
        before = snapshot(out)
        assert run("sample", f"--workdir={out}", "--prompt=a red circle") == 2
        err = one_error_line(capsys)
        assert f"{out} is being written by another `parti-jax sample` run (host {W.HOST}, " in err
        assert f"pid {os.getpid()}, since " in err
        assert snapshot(out) == before
    finally:
        holder.release()


def wait_for(predicate, timeout: float = 180.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_the_same_train_started_twice_the_second_is_refused_the_first_finishes(tmp_path):
    folder = tmp_path / "run"
    first = subprocess.Popen(
        train_args(folder), env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for((folder / W.LOCK_FILE).exists, what="the first run's lock")
        second = subprocess.run(
            train_args(folder, "train/LoopConfig.num_steps=40"),
            env=env(1), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert first.poll() is None, "the first run ended before the second started"
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    lines = [x for x in second.stderr.splitlines() if x.startswith("parti-jax: error:")]
    assert len(lines) == 1 and (
        f"is being written by another `parti-jax train` run (host {W.HOST}, pid {first.pid}, "
        in lines[0]
    ), second.stderr
    assert first.returncode == 0, out[-3000:]
    assert "num_steps = 40" not in (folder / "config.gin").read_text()
    steps = [m["step"] for m in read_jsonl(folder / "metrics.jsonl") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert not [p for p in (folder / "checkpoints").iterdir() if "tmp" in p.name]
    assert not (folder / W.LOCK_FILE).exists()  # released at exit


@pytest.mark.slow
def test_a_trainer_told_to_stop_releases_its_lock(tmp_path):
    folder = tmp_path / "run"
    bindings = ["train/LoopConfig.num_steps=100000", "train/LoopConfig.log_every=1"]
    proc = subprocess.Popen(
        train_args(folder, *bindings), env=env(1), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        metrics = folder / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), what="a step")
        assert (folder / W.LOCK_FILE).exists()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert not (folder / W.LOCK_FILE).exists()


@pytest.mark.slow
def test_every_process_of_a_multi_process_run_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    holder = W.Lease(W.location(folder), "train")
    folder.mkdir()
    holder.acquire()
    port = free_port()
    try:
        procs = [
            subprocess.Popen(
                train_args(folder),
                env=env(
                    1,
                    PARTI_JAX_COORDINATOR=f"127.0.0.1:{port}",
                    PARTI_JAX_NUM_PROCESSES="2",
                    PARTI_JAX_PROCESS_ID=str(i),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(2)
        ]
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
        holder.release()
    # Each ends within seconds naming the holder (process 0 may also relay the other's stop).
    assert all(p.returncode != 0 for p in procs), errs
    for err in errs:
        lines = [x for x in err.splitlines() if x.startswith("parti-jax: error:")]
        assert lines and all("being written by another `parti-jax train` run" in x for x in lines)
    assert list(folder.iterdir()) == []  # not even config.gin
