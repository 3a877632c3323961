"""Image decoding, resize/crop, text tokenization with counted truncation, dropout, offsets."""

import io

import numpy as np
import pytest
import seqio
import skimage.data
import tensorflow as tf
from PIL import Image

from parti_jax.data import features, preprocessors


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def chelsea():
    return skimage.data.chelsea()  # 300 x 451 RGB, CC0


def test_decode_formats(chelsea):
    rgb = Image.fromarray(chelsea)
    out = preprocessors.decode_image_rgb(_encode(rgb, "PNG"))
    np.testing.assert_array_equal(out, chelsea)

    gray = preprocessors.decode_image_rgb(_encode(rgb.convert("L"), "PNG"))
    assert gray.shape == chelsea.shape and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])

    cmyk = preprocessors.decode_image_rgb(_encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == chelsea.shape
    assert np.abs(cmyk.astype(int) - chelsea.astype(int)).mean() < 8

    # 16-bit grayscale: 65535 -> 255, 257 * v -> v.
    gray16 = skimage.data.camera().astype(np.uint16) * 257
    out = preprocessors.decode_image_rgb(_encode(Image.fromarray(gray16), "PNG"))
    np.testing.assert_array_equal(out[..., 1], skimage.data.camera())

    # 16-bit RGB (48-bit PNG written by TensorFlow).
    rgb16 = tf.io.encode_png(chelsea.astype(np.uint16) * 257).numpy()
    np.testing.assert_array_equal(preprocessors.decode_image_rgb(rgb16), chelsea)


def test_rgba_is_composited_on_white(chelsea):
    rgba = np.dstack([chelsea, np.full(chelsea.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # fully transparent corner
    rgba[20, 20, 3] = 128  # half transparent pixel
    out = preprocessors.decode_image_rgb(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out[:10, :10] == 255).all()
    np.testing.assert_array_equal(out[100:, 100:], chelsea[100:, 100:])
    expected = np.round(chelsea[20, 20].astype(float) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(out[20, 20].astype(int) - expected).max() <= 1


def test_bad_images_name_the_source(chelsea):
    with pytest.raises(preprocessors.ImageDecodeError, match=r"cat\.png: image file is empty"):
        preprocessors.decode_image_rgb(b"", source="cat.png")
    with pytest.raises(preprocessors.ImageDecodeError, match=r"cat\.txt: cannot decode image"):
        preprocessors.decode_image_rgb(b"this is not an image", source="cat.txt")
    truncated = _encode(Image.fromarray(chelsea), "JPEG")[:2000]
    with pytest.raises(preprocessors.ImageDecodeError, match=r"cut\.jpg: cannot decode.*truncated"):
        preprocessors.decode_image_rgb(truncated, source="cut.jpg")
    png = _encode(Image.fromarray(chelsea), "PNG")
    with pytest.raises(preprocessors.ImageDecodeError, match=r"cut\.png"):
        preprocessors.decode_image_rgb(png[: len(png) // 2], source="cut.png")


def test_resize_and_crop(chelsea):
    image = tf.constant(chelsea)
    centre = preprocessors.resize_and_crop(image, 64)
    assert centre.shape == (64, 64, 3) and centre.dtype == tf.uint8
    a = preprocessors.resize_and_crop(image, 64, seed=tf.constant([1, 2]))
    b = preprocessors.resize_and_crop(image, 64, seed=tf.constant([1, 2]))
    np.testing.assert_array_equal(a, b)
    crops = {
        preprocessors.resize_and_crop(image, 64, seed=tf.constant([s, 0])).numpy().tobytes()
        for s in range(8)
    }
    assert len(crops) > 1, "random crops of a wide image never moved"
    # Tall images keep their full width.
    tall = preprocessors.resize_and_crop(tf.transpose(image, [1, 0, 2]), 32)
    assert tall.shape == (32, 32, 3)


@pytest.fixture(scope="module")
def text_features():
    return {"inputs": features.text_feature(features.text_vocabulary())}


def _run(ds):
    return list(ds.as_numpy_iterator())


def test_tokenize_counts_truncations(text_features):
    vocabulary = text_features["inputs"].vocabulary
    long = " ".join(["a big red circle above a small blue square"] * 40)
    assert len(vocabulary.encode(long)) > 200
    ds = tf.data.Dataset.from_tensor_slices({"text": ["a red circle", long, ""]})
    out = _run(preprocessors.tokenize_text(ds, text_features, {"inputs": 128}))
    short, cut, empty = out
    assert short["text_truncated"] == 0 and short["inputs"][-1] == 1
    assert list(short["inputs"][:-1]) == vocabulary.encode("a red circle")
    assert cut["text_truncated"] == 1 and len(cut["inputs"]) == 128 and cut["inputs"][-1] == 1
    assert list(cut["inputs"][:-1]) == vocabulary.encode(long)[:127]
    assert empty["text_truncated"] == 0 and list(empty["inputs"]) == [1]  # the empty prompt
    assert (
        len(_run(preprocessors.tokenize_text(ds, text_features, {"inputs": 16}))[0]["inputs"]) <= 16
    )


def _dropout_mask(rate, seed, n=400):
    ds = tf.data.Dataset.from_tensor_slices({"inputs": np.full([n, 5], 7, np.int32)})
    with seqio.utils.map_seed_manager(seed):
        ds = preprocessors.conditioning_dropout(ds, rate=rate)
    dropped = ds.map(lambda ex: tf.reduce_all(tf.equal(ex["inputs"], [1]))).batch(n)
    return next(iter(dropped)).numpy()


def test_conditioning_dropout():
    assert not _dropout_mask(0.0, seed=1).any()
    half = _dropout_mask(0.5, seed=1)
    # Binomial(400, 0.5): sd 10; 4 sd either side.
    assert 160 <= half.sum() <= 240
    np.testing.assert_array_equal(half, _dropout_mask(0.5, seed=1))
    assert (half != _dropout_mask(0.5, seed=2)).any()
    assert _dropout_mask(1.0, seed=3).all()


def test_offset_image_codes():
    ds = tf.data.Dataset.from_tensor_slices({"image_codes": np.array([[0, 5, 15]], np.int32)})
    (out,) = _run(preprocessors.offset_image_codes(ds))
    assert list(out["targets"]) == [1, 6, 16]
