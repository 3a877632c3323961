"""Output features of the tasks, registration, the sources' base, and the feature converter
that makes the batches of docs/DESIGN.md §3 "Batches" (`CODES_BATCH_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from parti_jax.data.preprocessors import TEXT_TRUNCATED

CODES_BATCH_KEYS = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
_FeatureSpec = seqio.FeatureConverter.FeatureSpec


# ------------------------------------------------------------ output features
def text_vocabulary(vocab_path: str | None = None) -> seqio.Vocabulary:
    """The caption vocabulary: `vocab_path`, default the shipped shapes SentencePiece model."""
    from parti_jax.data import vocab as vocab_lib

    return vocab_lib.get_seqio_vocabulary(vocab_path or vocab_lib.default_vocab_path())


def text_feature(vocabulary: seqio.Vocabulary) -> seqio.Feature:
    """Caption tokens: SentencePiece ids with EOS."""
    return seqio.Feature(vocabulary=vocabulary, add_eos=True)


def pixel_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Features of every `<name>_pixels` task: image (uint8 HxWx3), text, inputs."""
    passthrough = seqio.PassThroughVocabulary(size=0, eos_id=None)
    return {
        "image": seqio.Feature(passthrough, add_eos=False, dtype=tf.uint8, rank=3),
        "text": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=0),
        "inputs": text_feature(vocabulary),
    }


def codes_output_features(
    vocabulary: seqio.Vocabulary, codebook_size: int
) -> dict[str, seqio.Feature]:
    """Features of every `<name>_codes` task: inputs (text ids), targets (ids 1..K: codes + 1
    in a vocabulary of K + 1, no EOS)."""
    targets = seqio.PassThroughVocabulary(size=codebook_size + 1, eos_id=None)
    return {"inputs": text_feature(vocabulary), "targets": seqio.Feature(targets, add_eos=False)}


# ------------------------------------------------------------ registration
def add_task(name: str, **kwargs) -> seqio.Task:
    """`seqio.TaskRegistry.add` that replaces an existing task of the same name.

    Registration modules run at import and register factories may be called
    again with new arguments (a test, a notebook re-run); neither should fail
    with "duplicate provider".
    """
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **kwargs)


# ---------------------------------------------------- bad examples at read time
def checked_example(example: dict, problem: tf.Tensor, skip_bad_examples: bool):
    """Inside a `map`: an example whose reader returned `problem` ('' when good). Failing,
    the pipeline stops through an assertion carrying the message (one line, not a traceback
    from inside numpy_function); skipping, it returns (example, ok) for `drop_bad_examples`."""
    ok = tf.equal(problem, "")
    if skip_bad_examples:
        return example, ok
    with tf.control_dependencies([tf.debugging.Assert(ok, [problem])]):
        return {k: tf.identity(v) for k, v in example.items()}


def drop_bad_examples(ds: tf.data.Dataset, skip_bad_examples: bool) -> tf.data.Dataset:
    """After a `map` of `checked_example`: drops the bad examples when skipping them."""
    if not skip_bad_examples:
        return ds
    ok = tf.autograph.experimental.do_not_convert(lambda example, ok: ok)
    example = tf.autograph.experimental.do_not_convert(lambda example, ok: example)
    return ds.filter(ok).map(example)


class HostShardedSource(seqio.DataSource):
    """A seqio data source that splits its examples among any number of hosts itself.

    Subclasses implement `read`: one pass over this host's share of a split
    (the pipeline repeats and batches; tasks apply the sequence lengths).
    """

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        return self.read(split, shuffle=shuffle, seed=seed, shard_index=index, num_shards=count)

    def read(
        self, split: str, *, shuffle: bool, seed: int | None, shard_index: int, num_shards: int
    ) -> tf.data.Dataset:
        """Host `shard_index` of `num_shards`'s examples of `split`, shuffled with `seed`."""
        raise NotImplementedError


# ------------------------------------------------------------ feature converter
class ImageCodesFeatureConverter(seqio.EncDecFeatureConverter):
    """Task features {inputs, targets} -> the 4 batch keys: seqio's
    `EncDecFeatureConverter(pack=False)` (image targets are a whole grid each) with
    float32 loss weights, a check that every target row is a full grid of offset codes,
    and the scalar `text_truncated` passed through (the pipeline pops and sums it).
    """

    MODEL_FEATURES = {
        "encoder_input_tokens": _FeatureSpec(dtype=tf.int32),
        "decoder_target_tokens": _FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": _FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": _FeatureSpec(dtype=tf.float32),
    }

    def __init__(self) -> None:
        super().__init__(
            pack=False,
            # Lengths are enforced here (full target grids) and by the tokenizer.
            apply_length_check=False,
            passthrough_features={TEXT_TRUNCATED: _FeatureSpec(dtype=tf.int32, rank=0)},
        )

    def __call__(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        # text_truncated is rank-0: its length is never checked.
        return super().__call__(ds, {TEXT_TRUNCATED: 1, **task_feature_lengths})

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        num_image_tokens = task_feature_lengths["targets"]

        @tf.autograph.experimental.do_not_convert
        def _check_targets(example):
            targets = example["targets"]
            checks = [
                tf.debugging.assert_equal(
                    tf.size(targets),
                    num_image_tokens,
                    message=f"image targets must be a full grid of {num_image_tokens} "
                    "codes (feature_lengths['targets'] = h * w of the codes)",
                ),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(targets),
                    1,
                    message="image target id 0 found: codes must be offset by +1 "
                    "(preprocessors.offset_image_codes)",
                ),
            ]
            with tf.control_dependencies(checks):
                example = dict(example)
                example["targets"] = tf.identity(targets)
            return example

        text_length = task_feature_lengths["inputs"]

        @tf.autograph.experimental.do_not_convert
        def _convert(features):
            # Unpacked rows only, so seqio's trim_and_pad / make_autoregressive_inputs
            # reduce to a pad and a shift (written out: no autograph tracing cost).
            inputs = features["inputs"][:text_length]
            inputs = tf.pad(inputs, [[0, text_length - tf.size(inputs)]])
            inputs.set_shape([text_length])
            targets = tf.reshape(features["targets"], [num_image_tokens])
            converted = {
                "encoder_input_tokens": inputs,
                "decoder_target_tokens": targets,
                "decoder_input_tokens": tf.concat(
                    [tf.constant([self.bos_id], tf.int32), targets[:-1]], axis=0
                ),
                "decoder_loss_weights": tf.cast(tf.not_equal(targets, 0), tf.float32),
            }
            converted.update({k: features[k] for k in self._passthrough_features})
            return converted

        ds = ds.map(_check_targets, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.map(_convert, num_parallel_calls=tf.data.AUTOTUNE)
