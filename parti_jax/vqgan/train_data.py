"""Pixel batches and image grids for the VQGAN and upsampler trainers.

- `pixel_source`: where training images come from (a data_factory, the
  built-in synthetic images or shapes world, or a seqio `<name>_pixels` task).
- `PixelsIterator`: wraps a pixel iterator so only a checked float32 `image`
  reaches the device, keeping its `save` / `restore`.
- `image_grid` / `write_png`: inputs above reconstructions, as a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parti_jax.train.synthetic import ShapesPixelsIterator, SyntheticImagesIterator

SYNTHETIC, SHAPES_WORLD = "synthetic", "shapes_world"  # the built-in pixel sources


def pixel_source(
    task: Any,
    data_factory: Callable[..., Iterator] | None,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    shard_index: int,
    num_shards: int,
    seed: int,
    drop_remainder: bool = True,
) -> Iterator[Mapping[str, Any]]:
    """Host-local {'image': [B, S, S, 3]} batches: from `data_factory`, the built-in
    'synthetic' images or 'shapes_world' (no TensorFlow; other splits get other seeds), or
    a registered seqio `<name>_pixels` task (shuffled and repeated for 'train')."""
    kw = dict(batch_size=batch_size, shard_index=shard_index, num_shards=num_shards)
    train = split == "train"
    if data_factory is not None:
        return data_factory(**kw, seed=seed, split=split)
    if task in (SYNTHETIC, SHAPES_WORLD):
        seed = seed if train else seed + 1_000_003
        if task == SYNTHETIC:
            return SyntheticImagesIterator(**kw, image_size=image_size, seed=seed)
        return ShapesPixelsIterator(**kw, image_size=image_size, split=split, seed=seed)
    from parti_jax.data import pipeline  # TensorFlow: only for seqio tasks

    return pipeline.make_pixels_iterator(
        task,
        **kw,
        split=split,
        image_size=image_size,
        seed=seed,
        shuffle=train,
        repeat=train,
        drop_remainder=drop_remainder,
    )


class PixelsIterator:
    """Yields {'image': float32 [B, S, S, 3]} from a pixel iterator; keeps save / restore.

    The image side is checked on every batch (the error names both shapes).
    """

    def __init__(self, inner: Iterator[Mapping[str, Any]], image_size: int) -> None:
        self.inner = inner
        self.image_size = image_size
        if not callable(getattr(inner, "save", None)):
            # No data position to checkpoint: the Checkpointer sees no `save`
            # and a resumed run starts the data from its beginning (it warns).
            self.save = self.restore = None

    def __iter__(self) -> PixelsIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.inner)
        if "image" not in batch:
            raise ValueError(
                f"the data iterator's batch has keys {sorted(batch)}, no 'image'; VQGAN training "
                "reads a `<name>_pixels` task (or a data_factory yielding {'image': ...})"
            )
        image = np.asarray(batch["image"])
        s = self.image_size
        if image.ndim != 4 or image.shape[1:] != (s, s, 3):
            raise ValueError(
                f"image batch has shape {tuple(image.shape)} but VQGANConfig.image_size={s} "
                f"expects [B, {s}, {s}, 3]; register the task with image_size={s} or change "
                "VQGANConfig.image_size"
            )
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / np.float32(255.0)
        return {"image": image.astype(np.float32, copy=False)}

    def save(self, path: str) -> Any:
        return self.inner.save(path)

    def restore(self, path: str) -> None:
        self.inner.restore(path)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes uint8 [H, W, 3] as a PNG (atomically: a temp file, then a rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
