"""`shapes_pixels`: the embedded shapes world as a SeqIO task.

Examples come from `parti_jax.data.shapes.generate_example(index, split, seed,
config)`, a pure function, so the task is lazy (nothing is stored), endless in
principle and finite by choice: each split has a configurable number of
examples (indices 0..n-1). Shuffling permutes the indices with the pipeline
seed, then the task's shuffle buffer mixes further.

Features: image uint8 [R, R, 3], text (the caption), inputs (caption tokens
with EOS), text_truncated, index.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from parti_jax.data import features, preprocessors, shapes

DEFAULT_NUM_EXAMPLES = {"train": 100_000, "validation": 1_000, "heldout": 1_000}


def register_shapes_task(
    name: str = "shapes",
    *,
    num_examples: Mapping[str, int] | None = None,
    world_seed: int = 0,
    config: shapes.ShapesWorldConfig | None = None,
    image_size: int | None = None,
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 1000,
) -> seqio.Task:
    """Registers `<name>_pixels` over the shapes world.

    Args:
      name: task prefix; the task is `<name>_pixels`.
      num_examples: examples per split ('train', 'validation', 'heldout');
        default DEFAULT_NUM_EXAMPLES.
      world_seed: which world (the `seed` of generate_example); the pipeline
        seed only shuffles.
      config: the world (resolution, colours, held-out pairs, ...).
      image_size: resize (centre crop) to this side; default the world's resolution.
      vocab_path: SentencePiece model; default the shipped shapes vocabulary.
      shuffle_buffer_size: the task's shuffle buffer.
    """
    config = config or shapes.ShapesWorldConfig()
    num_examples = dict(num_examples or DEFAULT_NUM_EXAMPLES)
    for split in num_examples:
        if split not in shapes.SPLITS:
            raise ValueError(f"shapes split {split!r} unknown; expected {list(shapes.SPLITS)}")
    resolution = config.resolution

    def _generate(index: np.int64, split: bytes):
        example = shapes.generate_example(int(index), split.decode(), world_seed, config)
        return example.image, example.caption.encode("utf-8")

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        count = num_examples[split]
        ds = tf.data.Dataset.range(count)
        if shuffle_files:
            ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)

        @tf.autograph.experimental.do_not_convert
        def load(index):
            image, text = tf.numpy_function(
                _generate, [index, split], [tf.uint8, tf.string], stateful=False
            )
            image.set_shape([resolution, resolution, 3])
            text.set_shape([])
            return {"image": image, "text": text, "index": index}

        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)

    steps = [preprocessors.tokenize_text]
    if image_size is not None and image_size != resolution:
        steps.insert(
            0,
            seqio.utils.add_kwargs_to_transform(
                preprocessors.center_crop_image, image_size=image_size
            ),
        )
    return features.add_task(
        f"{name}_pixels",
        source=seqio.FunctionDataSource(
            dataset_fn, splits=list(num_examples), num_input_examples=num_examples
        ),
        output_features=features.pixel_output_features(features.text_vocabulary(vocab_path)),
        preprocessors=steps,
        shuffle_buffer_size=max(1, min(shuffle_buffer_size, max(num_examples.values()))),
    )


register_shapes_task()
