"""Image-caption batches for the contrastive trainer, with optional hard negatives.

- `ShapesCaptionsIterator`: the shapes world drawn at the tower's size, no
  TensorFlow; row r of batch t on shard i is example (t * batch + r) *
  shards + i of the split, as for the other built-in sources, so the data
  position is one counter (`save` / `restore`). With `hard_negatives=K` each
  row also gets K captions that differ from its own in one stated attribute
  (`shapes.near_miss_captions(stated=...)`: colour, shape, size, position,
  relation, count), the errors a reranker must catch.
- `CaptionBatches`: wraps a pixel iterator of {'image', 'text'} (a seqio
  `<name>_pixels` task, `pipeline.make_pixels_iterator`) and tokenizes its
  captions; its position is the wrapped iterator's.

Both yield {'image' float32 [B, S, S, 3], 'text' int32 [B, L]} and, with hard
negatives, 'negatives' int32 [B, K, L].
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from parti_jax.train.synthetic import StepPositionIterator


def tokenize(tokenizer: Any, texts: Sequence[str], text_length: int) -> np.ndarray:
    """int32 [len(texts), text_length]: 0-padded ids ending in EOS (truncated if longer)."""
    return np.asarray(tokenizer.encode_batch(list(texts), text_length)[0], np.int32)


def shapes_near_misses(
    example: Any, count: int, seed: int, config: Any = None, *, swap: bool = False
) -> list[str]:
    """`count` captions of `example` (a shapes.Example), each wrong in one stated attribute,
    drawn without replacement from its near misses (repeated when it has fewer). With
    `swap`, the first is its caption with the two objects swapped (`swapped_objects`)
    when it names two."""
    from parti_jax.data import shapes

    rng = np.random.default_rng([int(seed), 7, int(example.index)])
    misses = [
        c
        for c, _ in shapes.near_miss_captions(
            example.spec, rng, config, stated=example.requirements
        )
    ]
    order = rng.permutation(len(misses))
    out = [misses[order[j % len(misses)]] for j in range(count)]
    swapped = swapped_objects(example.caption) if swap else None
    return out if swapped is None else [swapped, *out[: count - 1]]


@functools.cache
def _object_phrase() -> re.Pattern[str]:
    """ "[size] colour shape" in the shapes world's words (built once)."""
    from parti_jax.data import shapes

    sizes = "|".join(w for words in shapes.SIZE_WORDS.values() for w in words)
    return re.compile(rf"\b(?:(?:{sizes}) )?(?:{'|'.join(shapes.COLORS)}) "
                      rf"(?:{'|'.join(shapes.SHAPES)})\b")  # fmt: skip


def swapped_objects(caption: str) -> str | None:
    """The caption with its two object phrases ("[size] colour shape") swapped, or None
    when it names fewer or more than two. With a stated relation this is a minimal
    pair of the caption: the same words, the relation reversed ("a red circle above
    a blue square" -> "a blue square above a red circle")."""
    found = list(_object_phrase().finditer(caption))
    if len(found) != 2 or found[0].group() == found[1].group():
        return None
    (a, b) = found
    return (caption[: a.start()] + b.group() + caption[a.end() : b.start()] + a.group()
            + caption[b.end() :])  # fmt: skip


class ShapesCaptionsIterator(StepPositionIterator):
    """Shapes-world (image, caption[, near misses]) batches, tokenized."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        image_size: int,
        text_length: int,
        split: str = "train",
        hard_negatives: int = 0,
        swap_negatives: bool = False,
        **kw: Any,
    ) -> None:
        from parti_jax.data import shapes

        super().__init__(
            image_size=image_size,
            text_length=text_length,
            split=split,
            hard_negatives=hard_negatives,
            swap_negatives=swap_negatives,
            vocabulary=tokenizer.fingerprint,
            **kw,
        )
        self._tokenizer = tokenizer
        self._shapes = shapes
        # The world draws from 32px up; smaller images are area-averaged from 32px.
        draw = max(image_size, 32)
        if draw % image_size:
            raise ValueError(f"image_size={image_size}: below 32px it must divide 32")
        self._factor = draw // image_size
        self._world = shapes.ShapesWorldConfig(resolution=draw)

    def examples(self) -> list[Any]:
        """This host's examples of the current batch (does not advance)."""
        first = self.step * self.batch_size
        return [
            self._shapes.generate_example(
                r * self.num_shards + self.shard_index, self.split, self.seed, self._world
            )
            for r in range(first, first + self.batch_size)
        ]

    def __next__(self) -> dict[str, np.ndarray]:
        examples = self.examples()
        self.step += 1
        images = np.stack([e.image for e in examples]).astype(np.float32) / 255.0
        if self._factor > 1:
            b, f, s = len(examples), self._factor, self.image_size
            images = images.reshape(b, s, f, s, f, 3).mean(axis=(2, 4))
        batch = {
            "image": images,
            "text": tokenize(self._tokenizer, [e.caption for e in examples], self.text_length),
        }
        if self.hard_negatives:
            k = self.hard_negatives
            misses = [
                m
                for e in examples
                for m in shapes_near_misses(e, k, self.seed, self._world, swap=self.swap_negatives)
            ]
            ids = tokenize(self._tokenizer, misses, self.text_length)
            batch["negatives"] = ids.reshape(len(examples), k, self.text_length)
        return batch


class CaptionBatches:
    """{'image', 'text' (str)} batches -> {'image', 'text' (ids)}; keeps save / restore."""

    def __init__(self, source: Iterator[Mapping[str, Any]], tokenizer: Any, text_length: int):
        self.source, self._tokenizer, self.text_length = source, tokenizer, text_length

    def __iter__(self) -> CaptionBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.source)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["text"]]
        return {
            "image": np.asarray(batch["image"], np.float32),
            "text": tokenize(self._tokenizer, texts, self.text_length),
        }

    def save(self, path: str) -> None:
        self.source.save(path)

    def restore(self, path: str) -> None:
        self.source.restore(path)

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
