"""ImageTokenizer: load a train-vqgan work directory, encode/decode, compatibility checks, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from parti_jax.train.checkpoints import CheckpointError
from parti_jax.vqgan.tokenizer import ImageTokenizer, load_vqgan_meta
from parti_jax.vqgan.train_data import SyntheticImagesIterator
from tests.vqgan.vqgan_testing import TINY, train_tiny


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vqgan")
    train_tiny(workdir)
    return workdir


@pytest.fixture(scope="module")
def tokenizer(vqgan_dir):
    return ImageTokenizer.load(vqgan_dir)


@pytest.fixture(scope="module")
def images():
    return next(SyntheticImagesIterator(batch_size=13, image_size=16, seed=3))["image"]


def test_meta_and_properties(vqgan_dir, tokenizer):
    meta = load_vqgan_meta(vqgan_dir)
    assert meta["step"] == 2 and meta["codebook_size"] == 64 and meta["grid"] == [4, 4]
    assert meta["image_size"] == 16 and meta["config"] == json.loads(
        json.dumps(dataclasses.asdict(TINY))
    )
    assert tokenizer.config == TINY
    m = tokenizer.meta
    assert m["codebook_hash"] == meta["codebook_hash"] == meta["codebook_hashes"]["2"]
    assert m["step"] == 2 and m["checkpoint"].endswith("checkpoints/2")
    assert (m["codebook_size"], m["grid"], m["image_size"]) == (64, [4, 4], 16)


def test_encode_decode_shapes_and_ranges(tokenizer, images):
    codes = tokenizer.encode(images)
    assert codes.shape == (13, 4, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 64
    out = tokenizer.decode(codes)
    assert out.shape == (13, 16, 16, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # flat [B, h*w] codes decode the same; uint8 images encode like their float version
    np.testing.assert_array_equal(tokenizer.decode(codes.reshape(13, 16)), out)
    as_uint8 = np.round(images * 255).astype(np.uint8)
    np.testing.assert_array_equal(tokenizer.encode(as_uint8), tokenizer.encode(as_uint8 / 255.0))


def test_encode_is_deterministic_and_batch_size_independent(vqgan_dir, tokenizer, images):
    codes = tokenizer.encode(images)
    np.testing.assert_array_equal(tokenizer.encode(images), codes)
    np.testing.assert_array_equal(tokenizer.encode(images[:3]), codes[:3])
    np.testing.assert_array_equal(tokenizer.encode(images[7:8]), codes[7:8])
    small = ImageTokenizer.load(vqgan_dir, batch_size=8)  # 13 rows: chunks of 8, last padded
    assert small.chunk_size(13) == 8
    np.testing.assert_array_equal(small.encode(images), codes)
    np.testing.assert_array_equal(small.decode(codes), tokenizer.decode(codes))


def test_bad_input_errors_name_the_mismatch(tokenizer, images):
    codes = tokenizer.encode(images[:2])
    with pytest.raises(ValueError, match=r"max 70\b.*K=64"):
        tokenizer.decode(np.where(codes == codes[0, 0, 0], 70, codes))
    with pytest.raises(ValueError, match=r"range over \[-1"):
        tokenizer.decode(np.minimum(codes, 0) - 1)
    with pytest.raises(ValueError, match=r"shape \(2, 5, 5\).*grid is 4x4"):
        tokenizer.decode(np.zeros((2, 5, 5), np.int32))
    with pytest.raises(ValueError, match=r"shape \(2, 32, 32, 3\).*\[B, 16, 16, 3\]"):
        tokenizer.encode(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"image values range over .*divide uint8 pixels by 255"):
        tokenizer.encode(images[:2] * 255.0)


def test_check_codes_meta(tokenizer):
    good = {"codebook_size": 64, "grid": [4, 4], "codebook_hash": tokenizer.codebook_hash}
    tokenizer.check_codes_meta(good)
    with pytest.raises(
        ValueError,
        match=f"codebook_hash 0123456789abcdef != this VQGAN's {tokenizer.codebook_hash}",
    ):
        tokenizer.check_codes_meta(dict(good, codebook_hash="0123456789abcdef"))
    with pytest.raises(
        ValueError,
        match=r"codebook_size 512 != this VQGAN's 64.*grid \[8, 8\] != this VQGAN's \[4, 4\]",
    ):
        tokenizer.check_codes_meta(dict(good, codebook_size=512, grid=[8, 8]))


def test_load_errors(vqgan_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="vqgan_meta.json"):
        ImageTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match=r"VQGANConfig.codebook_size: checkpoint 64, given 128"):
        ImageTokenizer.load(vqgan_dir, config=dataclasses.replace(TINY, codebook_size=128))
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        ImageTokenizer.load(vqgan_dir, step=7)
    # A meta whose config disagrees with the checkpoint (a wrong size, or a part the
    # checkpoint lacks): the parameter is named, and the fix fits loading (not restore_from).
    meta = json.loads((vqgan_dir / "vqgan_meta.json").read_text())
    for field, value, found in (
        ("decoder_mlp_dim", 48, r"\S+ is of shape \(64,\) there but has shape \(48,\)"),
        ("decoder_depth", 2, r"\S+ is missing there"),
    ):
        forged = tmp_path / field
        forged.mkdir()
        (forged / "checkpoints").symlink_to(vqgan_dir / "checkpoints")
        (forged / "vqgan_meta.json").write_text(
            json.dumps(meta | {"config": meta["config"] | {field: value}})
        )
        with pytest.raises(
            ValueError, match=f"vqgan_meta.json: .* parameter generator/{found}"
        ) as e:
            ImageTokenizer.load(forged)
        assert "restore_from" not in str(e.value) and "train-vqgan work directory" in str(e.value)
