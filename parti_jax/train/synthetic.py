"""Counter-driven training batches without TensorFlow: synthetic codes and images, shapes pixels.

Every row of a global batch is a pure function of (settings, step, global row
index), so a batch does not depend on the host count, and the whole data
position is one counter: `save(path)` writes it with the settings to
`<path>.json`, and `restore` with other settings fails naming the one that
differs instead of silently resuming on other data.

- `SyntheticCodesIterator`: encoder-decoder batches whose image codes are a
  deterministic function of the text (a model can learn them; a falling loss
  means the trainer works): text = [class token, filler..., EOS, pad...],
  code at grid cell (r, c) = (7 * class + r + 2 * c) mod K.
- `SyntheticImagesIterator`: coloured rectangles and discs on a plain background.
- `ShapesPixelsIterator`: the shapes world drawn at any size from 32 to 1024 px.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from parti_jax import storage

EOS_ID = 1
FIRST_TEXT_ID = 3  # after pad 0, eos 1, unk 2


class StepPositionIterator:
    """Base for iterators whose position is `self.step`; `settings` make batches reproducible.

    `batch_size` is the host-local batch (global batch / num_shards).
    """

    def __init__(
        self, *, batch_size: int, shard_index: int = 0, num_shards: int = 1, seed: int = 0, **kw
    ) -> None:
        self.settings = dict(
            batch_size=batch_size, shard_index=shard_index, num_shards=num_shards, seed=seed, **kw
        )
        self.__dict__.update(self.settings)
        self.step = 0

    def __iter__(self) -> StepPositionIterator:
        return self

    def save(self, path: str) -> None:
        """Writes the step and the settings to `<path>.json` (the Checkpointer's data hook;
        a local path or a URL), atomically."""
        storage.write_json(f"{path}.json", {"step": self.step, **self.settings}, indent=None)

    def restore(self, path: str) -> None:
        """Reads `<path>.json`; fails if it was saved with other data settings."""
        saved = storage.read_json(f"{path}.json")
        for k, v in json.loads(json.dumps(self.settings)).items():
            if saved.get(k) != v:
                raise ValueError(
                    f"{path}.json: data position saved with {k}={saved.get(k)!r}, this run "
                    f"has {k}={v!r}; resume with the same data settings"
                )
        self.step = int(saved["step"])

    def _rng(self, global_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.step, global_index])

    def _rows(self) -> range:
        """Global row indices of this host's part of the current batch."""
        start = self.shard_index * self.batch_size
        return range(start, start + self.batch_size)


class SyntheticCodesIterator(StepPositionIterator):
    """`next(it)` -> host-local encoder-decoder batch (docs/DESIGN.md §3)."""

    def __init__(
        self,
        *,
        text_length: int,
        text_vocab_size: int,
        codebook_size: int,
        image_grid: tuple[int, int],
        num_classes: int = 8,
        **kw: Any,
    ) -> None:
        if text_length < 3:
            raise ValueError(f"text_length={text_length} must be >= 3 (class, filler, EOS)")
        if text_vocab_size < FIRST_TEXT_ID + num_classes + 1:
            raise ValueError(
                f"text_vocab_size={text_vocab_size} is too small for {num_classes} classes"
            )
        super().__init__(
            text_length=text_length,
            text_vocab_size=text_vocab_size,
            codebook_size=codebook_size,
            image_grid=tuple(image_grid),
            num_classes=num_classes,
            **kw,
        )

    def _row(self, global_index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self._rng(global_index)
        cls = int(rng.integers(self.num_classes))
        text = np.zeros(self.text_length, np.int32)
        length = int(rng.integers(2, self.text_length))  # tokens before EOS
        text[0] = FIRST_TEXT_ID + cls
        text[1:length] = rng.integers(
            FIRST_TEXT_ID + self.num_classes, self.text_vocab_size, size=length - 1
        )
        text[length] = EOS_ID
        rows, cols = np.meshgrid(
            np.arange(self.image_grid[0]), np.arange(self.image_grid[1]), indexing="ij"
        )
        codes = (7 * cls + rows + 2 * cols).reshape(-1) % self.codebook_size
        return text, codes.astype(np.int32)

    def __next__(self) -> dict[str, np.ndarray]:
        texts, codes = zip(*(self._row(i) for i in self._rows()))
        self.step += 1
        targets = np.stack(codes) + 1  # decoder token = code + 1 (0 is pad / BOS)
        inputs = np.zeros_like(targets)
        inputs[:, 1:] = targets[:, :-1]
        return {
            "encoder_input_tokens": np.stack(texts),
            "decoder_input_tokens": inputs,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones(targets.shape, np.float32),
        }


class SyntheticImagesIterator(StepPositionIterator):
    """`next(it)` -> {'image': float32 [B, S, S, 3] in [0, 1]}: a random background colour
    and 1-3 random rectangles or discs in random colours."""

    def __init__(self, *, image_size: int, **kw: Any) -> None:
        super().__init__(image_size=image_size, **kw)

    def _image(self, global_index: int) -> np.ndarray:
        rng = self._rng(global_index)
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
        images = np.stack([self._image(i) for i in self._rows()])
        self.step += 1
        return {"image": images}


# Where the unpaired 'heldout' scenes of `unpaired_heldout_every` start in that split:
# far past the scenes the evals draw (indices 0..a few thousand).
UNPAIRED_HELDOUT_OFFSET = 10_000_000


class ShapesPixelsIterator(StepPositionIterator):
    """Shapes-world images drawn at `image_size`: {'image' float32 [B, S, S, 3] in [0, 1]}.

    Row r of batch t on shard i is example g = (t * batch_size + r) * num_shards + i
    of `split` (the world's scenes are already random per index).

    `unpaired_heldout_every` = n > 0 makes every n-th example (g % n == n - 1) a scene
    of the 'heldout' split instead (index UNPAIRED_HELDOUT_OFFSET + g, never an eval
    scene): a tokenizer trained on images of every colour-shape pair, without their
    captions, as tokenizers are trained on far more images than have captions.
    """

    def __init__(
        self, *, image_size: int, split: str = "train", unpaired_heldout_every: int = 0, **kw: Any
    ) -> None:
        from parti_jax.data import shapes

        if unpaired_heldout_every < 0:
            raise ValueError(
                f"unpaired_heldout_every={unpaired_heldout_every}: must be 0 (off) or n >= 1"
            )
        if unpaired_heldout_every:  # in the settings a resumed run checks (only when on)
            kw["unpaired_heldout_every"] = unpaired_heldout_every
        super().__init__(image_size=image_size, split=split, **kw)
        self._generate = shapes.generate_example
        self._world = shapes.ShapesWorldConfig(resolution=image_size)
        self._every = int(unpaired_heldout_every)

    def _example(self, g: int) -> np.ndarray:
        if self._every and g % self._every == self._every - 1:
            return self._generate(UNPAIRED_HELDOUT_OFFSET + g, "heldout", self.seed, self._world)
        return self._generate(g, self.split, self.seed, self._world)

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.step * self.batch_size
        images = [
            self._example(r * self.num_shards + self.shard_index).image
            for r in range(first, first + self.batch_size)
        ]
        self.step += 1
        return {"image": np.stack(images).astype(np.float32) / 255.0}
