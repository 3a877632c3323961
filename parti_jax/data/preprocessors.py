"""Preprocessors shared by the SeqIO tasks: images, text tokens (docs/DESIGN.md §3 "Token
ids"), image codes.

Images are decoded in Python with PIL (it reads what people actually have on
disk: grayscale, palette, RGBA, CMYK JPEGs, 16-bit PNGs) and resized / cropped
with TensorFlow ops. Everything random (crops, conditioning dropout) takes a
per-example stateless seed from `seqio.map_over_dataset(num_seeds=1)`, so a
pipeline is a pure function of its seed and its tf.data iterator can be
checkpointed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

TEXT_LENGTH = 128
TEXT_TRUNCATED = "text_truncated"


class ImageDecodeError(ValueError):
    """An image file that cannot be turned into an RGB array."""


# ------------------------------------------------------------ image decoding
def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scales 16-bit / 32-bit integer and float pixel arrays to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":  # mode "F": assume [0, 1] floats
        return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    # PIL reads 16-bit grayscale PNGs as "I;16*" or "I" (int32 holding 0..65535).
    # Mode "I" can in principle hold other ranges; values above 65535 are clipped.
    wide = np.clip(array.astype(np.int64), 0, 65535)
    return np.round(wide / 257.0).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as uint8 RGB [H, W, 3].

    Grayscale and palette images are expanded; CMYK is converted by PIL
    (Adobe-inverted CMYK JPEGs are handled by its decoder); 16-bit images are
    scaled to 8 bits (v / 257); images with alpha (RGBA, LA, palette with a
    transparent colour) are composited on WHITE, so transparent backgrounds
    look like paper rather than turning black. EXIF orientation is applied.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:  # defensive: some plugins give 16-bit RGB
        array = _to_uint8(array)
    return array


def decode_image_rgb(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes (any format PIL reads) to uint8 RGB [H, W, 3].

    Raises:
      ImageDecodeError naming `source` for empty, truncated or undecodable data.
    """
    if not data:
        raise ImageDecodeError(f"{source}: image file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # forces a full decode: truncated files fail here
            array = pil_to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, UnidentifiedImageError):  # its message is a BytesIO's repr
            reason = "no image format PIL knows"
        raise ImageDecodeError(
            f"{source}: cannot decode image ({reason}); "
            "the file is truncated, corrupt or not an image"
        ) from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"{source}: decoded to an empty image of shape {array.shape}")
    return np.ascontiguousarray(array)


# ------------------------------------------------------------ resize and crop
def resize_and_crop(image: tf.Tensor, size: int, *, seed: tf.Tensor | None = None) -> tf.Tensor:
    """uint8 [H, W, 3] -> shorter side `size` (antialiased bilinear), then a size x size
    crop: centred, or random with `seed`.

    `seed` is a stateless seed (shape [2]); the crop offset is a pure function
    of it, so restoring a checkpointed iterator reproduces the crop.
    """
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.minimum(height, width)
    new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
    image = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    if seed is None:
        shape = tf.shape(image)
        top = (shape[0] - size) // 2
        left = (shape[1] - size) // 2
        image = image[top : top + size, left : left + size]
    else:
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=seed)
    image.set_shape([size, size, 3])
    return image


@seqio.map_over_dataset
@tf.autograph.experimental.do_not_convert
def center_crop_image(example: Mapping[str, tf.Tensor], *, image_size: int) -> dict:
    """Task preprocessor: `image` -> uint8 [image_size, image_size, 3], centre crop."""
    example = dict(example)
    example["image"] = resize_and_crop(example["image"], image_size)
    return example


@seqio.map_over_dataset(num_seeds=1)
@tf.autograph.experimental.do_not_convert
def random_crop_image(example: Mapping[str, tf.Tensor], seed, *, image_size: int) -> dict:
    """Task preprocessor: `image` -> uint8 [image_size, image_size, 3], random crop."""
    example = dict(example)
    example["image"] = resize_and_crop(example["image"], image_size, seed=tf.stack(seed))
    return example


# ------------------------------------------------------------ text
def tokenize_text(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
) -> tf.data.Dataset:
    """Tokenizes `text` into `inputs` (int32, EOS appended) and counts truncations.

    The caption keeps at most `sequence_length["inputs"] - 1` pieces (128 by
    default) so the EOS always fits. `text_truncated` is 1 when pieces were
    dropped: a counted, not a silent, truncation (the iterator reports the sum).
    """
    feature = output_features["inputs"]
    vocabulary = feature.vocabulary
    max_length = (sequence_length or {}).get("inputs") or TEXT_LENGTH
    eos_id = vocabulary.eos_id
    keep = max_length - 1 if feature.add_eos else max_length

    @tf.autograph.experimental.do_not_convert
    def _tokenize(example):
        example = dict(example)
        ids = tf.cast(vocabulary.encode_tf(example["text"]), tf.int32)
        example[TEXT_TRUNCATED] = tf.cast(tf.size(ids) > keep, tf.int32)
        ids = ids[:keep]
        if feature.add_eos:
            ids = tf.concat([ids, tf.constant([eos_id], tf.int32)], axis=0)
        example["inputs"] = ids
        return example

    return dataset.map(_tokenize, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset(num_seeds=1)
@tf.autograph.experimental.do_not_convert
def conditioning_dropout(
    example: Mapping[str, tf.Tensor], seed, *, rate: float, eos_id: int = 1
) -> dict:
    """Replaces the text tokens by the empty prompt `[EOS]` with probability `rate`.

    Trains the unconditional model used by classifier-free guidance. The draw
    is stateless (per-example seed), hence reproducible after a restore.
    """
    example = dict(example)
    if rate <= 0.0:
        return example
    drop = tf.random.stateless_uniform([], seed=tf.stack(seed)) < rate
    tokens = example["inputs"]
    example["inputs"] = tf.cond(drop, lambda: tf.constant([eos_id], tokens.dtype), lambda: tokens)
    return example


# ------------------------------------------------------------ image codes
@seqio.map_over_dataset
@tf.autograph.experimental.do_not_convert
def offset_image_codes(example: Mapping[str, tf.Tensor]) -> dict:
    """`targets` = codes + 1: id 0 stays free for padding / BOS (docs/DESIGN.md §3)."""
    return {**example, "targets": tf.cast(example["image_codes"], tf.int32) + 1}
