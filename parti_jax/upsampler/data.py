"""Training pairs for the upsampler: targets, their downsamples, the VQGAN's reconstructions.

A target x (output resolution) is area-downsampled by the upsampler's scale;
`ReconstructionPairs` adds the VQGAN's reconstruction of that downsample
(what the upsampler sees at sampling time), keeping the data position of the
target source (`save` / `restore`) for the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def area_downsample(images: Any, factor: int) -> Any:
    """[B, H, W, C] -> [B, H/f, W/f, C] by averaging f x f blocks (numpy or jax)."""
    b, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"area_downsample: {h}x{w} images do not divide by factor {factor}")
    xp = np if isinstance(images, np.ndarray) else jnp
    return xp.mean(images.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))


def bicubic_upsample(images: Array, factor: int) -> Array:
    """[B, h, w, C] -> [B, h*f, w*f, C] bicubic (the baseline the upsampler must beat)."""
    b, h, w, c = images.shape
    return jax.image.resize(images, (b, h * factor, w * factor, c), method="bicubic")


class ReconstructionPairs:
    """{'image': targets} batches -> {'image', 'reconstruction'}: the VQGAN's view of each target.

    `reconstruct_fn(low_res float32 [B, h, w, 3]) -> float32 [B, h, w, 3]`
    (None: no 'reconstruction'; the step then uses clean downsamples). The
    data position is the wrapped iterator's (`save`/`restore` pass through),
    and reconstructions are a deterministic function of the batch.
    """

    def __init__(
        self,
        source: Iterator[Mapping[str, np.ndarray]],
        *,
        output_size: int,
        scale: int,
        reconstruct_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        where: str = "the data",
    ) -> None:
        self.source = source
        self.output_size = output_size
        self.scale = scale
        self.reconstruct_fn = reconstruct_fn
        self.where = where
        if callable(getattr(source, "save", None)):
            self.save = source.save
            self.restore = source.restore

    def __iter__(self) -> ReconstructionPairs:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.source)
        if "image" not in batch:
            raise ValueError(f"{self.where}: batches have {sorted(batch)}, expected an 'image' key")
        images = np.asarray(batch["image"], np.float32)
        n = self.output_size
        if images.ndim != 4 or images.shape[1:] != (n, n, 3):
            raise ValueError(
                f"{self.where}: images have shape {images.shape[1:]} but the upsampler's output "
                f"is {n}x{n}x3 (UpsamplerConfig.input_size * scale); give a task at {n}px or "
                "change UpsamplerConfig.input_size"
            )
        out = {"image": images}
        if self.reconstruct_fn is not None:
            low = area_downsample(images, self.scale)
            out["reconstruction"] = np.asarray(self.reconstruct_fn(low), np.float32)
        return out
