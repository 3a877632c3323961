"""Training pairs for the upsampler: targets, their downsamples, the VQGAN's reconstructions.

A target x (output resolution) is area-downsampled by the upsampler's scale;
`ReconstructionPairs` adds the VQGAN's reconstruction of that downsample
(what the upsampler sees at sampling time). `ShapesPixelsIterator` is the
built-in, TensorFlow-free source of targets: the shapes world drawn at any
size from 32 to 1024 pixels. Iterators keep a checkpointable data position
(`save` / `restore`) for the shared training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.train.data_position import StepPositionIterator

Array = jax.Array
# The built-in, TensorFlow-free pixel source: the shapes world drawn at the output size.
SHAPES_WORLD = "shapes_world"
_EVAL_SEED_OFFSET = 1_000_003


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


class ShapesPixelsIterator(StepPositionIterator):
    """Shapes-world images drawn at `image_size`, no TensorFlow: {'image' float32 [B, S, S, 3]}.

    Row r of batch t on shard i is example (t * batch_size + r) * num_shards + i
    of `split` (the world's scenes are already random per index). The position
    is checkpointable (`save`/`restore`, JSON), like the trainers' iterators.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        split: str = "train",
        shard_index: int = 0,
        num_shards: int = 1,
        seed: int = 0,
    ) -> None:
        from parti_jax.data import shapes

        self._shapes = shapes
        self.config = shapes.ShapesWorldConfig(resolution=image_size)
        self.batch_size = batch_size
        self.split = split
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.seed = seed
        self.step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.step * self.batch_size
        images = []
        for r in range(first, first + self.batch_size):
            index = r * self.num_shards + self.shard_index
            example = self._shapes.generate_example(index, self.split, self.seed, self.config)
            images.append(example.image)
        self.step += 1
        return {"image": np.stack(images).astype(np.float32) / 255.0}

    def _description(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "image_size": self.config.resolution,
            "split": self.split,
            "shard": [self.shard_index, self.num_shards],
            "seed": self.seed,
        }


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


def make_target_source(
    *,
    task: Any,
    data_factory: Callable[..., Iterator] | None,
    image_size: int,
    batch_size: int,
    shard_index: int,
    num_shards: int,
    seed: int,
    split: str,
) -> Iterator:
    """Host-local {'image': targets} batches at `image_size` from a data_factory, the
    built-in shapes world ('shapes_world' or None) or a seqio `<name>_pixels` task."""
    train = split == "train"
    if data_factory is not None:
        return data_factory(
            batch_size=batch_size,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed,
            split=split,
        )
    if task is None or task == SHAPES_WORLD:
        return ShapesPixelsIterator(
            batch_size=batch_size,
            image_size=image_size,
            split=split,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed if train else seed + _EVAL_SEED_OFFSET,
        )
    from parti_jax.data import pipeline  # TensorFlow: only for seqio pixel tasks

    return pipeline.make_pixels_iterator(
        task,
        batch_size=batch_size,
        split=split,
        image_size=image_size,
        shard_index=shard_index,
        num_shards=num_shards,
        seed=seed,
        shuffle=train,
        repeat=train,
    )
