"""Checkpointable, host-sharded iterators; the input benchmark."""

import numpy as np
import pytest

from parti_jax.data import pipeline
from parti_jax.data.benchmark_input import benchmark_input
from parti_jax.tasks import register_codes_task, register_shapes_task
from tests.data.data_testing import write_codes_folder


def _write_unique_codes(path, num_shards=3, per_shard=8):
    """Codes whose first two entries identify the example: (shard, index)."""
    from parti_jax.data import codes

    for s in range(num_shards):
        with codes.CodesShardWriter(
            str(path), f"shard-{s:05d}.tfrecord", codebook_size=32, grid=(1, 4)
        ) as w:
            for i in range(per_shard):
                w.write(f"{s}-{i}", "a red circle " * (1 + i % 3), [s, i, 0, 0])
    codes.finalize_codes_meta(
        str(path),
        codebook_size=32,
        grid=(1, 4),
        codebook_hash="h",
        image_size=8,
        vqgan_checkpoint="v",
        vqgan_step=0,
        source_task="t",
        split="train",
    )


@pytest.fixture(scope="module")
def codes_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    _write_unique_codes(root)
    register_codes_task("unique", str(root))
    return "unique_codes"


def _ids(batches):
    return [tuple(row[:2] - 1) for b in batches for row in b["decoder_target_tokens"]]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_codes_save_restore_continues_exactly(codes_task, tmp_path):
    kwargs = dict(batch_size=4, seed=3, conditioning_dropout_rate=0.3, num_threads=2)
    it = pipeline.make_codes_iterator(codes_task, **kwargs)
    for _ in range(5):  # k batches: past the first epoch of 24 examples
        next(it)
    path = str(tmp_path / "checkpoints" / "5" / "data" / "shard_0_of_1")
    it.save(path)
    stats_at_save = it.stats
    expected = [next(it) for _ in range(6)]  # m batches
    restored = pipeline.make_codes_iterator(codes_task, **kwargs)
    restored.restore(path)
    assert restored.stats == stats_at_save
    _assert_same_batches([next(restored) for _ in range(6)], expected)
    assert restored.stats == it.stats and it.stats["examples"] == 44
    # Dropout made some prompts [EOS] and kept others.
    eos_only = [
        (row[0] == 1 and not row[1:].any()) for b in expected for row in b["encoder_input_tokens"]
    ]
    assert 0 < sum(eos_only) < len(eos_only)


def test_pixels_save_restore_continues_exactly(tmp_path):
    register_shapes_task("ckptshapes", num_examples={"train": 12})
    it = pipeline.make_pixels_iterator("ckptshapes_pixels", batch_size=2, seed=0, num_threads=2)
    for _ in range(3):
        next(it)
    it.save(str(tmp_path / "data" / "shard_0_of_1"))
    expected = [next(it) for _ in range(4)]
    restored = pipeline.make_pixels_iterator(
        "ckptshapes_pixels", batch_size=2, seed=0, num_threads=2
    )
    restored.restore(str(tmp_path / "data" / "shard_0_of_1"))
    _assert_same_batches([next(restored) for _ in range(4)], expected)


def test_restore_refuses_another_layout(codes_task, tmp_path):
    it = pipeline.make_codes_iterator(codes_task, batch_size=2, shard_index=1, num_shards=2)
    next(it)
    it.save(str(tmp_path / "pos"))
    other = pipeline.make_codes_iterator(codes_task, batch_size=2, shard_index=1, num_shards=4)
    with pytest.raises(pipeline.DataPositionMismatch, match=r"num_shards: saved 2, now 4"):
        other.restore(str(tmp_path / "pos"))
    with pytest.raises(FileNotFoundError, match="no saved data position"):
        other.restore(str(tmp_path / "nothing"))


def test_order_is_a_function_of_the_seed(codes_task):
    def first(seed):
        it = pipeline.make_codes_iterator(codes_task, batch_size=4, seed=seed)
        return _ids([next(it) for _ in range(4)])

    assert first(7) == first(7)
    assert first(7) != first(8)


@pytest.mark.parametrize("num_shards", [2, 4])  # 3 files: file-level, then example-level sharding
def test_host_shards_identical_and_disjoint(codes_task, num_shards):
    def read(index, shuffle):
        it = pipeline.make_codes_iterator(
            codes_task,
            batch_size=1,
            shard_index=index,
            num_shards=num_shards,
            shuffle=shuffle,
            repeat=False,
            seed=5,
        )
        return _ids(list(it))

    shards = [read(i, shuffle=True) for i in range(num_shards)]
    assert read(0, shuffle=True) == shards[0]
    for i in range(num_shards):
        for j in range(i + 1, num_shards):
            assert set(shards[i]).isdisjoint(shards[j])
    assert sorted(x for s in shards for x in s) == sorted(
        (s, i) for s in range(3) for i in range(8)
    )


def test_function_source_shards_are_disjoint():
    register_shapes_task("shardshapes", num_examples={"train": 12})
    seen = []
    for index in range(2):
        it = pipeline.make_pixels_iterator(
            "shardshapes_pixels",
            batch_size=1,
            shard_index=index,
            num_shards=2,
            repeat=False,
            seed=1,
        )
        seen.append({b["image"].tobytes() + b["text"][0].encode() for b in it})
    assert len(seen[0]) == len(seen[1]) == 6 and seen[0].isdisjoint(seen[1])


def test_truncations_are_counted(tmp_path):
    write_codes_folder(tmp_path, num_shards=1, per_shard=4)
    register_codes_task("short_text", str(tmp_path))
    it = pipeline.make_codes_iterator(
        "short_text_codes", batch_size=4, feature_lengths={"inputs": 3}, shuffle=False
    )
    batch = next(it)
    assert batch["encoder_input_tokens"].shape == (4, 3)
    assert (batch["encoder_input_tokens"][:, -1] == 1).all()  # cut, EOS kept
    assert it.stats == {"examples": 4, "text_truncated": 4, "skipped_at_read": 0}


def test_benchmark_input_reports(codes_task):
    result = benchmark_input(
        codes_task, "train", batch_size=4, num_batches=2, warmup_batches=1, num_threads=2
    )
    assert result["benchmark"] == "input_pipeline" and result["task"] == codes_task
    assert result["batch_size"] == 4 and result["num_batches"] == 2
    for key in (
        "seconds",
        "examples_per_s",
        "batches_per_s",
        "batch_seconds_median",
        "tokens_per_s",
    ):
        assert isinstance(result[key], float) and result[key] > 0
    assert isinstance(result["text_truncated"], int) and isinstance(result["tensorflow"], str)


def test_a_tf_data_assertion_comes_back_as_written():
    """TensorFlow C-escapes an assertion's text (quotes, backslashes); the one-line error
    the user sees is the message as written, non-ASCII file names included."""
    import tensorflow as tf

    message = "ü/caps.jsonl: line 6: \"caption\" is not valid (lone surrogate '\\ud800')"

    def check(x):
        tf.debugging.Assert(tf.equal(x, tf.constant(5, tf.int64)), [tf.constant(message)])
        return x

    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(tf.data.Dataset.range(1).map(check))
    assert pipeline._clean_error(error.value) == message
