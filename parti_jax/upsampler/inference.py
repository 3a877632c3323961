"""A trained upsampler for sampling: its record and the jitted upsample function.

Light on purpose: jax, flax and the model only, no training code, orbax or
TensorFlow, so the inference bundle (`parti_jax.bundle`) can use it. Loading
a train-upsampler work directory (`load_upsampler`, orbax) stays in
`parti_jax.upsampler.train`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.model import Upsampler

PyTree = Any
Array = jax.Array
META_FILE = "upsampler_meta.json"


class UpsamplerLoadError(ValueError):
    """A work directory that holds no usable upsampler (no meta, no checkpoint)."""


def make_upsample_fn(config: UpsamplerConfig) -> Callable[[PyTree, Array], Array]:
    """jitted (params, images [B, n, n, 3]) -> clipped [B, n*s, n*s, 3]."""
    model = Upsampler(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=Upsampler.upsample))


def abstract_params(config: UpsamplerConfig) -> PyTree:
    """The generator's parameter shapes (unboxed `jax.ShapeDtypeStruct`s); nothing allocated."""
    import flax.linen as nn

    low = jax.ShapeDtypeStruct((1, config.input_size, config.input_size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(Upsampler(config).init, jax.random.key(0), low))["params"]


@dataclasses.dataclass(frozen=True)
class LoadedUpsampler:
    """A trained upsampler: config, generator parameters (host numpy) and its records."""

    config: UpsamplerConfig
    params: PyTree
    meta: dict[str, Any]
    step: int | None
    checkpoint: str | None  # the `<workdir>/checkpoints/<step>` directory restored
    meta_path: str

    @property
    def codebook_hash(self) -> str | None:
        """Hash of the codebook of the VQGAN whose reconstructions it was trained on."""
        return self.meta.get("codebook_hash")

    def make_upsample_fn(self) -> Callable[[PyTree, Array], Array]:
        """jitted (params, images [B, n, n, 3]) -> clipped [B, n*s, n*s, 3]."""
        return make_upsample_fn(self.config)


def read_upsampler_meta(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(meta, meta path) of an upsampler work directory, with a clear error if absent."""
    meta_path = Path(path).expanduser() / META_FILE
    if not meta_path.is_file():
        raise UpsamplerLoadError(
            f"{path}: not an upsampler work directory (no {META_FILE}); pass the --workdir "
            "of `parti-jax train-upsampler`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UpsamplerLoadError(f"{meta_path}: not valid JSON ({e})") from None
    if "upsampler_config" not in meta:
        raise UpsamplerLoadError(f"{meta_path}: no 'upsampler_config'; rewrite it by training")
    return meta, str(meta_path)
