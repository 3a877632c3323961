"""Structured synthetic encoder-decoder batches: the trainer without TensorFlow or data.

Image codes are a deterministic function of the text, so a model can learn
them and a falling loss means the trainer works:

    text tokens  = [class token, filler tokens..., EOS, pad...]
    image code at grid cell (r, c) = (7 * class + r + 2 * c) mod K

Every row of the global batch is a pure function of (seed, step, global row
index). A host reads the rows of its data shard, so 1 host x 8 devices and
2 hosts x 4 devices see the same global batch, and the position (one
counter) is saved and restored like a tf.data iterator's.
"""

from __future__ import annotations

import numpy as np

from parti_jax.train.data_position import StepPositionIterator

EOS_ID = 1
FIRST_TEXT_ID = 3  # after pad 0, eos 1, unk 2


class SyntheticCodesIterator(StepPositionIterator):
    """`next(it)` -> host-local batch dict (docs/DESIGN.md §3); `save` / `restore`."""

    def __init__(
        self,
        *,
        batch_size: int,
        text_length: int,
        text_vocab_size: int,
        codebook_size: int,
        image_grid: tuple[int, int],
        shard_index: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        num_classes: int = 8,
    ) -> None:
        """`batch_size` is the host-local batch (global batch / num_shards)."""
        if text_length < 3:
            raise ValueError(f"text_length={text_length} must be >= 3 (class, filler, EOS)")
        if text_vocab_size < FIRST_TEXT_ID + num_classes + 1:
            raise ValueError(
                f"text_vocab_size={text_vocab_size} is too small for {num_classes} classes"
            )
        self.batch_size = batch_size
        self.text_length = text_length
        self.text_vocab_size = text_vocab_size
        self.codebook_size = codebook_size
        self.image_grid = tuple(image_grid)
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.seed = seed
        self.num_classes = num_classes
        self.step = 0

    def _row(self, global_index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step, global_index])
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
        start = self.shard_index * self.batch_size
        texts, codes = zip(*(self._row(start + i) for i in range(self.batch_size)))
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

    def _description(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "seed": self.seed,
        }
