"""SeqIO tasks: shapes, codes, COCO (TFDS mock data), PartiPrompts, mixtures, registration."""

import importlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import parti_jax.tasks
from parti_jax.data import features, pipeline, shapes
from parti_jax.tasks import (
    register_coco_task,
    register_codes_task,
    register_mixture,
    register_shapes_task,
)
from tests.data.data_testing import write_codes_folder


@pytest.fixture(scope="module")
def vocabulary():
    return features.text_vocabulary()


def test_shapes_pixels_task(vocabulary):
    register_shapes_task("tinyshapes", num_examples={"train": 16, "validation": 8, "heldout": 8})
    task = seqio.get_mixture_or_task("tinyshapes_pixels")
    assert set(task.splits) == {"train", "validation", "heldout"}
    first = next(
        task.get_dataset({"inputs": 128}, split="heldout", shuffle=False).as_numpy_iterator()
    )
    expected = shapes.generate_example(0, "heldout")
    np.testing.assert_array_equal(first["image"], expected.image)
    assert first["text"].decode() == expected.caption
    assert list(first["inputs"]) == vocabulary.encode(expected.caption) + [1]

    it = pipeline.make_pixels_iterator(
        "tinyshapes_pixels",
        batch_size=4,
        split="heldout",
        image_size=64,
        shuffle=False,
        repeat=False,
    )
    batches = list(it)
    assert len(batches) == 2
    assert batches[0]["image"].shape == (4, 64, 64, 3) and batches[0]["image"].dtype == np.float32
    np.testing.assert_allclose(batches[0]["image"][0], expected.image / 255.0, atol=1e-6)
    assert list(batches[1]["text"]) == [
        shapes.generate_example(i, "heldout").caption for i in range(4, 8)
    ]

    register_shapes_task("smallshapes", num_examples={"train": 4}, image_size=32)
    small = next(pipeline.make_pixels_iterator("smallshapes_pixels", batch_size=2, image_size=32))
    assert small["image"].shape == (2, 32, 32, 3)


def test_codes_task_batches_are_offset(tmp_path, vocabulary):
    written = write_codes_folder(
        tmp_path / "train", num_shards=2, per_shard=6, codebook_size=16, grid=(2, 3)
    )
    write_codes_folder(
        tmp_path / "validation", num_shards=1, per_shard=4, split="validation", seed=1
    )
    task = register_codes_task("tiny", str(tmp_path), codebook_size=16, grid=(2, 3))
    assert set(task.splits) == {"train", "validation"}
    assert task.output_features["targets"].vocabulary.vocab_size == 17
    assert task.output_features["targets"].add_eos is False
    assert pipeline.num_image_tokens("tiny_codes") == 6

    it = pipeline.make_codes_iterator("tiny_codes", batch_size=4, shuffle=False, repeat=False)
    batches = list(it)
    assert len(batches) == 3
    batch = batches[0]
    assert set(batch) == set(features.CODES_BATCH_KEYS)
    assert (
        batch["encoder_input_tokens"].shape == (4, 128)
        and batch["encoder_input_tokens"].dtype == np.int32
    )
    assert (
        batch["decoder_target_tokens"].shape == (4, 6)
        and batch["decoder_target_tokens"].dtype == np.int32
    )
    assert (
        batch["decoder_loss_weights"].dtype == np.float32
        and (batch["decoder_loss_weights"] == 1).all()
    )
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    expected = sorted(tuple(c + 1) for _, c in written.values())
    assert sorted(map(tuple, targets)) == expected  # every code offset by +1, none lost
    assert targets.min() >= 1
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)  # BOS
    np.testing.assert_array_equal(
        batch["decoder_input_tokens"][:, 1:], batch["decoder_target_tokens"][:, :-1]
    )
    for row in batch["encoder_input_tokens"]:
        n = int(np.count_nonzero(row))
        assert row[n - 1] == 1 and not row[n:].any()  # EOS then padding
    decoded = {
        vocabulary.decode([int(t) for t in row if t > 1])
        for b in batches
        for row in b["encoder_input_tokens"]
    }
    assert decoded <= {t for t, _ in written.values()}
    assert it.stats == {"examples": 12, "text_truncated": 0, "skipped_at_read": 0}

    with pytest.raises(
        ValueError,
        match=r"train/codes_meta\.json: codes do not match: codebook_size 16 != expected 8192",
    ):
        register_codes_task("wrong", str(tmp_path), codebook_size=8192)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="empty: no codes_meta.json here or in its subfolders"
    ):
        register_codes_task("none", str(tmp_path / "empty"))


def test_feature_converter_rejects_unoffset_and_partial_targets():
    ds = tf.data.Dataset.from_tensors(
        {
            "inputs": tf.constant([5, 1]),
            "targets": tf.constant([0, 3, 4]),
            "text_truncated": tf.constant(0),
        }
    )
    # Static shapes fail while building the pipeline, dynamic ones when iterating.
    with pytest.raises(tf.errors.InvalidArgumentError, match="offset by \\+1"):
        next(iter(features.ImageCodesFeatureConverter()(ds, {"inputs": 4, "targets": 3})))
    with pytest.raises(tf.errors.InvalidArgumentError, match="full grid of 5 codes"):
        next(iter(features.ImageCodesFeatureConverter()(ds, {"inputs": 4, "targets": 5})))


def test_coco_task_with_mock_data():
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        it = pipeline.make_pixels_iterator(
            "coco_captions_pixels", batch_size=2, image_size=256, shuffle=False, repeat=False
        )
        batches = list(it)
        per_image = sum(len(b["text"]) for b in batches)
        assert batches[0]["image"].shape == (2, 256, 256, 3)
        assert all(isinstance(t, str) for b in batches for t in b["text"])
        register_coco_task("coco_every", image_size=32, caption_mode="all")
        all_captions = list(
            pipeline.make_pixels_iterator(
                "coco_every_pixels", batch_size=1, shuffle=False, repeat=False, split="validation"
            )
        )
        raw = tfds.load("coco_captions/2014:1.1.0", split="val")
        expected = sum(int(tf.size(ex["captions"]["text"])) for ex in raw)
    assert 1 <= per_image <= 4
    assert len(all_captions) == expected
    assert all_captions[0]["image"].shape == (1, 32, 32, 3)


def test_parti_prompts_task(vocabulary):
    task = seqio.get_mixture_or_task("parti_prompts")
    assert list(task.splits) == ["test"]
    ds = task.get_dataset({"inputs": 128}, split="test", shuffle=False)
    first = next(ds.as_numpy_iterator())
    assert first["text"] == b"bond" and list(first["inputs"]) == vocabulary.encode("bond") + [1]
    keys = ("text", "category", "challenge", "note", "index")
    rows = next(iter(ds.map(lambda ex: {k: ex[k] for k in keys}).batch(5000).as_numpy_iterator()))
    texts = [t.decode() for t in rows["text"]]
    assert len(texts) == 1632
    assert len(set(rows["category"])) == 12 and len(set(rows["challenge"])) == 11
    assert list(rows["index"]) == list(range(1632))
    assert sum(t.startswith('"G I G G L E"') for t in texts) == 1
    assert sum(t != t.strip() for t in texts) == 10
    assert rows["note"][0] == b"Biology-inspired concepts with multiple meanings"


def test_mixture_rates(tmp_path):
    write_codes_folder(tmp_path / "a", num_shards=2, per_shard=8, fill=0)
    write_codes_folder(tmp_path / "b", num_shards=2, per_shard=8, fill=1)
    register_codes_task("mix_a", str(tmp_path / "a"))
    register_codes_task("mix_b", str(tmp_path / "b"))
    register_mixture("mix_ab", [("mix_a_codes", 3.0), ("mix_b_codes", 1.0)])
    it = pipeline.make_codes_iterator("mix_ab", batch_size=50, seed=0)
    first = np.concatenate([next(it)["decoder_target_tokens"][:, 0] for _ in range(8)])
    assert set(first) == {1, 2}
    # 400 draws at p = 0.75: sd 8.7, accept 4 sd.
    assert 265 <= int((first == 1).sum()) <= 335
    # A mixture's position (sample_from_datasets state included) restores exactly.
    it.save(str(tmp_path / "pos"))
    expected = [next(it) for _ in range(2)]
    restored = pipeline.make_codes_iterator("mix_ab", batch_size=50, seed=0)
    restored.restore(str(tmp_path / "pos"))
    for a, b in zip(expected, [next(restored) for _ in range(2)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="'missing_codes' is not registered"):
        register_mixture("bad_mix", [("missing_codes", 1.0)])


def test_registration_is_idempotent():
    for module in (parti_jax.tasks.shapes, parti_jax.tasks.coco, parti_jax.tasks.parti_prompts):
        importlib.reload(module)
    importlib.reload(parti_jax.tasks)
    for name in ("shapes_pixels", "coco_captions_pixels", "parti_prompts"):
        assert name in seqio.TaskRegistry.names()


def test_task_factories_are_gin_callable():
    import gin
    from parti_jax.cli import configurables

    configurables.register_all()
    with gin.unlock_config():
        gin.parse_config(
            "register_shapes_task.name = 'ginshapes'\n"
            "register_shapes_task.num_examples = {'train': 4}\n"
        )
    try:
        task = gin.get_configurable("register_shapes_task")()
    finally:
        gin.clear_config()
    assert task.name == "ginshapes_pixels" and task.num_input_examples("train") == 4
