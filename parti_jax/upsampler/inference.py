"""A trained upsampler for sampling (made by `loading.load_upsampler` or a bundle) and its
record file; jax and the model only (no orbax, no TensorFlow)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.model import Upsampler

PyTree = Any
Array = jax.Array
META_FILE = "upsampler_meta.json"  # the record `parti-jax train-upsampler` writes


@dataclasses.dataclass(frozen=True)
class LoadedUpsampler:
    """A trained upsampler: config, generator parameters (host numpy) and its records."""

    config: UpsamplerConfig
    params: PyTree
    meta: dict[str, Any]  # upsampler_meta.json
    step: int | None
    checkpoint: str | None  # the `<workdir>/checkpoints/<step>` directory restored
    meta_path: str

    @property
    def codebook_hash(self) -> str | None:
        """Hash of the codebook of the VQGAN whose reconstructions it was trained on."""
        return self.meta.get("codebook_hash")

    def make_upsample_fn(self) -> Callable[[PyTree, Array], Array]:
        """jitted (params, images [B, n, n, 3]) -> clipped [B, n*s, n*s, 3]."""
        model = Upsampler(self.config)
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method=Upsampler.upsample))
