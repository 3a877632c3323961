"""Inception-v3 as used for FID (pytorch-fid / clean-fid's `pt_inception-2015-12-05`), in Flax.

TensorFlow's 2015-12-05 Inception graph that the original FID code used, as
ported by pytorch-fid (`FIDInceptionV3`). It differs from torchvision's in its
weights and in four blocks: in Mixed_5b-d, 6b-e and 7b the pooling branch
averages without counting zero padding (TF's avg-pool), and in Mixed_7c it is
a 3x3 *max* pool. Features are the 2048-d "pool3" output. Input: [B, H, W, 3]
in [0, 1] (uint8 is divided by 255), resized to 299 bilinearly as torch's
`F.interpolate(align_corners=False)` does, then scaled to [-1, 1].

Weights: a `.npz` keyed by pytorch-fid's state_dict names (`fc.*`, `AuxLogits.*`
and `*.num_batches_tracked` left out) in torch layout, e.g.
`Conv2d_1a_3x3.conv.weight` (32, 3, 3, 3) or `Mixed_5b.branch1x1.bn.running_var`
(64,); `expected_params()` lists every key and shape. Every conv has no bias and
is followed by BatchNorm (eps 1e-3) and ReLU. scripts/convert_fid_inception.py
makes the file where torch and the official weights exist.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = jax.Array
IMAGE_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
# The torch state_dict suffix of each variable of a BasicConv: (collection, layer, leaf).
TORCH_NAMES = {
    ("params", "conv", "kernel"): "conv.weight",
    ("params", "bn", "scale"): "bn.weight",
    ("params", "bn", "bias"): "bn.bias",
    ("batch_stats", "bn", "mean"): "bn.running_mean",
    ("batch_stats", "bn", "var"): "bn.running_var",
}


class WeightsError(ValueError):
    """The Inception weights file is missing keys, has extra keys or misshaped arrays."""


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (running statistics, eps 1e-3) + ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        padding = [(p, p) for p in self.padding]
        x = nn.Conv(self.features, self.kernel, self.strides, padding, use_bias=False, name="conv")(
            x
        )
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: Array) -> Array:
    """3x3 stride-1 average pool that ignores the zero padding (TF's avg-pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


def _split_conv(x: Array, name: str) -> Array:
    """A 1x3 and a 3x1 conv side by side (`<name>a`, `<name>b`), inside InceptionE."""
    a = BasicConv(384, (1, 3), padding=(0, 1), name=f"{name}a")(x)
    return jnp.concatenate([a, BasicConv(384, (3, 1), padding=(1, 0), name=f"{name}b")(x)], -1)


class InceptionE(nn.Module):
    """`pool="avg"`: FIDInceptionE_1 (Mixed_7b); `pool="max"`: FIDInceptionE_2 (Mixed_7c)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = _split_conv(BasicConv(384, (1, 1), name="branch3x3_1")(x), "branch3x3_2")
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _split_conv(bd, "branch3x3dbl_3")
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_images(images: Array, size: int = IMAGE_SIZE) -> Array:
    """Bilinear resize to size x size as torch's `F.interpolate(..., align_corners=False)`:
    no antialiasing (jax.image.resize's default), so downscaling samples as pytorch-fid does."""
    if images.shape[1:3] == (size, size):
        return images
    shape = (images.shape[0], size, size, images.shape[3])
    return jax.image.resize(images, shape, "bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] (float32)."""

    resize_input: bool = True

    @nn.compact
    def __call__(self, images: Array) -> Array:
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_images(x)
        x = 2.0 * x - 1.0
        x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@functools.cache
def expected_params() -> dict[str, tuple[int, ...]]:
    """Every key of the weights .npz and its shape, in torch's names and layout: the
    variables of `FIDInceptionV3` (computed once, nothing allocated)."""
    images = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(FIDInceptionV3(resize_input=False).init, jax.random.key(0), images)
    table = {}
    for (collection, *modules, layer, leaf), x in traverse_util.flatten_dict(shapes).items():
        shape = tuple(x.shape)
        if len(shape) == 4:  # flax (kH, kW, I, O) -> torch (O, I, kH, kW)
            shape = (shape[3], shape[2], shape[0], shape[1])
        table[".".join([*modules, TORCH_NAMES[(collection, layer, leaf)]])] = shape
    return table


def check_arrays(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Raises WeightsError naming every missing, extra or misshaped key (vs expected_params)."""
    expected = expected_params()
    problems = []
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}")
    if extra:
        problems.append(
            f"{len(extra)} extra key(s): {', '.join(extra[:10])} "
            "(leave out fc.* and *.num_batches_tracked)"
        )
    for key in sorted(set(expected) & set(arrays)):
        shape = tuple(np.shape(arrays[key]))
        if shape != expected[key]:
            problems.append(f"key {key} has shape {shape}, expected {expected[key]}")
        elif not np.issubdtype(np.asarray(arrays[key]).dtype, np.floating):
            problems.append(f"key {key} has dtype {arrays[key].dtype}, expected a float type")
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems))


def torch_state_to_npz_arrays(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A pytorch-fid state_dict (as numpy arrays) -> the .npz's arrays (float32, torch layout)."""
    arrays = {
        key: np.asarray(value, dtype=np.float32)
        for key, value in state.items()
        if not key.startswith(("fc.", "AuxLogits.")) and not key.endswith(".num_batches_tracked")
    }
    check_arrays(arrays, "state_dict")
    return arrays


def validate_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Checks a weights .npz against `expected_params()`; returns its arrays (float32)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such Inception weights file; make one with "
            "scripts/convert_fid_inception.py"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except Exception as e:  # zipfile/pickle/format errors all mean "not our npz"
        raise WeightsError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    check_arrays(arrays, str(path))
    return {k: v.astype(np.float32, copy=False) for k, v in arrays.items()}


def params_from_arrays(arrays: dict[str, np.ndarray]) -> dict:
    """Torch-named arrays -> Flax variables {'params': ..., 'batch_stats': ...}."""
    flax_names = {torch: flax for flax, torch in TORCH_NAMES.items()}
    flat = {}
    for key, value in arrays.items():
        module, layer, leaf = key.rsplit(".", 2)
        collection, _, flax_leaf = flax_names[f"{layer}.{leaf}"]
        if layer == "conv":
            value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        flat[(collection, *module.split("."), layer, flax_leaf)] = value
    return traverse_util.unflatten_dict(flat)


def load_params(path: str | os.PathLike) -> dict:
    """Validates and loads a weights .npz as Flax variables for FIDInceptionV3; cached per
    (path, size, mtime), so several suites in one process read it once."""
    path = Path(path)
    if not path.is_file():
        validate_npz(path)  # raises the "no such file" error
    stat = path.stat()
    return _load_params_cached((str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _load_params_cached(key: tuple[str, int, int]) -> dict:
    return jax.tree.map(jnp.asarray, params_from_arrays(validate_npz(key[0])))


@functools.partial(jax.jit, static_argnames=("resize_input",))
def _features(variables: dict, images: Array, resize_input: bool = True) -> Array:
    return FIDInceptionV3(resize_input=resize_input).apply(variables, images)


def inception_features(variables: dict, images: np.ndarray | Array) -> Array:
    """pool3 features [B, 2048] for images [B, H, W, 3] in [0, 1] (uint8 is scaled by 1/255)."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}")
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return _features(variables, images.astype(jnp.float32))
