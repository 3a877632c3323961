"""The trainers with a gs:// work dir, against the in-process GCS emulator (tests/gcs_testing.py).

`parti-jax train` and `train-vqgan` run as subprocesses on gs://, are killed with SIGKILL
after their first checkpoint and resumed: the losses (and the data order) equal an
uninterrupted run's, each step logged once. A damaged newest checkpoint in the bucket is
reported, kept aside as a copy (`<step>.corrupt-<time>`; object stores have no rename)
and the run falls back to the one before. Every run starts in an empty folder with an
empty TMPDIR of its own: nothing of the run lands on the local disk (the compile cache,
pointed elsewhere by conftest.py, may), and what a kill -9 leaves in TMPDIR is only the
local staging folders of storage.staged / TensorBoard. The uninterrupted references run
in this process on a local folder: the same computation, without a start-up.

The two-process run on gs:// is in tests/train/test_multihost.py, the random kill points
in tests/train/test_faults.py (both `slow`).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import gin
from parti_jax import storage
from parti_jax import workdir as W
from parti_jax.cli import main as cli
from tests.train import cli_testing as ct

TRAIN = (
    "train/LoopConfig.log_every=1",
    "train/LoopConfig.checkpoint_every=4",
    "train/LoopConfig.log_data_hash=True",
)
VQGAN = (
    "train_vqgan/LoopConfig.log_every=1",
    "train_vqgan/LoopConfig.checkpoint_every=4",
)
VQGAN_ARGS = ["-m", "parti_jax", "train-vqgan", "--gin_file=runs/tiny_vqgan.gin"]


def in_process(args: list[str]) -> None:
    """Runs a `parti-jax` command line (as built for a subprocess) in this process."""
    argv = args[args.index("parti_jax") + 1 :]
    try:
        assert cli.main(argv) == 0
    finally:
        gin.clear_config()
        W.release_workdir(next(a for a in argv if a.startswith("--workdir=")).partition("=")[2])


def isolated(tmp_path, name: str) -> tuple[dict, object, object]:
    """(environment, cwd, TMPDIR) of one run: two empty local folders of its own."""
    cwd, tmp = tmp_path / f"{name}_cwd", tmp_path / f"{name}_tmp"
    cwd.mkdir()
    tmp.mkdir()
    return ct.env(TMPDIR=str(tmp)), cwd, tmp


def local_leftovers(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def records(workdir, data_hash: bool = True) -> tuple[list, list]:
    """(step, loss) of metrics.jsonl (evaluation lines too) and (step, hash) of the data log."""
    lines = ct.read_jsonl(storage.join(workdir, "metrics.jsonl"))
    losses = [(m["step"], m.get("loss"), m.get("eval/l2")) for m in lines]
    if not data_hash:
        return losses, []
    hashes = ct.read_jsonl(storage.join(workdir, "data_hash.process_0.jsonl"))
    return losses, [(h["step"], h["data_hash"]) for h in hashes]


def cut_array_file(step_dir: str) -> None:
    """Rewrites the biggest array-data object of a checkpoint with its first half."""
    fs, root = storage._fs(step_dir)
    files = {p: fs.info(p)["size"] for p in fs.find(f"{root}/state") if "/d/" in p}
    biggest = max(files, key=files.get)
    storage.write_bytes(
        f"gs://{biggest}", storage.read_bytes(f"gs://{biggest}")[: files[biggest] // 2]
    )


def test_check_workdir_on_gcs_creates_no_local_folder(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = gcs.url("run")
    assert str(W.check_workdir(url)) == url
    assert local_leftovers(tmp_path) == [] and gcs.objects() == []  # the probe went too
    W.claim_workdir(url, "train")
    try:
        assert gcs.objects() == sorted([f"run/{W.KIND_FILE}", f"run/{W.LOCK_FILE}"])
        with pytest.raises(W.WorkdirError, match="being written by another `parti-jax train`"):
            W.Lease(W.location(url), "train").acquire()  # a second writer (another process)
    finally:
        W.release_workdir(url)
    assert gcs.objects() == [f"run/{W.KIND_FILE}"]
    with pytest.raises(W.WorkdirError, match=r"is a `parti-jax train` work directory"):
        W.claim_workdir(url, "sample")
    assert local_leftovers(tmp_path) == []


def test_train_on_gcs_resumes_after_kill_9_and_sets_a_damaged_checkpoint_aside(gcs, tmp_path):
    reference = tmp_path / "reference"
    in_process(ct.train_args(reference, "train/LoopConfig.num_steps=40", *TRAIN))
    expected = records(reference)
    run = gcs.url("run")

    # Killed after its first checkpoint, then resumed: the reference's losses and data.
    killed_env, cwd, killed_tmp = isolated(tmp_path, "killed")
    args = ct.train_args(run, "train/LoopConfig.num_steps=100000", *TRAIN)
    resume_from = ct.kill_after_checkpoint(args, run, step=4, environ=killed_env, cwd=cwd)
    assert resume_from < 36, resume_from
    assert all(name.startswith("parti_jax_") for name in local_leftovers(killed_tmp))
    environ, _, tmp = isolated(tmp_path, "resumed")
    proc = ct.run(
        ct.train_args(run, "train/LoopConfig.num_steps=40", *TRAIN), environ=environ, cwd=cwd
    )
    assert f"resumed from {run}/checkpoints/{resume_from}" in proc.stdout
    assert records(run) == expected  # each step once

    names = set(gcs.objects())
    for name in ("config.gin", "operative_config.gin", "model_config.json", W.KIND_FILE):
        assert f"run/{name}" in names
    assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
    assert f"run/{W.LOCK_FILE}" not in names  # released at exit
    assert ct.committed_steps(run) == [36, 40]  # keep_checkpoints = 2

    # The newest checkpoint damaged: reported, kept aside as a copy, the run falls back.
    original = gcs.objects("run", "checkpoints", "40")
    cut_array_file(storage.join(run, "checkpoints", "40"))
    environ, _, tmp2 = isolated(tmp_path, "fallback")
    proc = ct.run(
        ct.train_args(run, "train/LoopConfig.num_steps=40", *TRAIN), environ=environ, cwd=cwd
    )
    (line,) = [line for line in proc.stdout.splitlines() if " is damaged" in line]
    assert re.search(r"checkpoints/40 is damaged: .*state/", line), line
    assert f"resumed from {run}/checkpoints/36" in proc.stdout
    assert records(run) == expected
    folders = storage.listdir(storage.join(run, "checkpoints"))
    assert folders[:2] == ["36", "40"] and re.fullmatch(r"40\.corrupt-\d{8}-\d{6}", folders[2])
    assert gcs.objects("run", "checkpoints", folders[2]) == original  # a whole copy

    assert local_leftovers(cwd) == [] and local_leftovers(tmp) == local_leftovers(tmp2) == []


def test_train_vqgan_on_gcs_resumes_after_kill_9(gcs, tmp_path):
    reference = tmp_path / "reference"
    in_process(["python", *VQGAN_ARGS, f"--workdir={reference}", *(f"--gin.{b}" for b in VQGAN)])
    expected = records(reference, data_hash=False)
    run = gcs.url("vqgan")

    killed_env, cwd, killed_tmp = isolated(tmp_path, "killed")
    args = [*ct.TRAIN[:1], *VQGAN_ARGS, f"--workdir={run}", *(f"--gin.{b}" for b in VQGAN)]
    longer = [*args, "--gin.train_vqgan/LoopConfig.num_steps=100000"]
    resume_from = ct.kill_after_checkpoint(longer, run, step=4, environ=killed_env, cwd=cwd)
    assert resume_from < 20, resume_from
    assert all(name.startswith("parti_jax_") for name in local_leftovers(killed_tmp))
    environ, _, tmp = isolated(tmp_path, "resumed")
    proc = ct.run(args, environ=environ, cwd=cwd)
    assert f"resumed from {run}/checkpoints/{resume_from}" in proc.stdout
    assert records(run, data_hash=False) == expected

    meta = storage.read_json(storage.join(run, "vqgan_meta.json"))
    assert meta["step"] == 20 and sorted(meta["codebook_hashes"], key=int)[-1] == "20"
    names = gcs.objects("vqgan")
    assert "images/step_20.png" in names and "images/step_10.png" in names
    assert local_leftovers(cwd) == [] and local_leftovers(tmp) == []


def test_metric_writer_on_gcs_uploads_at_flush_and_drops_later_steps_on_resume(gcs, tmp_path):
    from parti_jax.train import metrics

    run = gcs.url("run")
    writer = metrics.MetricWriter(run, start_step=0, flush_secs=3600)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step})
    assert gcs.objects() == []  # on an object store the files appear at flush
    writer.flush()
    (events,) = [n for n in gcs.objects() if n.startswith("run/tensorboard/events.out.")]
    assert gcs.objects() == sorted(["run/metrics.jsonl", events])
    local = writer._tb_sync.local
    writer.close()
    assert not os.path.exists(local)  # the local TensorBoard folder went at close

    resumed = metrics.MetricWriter(run, start_step=2, tensorboard=False)
    resumed.write_scalars(3, {"loss": 0.5})
    resumed.close()
    assert [(m["step"], m["loss"]) for m in metrics.read_metrics(f"{run}/metrics.jsonl")] == [
        (1, 1.0), (2, 0.5), (3, 0.5),
    ]  # fmt: skip


def test_a_tf_data_position_saves_to_and_restores_from_gcs(gcs, tmp_path, monkeypatch):
    """TensorFlow writes into a local staging folder (its GCS client is never given a URL)."""
    from parti_jax.data import pipeline
    from parti_jax.tasks import register_shapes_task

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    register_shapes_task("gcsshapes", num_examples={"train": 12})
    make = lambda: pipeline.make_pixels_iterator("gcsshapes_pixels", batch_size=2, num_threads=2)  # noqa: E731
    it = make()
    next(it)
    prefix = gcs.url("data", "shard_0_of_1")
    assert it.save(prefix) == prefix
    assert [n.split(".")[-1] for n in gcs.objects("data")] == [
        "data-00000-of-00001",
        "index",
        "json",
    ]
    expected = [next(it)["image"] for _ in range(3)]
    restored = make()
    restored.restore(prefix)
    for want in expected:
        np.testing.assert_array_equal(next(restored)["image"], want)
    # The staging folders went (tf.function leaves its generated __autograph_ modules).
    assert [n for n in local_leftovers(scratch) if not n.startswith("__autograph_")] == []
