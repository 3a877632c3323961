"""`coco_captions_pixels`: COCO 2014 (Karpathy splits) from TFDS `coco_captions`.

One example per IMAGE with one of its ~5 captions drawn at random (a stateless
per-example draw from the pipeline seed, so it is reproducible and
checkpointable): an epoch visits every image once, which is what VQGAN
training wants. `register_coco_task(..., caption_mode="all")` instead yields
one example per caption (each image ~5 times, adjacent before the shuffle
buffer), e.g. to precompute codes for every caption.

Splits: train, validation (TFDS 'val'), test, restval. Images are resized
(shorter side) and centre-cropped to `image_size` (256), or randomly cropped
with `random_crop=True`. The data must have been prepared with TFDS
(`tfds build coco_captions`); nothing is downloaded at registration.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from parti_jax.data import features, preprocessors

TFDS_NAME = "coco_captions/2014:1.1.0"
SPLITS = {"train": "train", "validation": "val", "test": "test", "restval": "restval"}


def _drop_uncaptioned(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.filter(
        tf.autograph.experimental.do_not_convert(lambda ex: tf.size(ex["captions"]["text"]) > 0)
    )


def _every_caption(dataset: tf.data.Dataset) -> tf.data.Dataset:
    @tf.autograph.experimental.do_not_convert
    def expand(ex):
        texts = tf.data.Dataset.from_tensor_slices(ex["captions"]["text"])
        return texts.map(lambda text: {"image": ex["image"], "text": text, "id": ex["image/id"]})

    return dataset.flat_map(expand)


@seqio.map_over_dataset(num_seeds=1)
@tf.autograph.experimental.do_not_convert
def _random_caption(ex, seed):
    texts = ex["captions"]["text"]
    pick = tf.random.stateless_uniform(
        [], seed=tf.stack(seed), minval=0, maxval=tf.size(texts), dtype=tf.int32
    )
    return {"image": ex["image"], "text": texts[pick], "id": ex["image/id"]}


def register_coco_task(
    name: str = "coco_captions",
    *,
    image_size: int = 256,
    caption_mode: str = "random",
    random_crop: bool = False,
    tfds_name: str = TFDS_NAME,
    tfds_data_dir: str | None = None,
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 1000,
) -> seqio.Task:
    """Registers `<name>_pixels` over TFDS COCO captions.

    Args:
      caption_mode: "random" (one example per image, a random caption) or
        "all" (one example per caption).
      random_crop: random instead of centre crop (stateless per-example seed).
    """
    if caption_mode not in ("random", "all"):
        raise ValueError(f"caption_mode must be 'random' or 'all', got {caption_mode!r}")
    pick = _random_caption if caption_mode == "random" else _every_caption
    crop = preprocessors.random_crop_image if random_crop else preprocessors.center_crop_image
    return features.add_task(
        f"{name}_pixels",
        source=seqio.TfdsDataSource(
            tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=SPLITS
        ),
        output_features=features.pixel_output_features(features.text_vocabulary(vocab_path)),
        preprocessors=[
            _drop_uncaptioned,
            pick,
            functools.partial(crop, image_size=image_size),
            preprocessors.tokenize_text,
        ],
        shuffle_buffer_size=shuffle_buffer_size,
    )


register_coco_task()
