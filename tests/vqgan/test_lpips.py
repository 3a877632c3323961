"""LPIPS with the shipped VGG16/AlexNet weights, and the restricted unpickler that loads them."""

from __future__ import annotations

import io
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import data, transform

from parti_jax.vqgan.lpips import (
    RestrictedUnpickler,
    load_lpips_params,
    load_weights_pickle,
    make_lpips_fn,
)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Two real photos (astronaut, cat) at 64x64, float32 in [0, 1]."""
    out = [
        transform.resize(img, (64, 64), anti_aliasing=True)
        for img in (data.astronaut(), data.chelsea())
    ]
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module", params=["vgg16", "alexnet"])
def lpips_fn(request):
    return jax.jit(make_lpips_fn(request.param))


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"VGG16_0": _Exploit(str(marker))})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_weights_pickle(payload)
    assert not marker.exists()
    for module, name in [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")]:
        evil = f"c{module}\n{name}\n(S'1'\ntR.".encode()
        with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
            RestrictedUnpickler(io.BytesIO(evil)).load()


def test_accepts_numeric_arrays_only():
    good = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    out = load_weights_pickle(pickle.dumps(good))
    np.testing.assert_array_equal(out["a"]["kernel"], good["a"]["kernel"])
    with pytest.raises(ValueError, match="dtype object"):
        load_weights_pickle(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(ValueError, match="expected dicts of arrays"):
        load_weights_pickle(pickle.dumps({"a": [1, 2]}))


def test_weights_structure():
    vgg = load_lpips_params("vgg16")["params"]
    assert len(vgg["trunk"]) == 13
    assert vgg["trunk"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
    assert [vgg[f"lin_{j}"].shape[2] for j in range(5)] == [64, 128, 256, 512, 512]
    alex = load_lpips_params("alexnet")["params"]
    assert alex["trunk"]["Conv_0"]["kernel"].shape == (11, 11, 3, 64)
    assert [alex[f"lin_{j}"].shape[2] for j in range(5)] == [64, 192, 384, 256, 256]
    # The learned heads are non-negative weights, as published.
    assert all(float(jnp.min(vgg[f"lin_{j}"])) >= 0 for j in range(5))
    with pytest.raises(ValueError, match="not one of"):
        load_lpips_params("resnet")


def test_identity_symmetry_and_blur_vs_noise(lpips_fn, photos):
    rng = np.random.default_rng(0)
    noisy = np.clip(photos + rng.normal(0, 0.03, photos.shape), 0, 1).astype(np.float32)
    blurred = np.stack([ndimage.gaussian_filter(p, sigma=(1.5, 1.5, 0)) for p in photos])
    np.testing.assert_allclose(lpips_fn(photos, photos), 0.0, atol=1e-6)
    d_noise, d_blur = np.asarray(lpips_fn(photos, noisy)), np.asarray(lpips_fn(photos, blurred))
    np.testing.assert_allclose(lpips_fn(noisy, photos), d_noise, rtol=1e-5)
    assert d_noise.shape == (2,) and np.all(d_noise > 0)
    # Blur (sigma 1.5 px) destroys structure the slight noise (std 0.03) leaves intact.
    assert np.all(d_blur > d_noise), (d_blur, d_noise)


def test_gradient_is_finite(photos):
    fn = make_lpips_fn("alexnet")
    flat = np.full_like(photos, 0.5)  # constant images: many all-zero feature vectors
    grads = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, photos))))(jnp.asarray(flat))
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads).sum()) > 0
