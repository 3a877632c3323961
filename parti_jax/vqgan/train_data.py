"""Pixel batches and image grids for VQGAN training (TensorFlow-free).

- `SyntheticImagesIterator`: coloured rectangles and discs on a plain
  background, every row a pure function of (seed, step, global row), with a
  saved/restored position: the trainer's smoke-test data without TensorFlow.
- `PixelsIterator`: wraps a pixel iterator (e.g. `make_pixels_iterator`'s)
  so only `image` reaches the device, keeping its `save` / `restore`.
- `image_grid` / `write_png`: inputs above reconstructions, as a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parti_jax.train.data_position import StepPositionIterator


class SyntheticImagesIterator(StepPositionIterator):
    """`next(it)` -> {'image': float32 [B, S, S, 3] in [0, 1]}; `save` / `restore` its position.

    Each image: a random background colour and 1-3 random rectangles or discs
    in random colours. Rows are functions of (seed, step, global row index),
    so 1 host x 8 devices and 2 hosts x 4 devices see the same global batch.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        shard_index: int = 0,
        num_shards: int = 1,
        seed: int = 0,
    ) -> None:
        """`batch_size` is the host-local batch (global batch / num_shards)."""
        self.batch_size = batch_size
        self.image_size = image_size
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.seed = seed
        self.step = 0

    def _image(self, global_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.step, global_index])
        s = self.image_size
        image = np.empty((s, s, 3), np.float32)
        image[:] = rng.uniform(0.0, 1.0, 3)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.2 * s, 0.8 * s, 2)
            half = rng.uniform(0.1 * s, 0.3 * s)
            if rng.integers(2):
                mask = (np.abs(xx - cx) < half) & (np.abs(yy - cy) < half)
            else:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < half**2
            image[mask] = rng.uniform(0.0, 1.0, 3)
        return image

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.shard_index * self.batch_size
        images = np.stack([self._image(start + i) for i in range(self.batch_size)])
        self.step += 1
        return {"image": images}

    def _description(self) -> dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "seed": self.seed,
        }


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


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stacks image batches as rows of a grid: uint8 [R*(H+pad)+pad, N*(W+pad)+pad, 3]."""
    n, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, batch in enumerate(rows):
        pixels = np.round(np.clip(np.asarray(batch, np.float32), 0.0, 1.0) * 255.0)
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = pixels[i].astype(np.uint8)
    return grid


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes uint8 [H, W, 3] as a PNG (atomically: a temp file, then a rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
