"""precompute-codes: shards + meta, byte-identical after an interruption, resume checks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import seqio

from parti_jax.data import codes as codes_lib
from parti_jax.data import pipeline
from parti_jax.vqgan.precompute import precompute_codes, shard_name
from parti_jax.vqgan.tokenizer import ImageTokenizer
from tests.vqgan.test_tokenizer import train_tiny

NUM_TRAIN = 37


@pytest.fixture(scope="module")
def task():
    import parti_jax.tasks

    return parti_jax.tasks.register_shapes_task(
        "precompute_test", num_examples={"train": NUM_TRAIN, "validation": 6}, image_size=16
    )


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vqgan")
    train_tiny(workdir, num_steps=1)
    return workdir


def run(vqgan_dir, task, out, **kw):
    kw.setdefault("shard_size", 10)
    kw.setdefault("batch_size", 8)
    return precompute_codes(
        vqgan=str(vqgan_dir), task=task, output_dir=str(out), progress=False, **kw
    )


def shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tfrecord"))}


@pytest.fixture(scope="module")
def full_run(vqgan_dir, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "full"
    return out, run(vqgan_dir, task, out)


def test_writes_shards_and_meta(vqgan_dir, task, full_run):
    out, result = full_run
    assert result.status == "done" and result.examples_written == NUM_TRAIN
    meta = codes_lib.load_codes_meta(str(out))
    assert meta["num_examples"] == NUM_TRAIN
    assert [s["path"] for s in meta["shards"]] == [shard_name(0, i) for i in range(4)]
    assert [s["count"] for s in meta["shards"]] == [10, 10, 10, 7]
    tok = ImageTokenizer.load(vqgan_dir)
    assert meta["codebook_hash"] == tok.codebook_hash and meta["grid"] == [4, 4]
    assert meta["vqgan_step"] == 1 and meta["vqgan_checkpoint"].endswith("checkpoints/1")
    assert (meta["source_task"], meta["split"], meta["image_size"]) == (
        "precompute_test_pixels",
        "train",
        16,
    )
    tok.check_codes_meta(meta)
    # The codes are the tokenizer's codes of the task's images, in the task's order.
    batch = next(
        pipeline.make_pixels_iterator(
            task, batch_size=NUM_TRAIN, shuffle=False, repeat=False, drop_remainder=False
        )
    )
    records = list(codes_lib.read_codes(str(out)))
    assert len({r.id for r in records}) == NUM_TRAIN
    assert [r.text for r in records] == list(batch["text"])
    expected = tok.encode(batch["image"]).reshape(NUM_TRAIN, -1)
    np.testing.assert_array_equal(np.stack([r.image_codes for r in records]), expected)
    again = run(vqgan_dir, task, out)
    assert again.status == "already_done" and again.examples_written == 0


def test_interrupted_run_gives_identical_shards(vqgan_dir, task, full_run, tmp_path):
    full_dir, _ = full_run
    out = tmp_path / "resumed"
    first = run(vqgan_dir, task, out, max_shards=1)
    assert first.status == "stopped" and first.meta is None
    assert not (out / codes_lib.META_FILE).exists()
    assert list(shard_bytes(out)) == [shard_name(0, 0)]
    # A crash in the middle of shard 1 leaves its partial file behind.
    (out / (shard_name(0, 1) + codes_lib.INCOMPLETE_SUFFIX)).write_bytes(b"garbage")
    second = run(vqgan_dir, task, out, batch_size=4)  # other batch boundaries, same codes
    assert second.status == "done" and second.shards_skipped == 1
    assert second.examples_written == NUM_TRAIN - 10
    assert shard_bytes(out) == shard_bytes(full_dir)
    meta, ref = (json.loads((d / codes_lib.META_FILE).read_text()) for d in (out, full_dir))
    assert meta == ref
    assert not list(out.glob("*" + codes_lib.INCOMPLETE_SUFFIX))


def test_resume_with_other_settings_is_refused(vqgan_dir, task, tmp_path):
    out = tmp_path / "codes"
    run(vqgan_dir, task, out, max_shards=1)
    with pytest.raises(ValueError, match=r"shard_size: earlier run 10, now 12"):
        run(vqgan_dir, task, out, shard_size=12)
    with pytest.raises(ValueError, match=r"no split 'heldout'"):
        run(vqgan_dir, task, tmp_path / "other", split="heldout")
    # A mixture is refused, naming the field (its tasks are encoded one by one).
    mixture = seqio.Mixture("precompute_test_mixture", [task], default_rate=1.0)
    with pytest.raises(ValueError, match=r"precompute_codes.task='precompute_test_mixture' is a"):
        run(vqgan_dir, mixture, tmp_path / "mixed")


def test_cli(vqgan_dir, task, tmp_path):
    del task
    out = tmp_path / "cli_codes"
    args = [
        sys.executable, "-m", "parti_jax", "precompute-codes",
        "--gin.precompute_codes.task=@register_shapes_task()",
        "--gin.register_shapes_task.name='precompute_cli'",
        "--gin.register_shapes_task.num_examples={'train': 9, 'validation': 5}",
        "--gin.register_shapes_task.image_size=16",
        "--gin.precompute_codes.shard_size=4",
        f"--vqgan={vqgan_dir}", f"--output_dir={out}", "--split=train", "--split=validation",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split, n in (("train", 9), ("validation", 5)):
        meta = codes_lib.load_codes_meta(str(out / split))
        assert meta["split"] == split and meta["num_examples"] == n
    assert "train: 9 examples in 3 shard(s)" in proc.stdout
    bad = subprocess.run(args[:9] + [f"--vqgan={tmp_path}", f"--output_dir={tmp_path / 'x'}"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "vqgan_meta.json: not found" in bad.stderr
