"""A trained contrastive model at inference: load it, embed, score, rerank, warm-start.

    model = ContrastiveModel.load("/runs/contrastive")   # a train-contrastive work dir
    sims = model.similarity(images, captions)            # float32 [B]: cosine, row by row
    matrix = model.similarity_matrix(images, captions)   # [B images, C captions]
    scorer = ContrastiveScorer(model)                    # rerank.Scorer: sample/eval/bundle

Images of any square size are resized to the tower's (`resize_images`): the
scorer reads the VQGAN's output (or upsampled images) as they come.
(The other direction, an encoder-decoder's text encoder from the tower, is
`parti_jax.train.t2i.text_encoder_warm_start`: `train.text_encoder_from`.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parti_jax import loading, storage
from parti_jax.contrastive.model import ContrastiveConfig, DualEncoder, resize_images

PyTree = Any
CONTRASTIVE = loading.CONTRASTIVE
_ROWS = 256  # images or captions per jitted call (the last call padded)


@dataclasses.dataclass
class ContrastiveModel:
    """A dual encoder's config, parameters (host or device) and vocabulary."""

    config: ContrastiveConfig
    params: PyTree
    tokenizer: Any
    text_length: int
    meta: dict[str, Any]
    step: int
    checkpoint: str

    @classmethod
    def load(cls, workdir: str | os.PathLike, *, step: int | None = None) -> ContrastiveModel:
        """The latest (or `step`) checkpoint of a `parti-jax train-contrastive` work dir
        (an export bundle builds its own from its files: parti_jax/bundle.py)."""
        meta, meta_path = loading.read_record(workdir, CONTRASTIVE)
        config = loading.config_from_record(
            ContrastiveConfig, meta["config"], f"{meta_path}: config"
        )
        vocab = meta.get("vocab_path")
        tokenizer = loading.read_vocabulary(vocab)
        if meta.get("vocab_sha256") and tokenizer.fingerprint != meta["vocab_sha256"]:
            raise loading.LoadError(
                f"{meta_path}: trained with the vocabulary {meta['vocab_sha256'][:12]}…, but "
                f"{vocab} is {tokenizer.fingerprint[:12]}…; restore the vocabulary it was trained with"
            )
        target = abstract_params(config, int(meta["text_length"]))
        params, step_dir = loading.restore_params(workdir, target, meta_path, step)
        return cls(config, params, tokenizer, int(meta["text_length"]), dict(meta),
                   int(storage.path(step_dir).name), step_dir)  # fmt: skip

    def record(self) -> dict[str, Any]:
        """What a manifest or metrics file says of this model."""
        return {"checkpoint": self.checkpoint, "step": self.step,
                "vocab_sha256": self.tokenizer.fingerprint, "image_size": self.config.image_size}  # fmt: skip

    @functools.cached_property
    def _fns(self) -> tuple[Any, Any]:
        model = DualEncoder(self.config)
        image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=DualEncoder.embed_image))
        text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=DualEncoder.embed_text))
        return image, text

    def _chunks(self, fn: Any, rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, rows.shape[0], _ROWS):
            part = rows[start : start + _ROWS]
            n = part.shape[0]
            size = min(_ROWS, -(-rows.shape[0] // 8) * 8)  # one compiled shape per call size
            pad = np.repeat(part[-1:], max(size - n, 0), 0)
            out.append(np.asarray(fn(self.params, np.concatenate([part, pad])))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Float images [B, H, W, 3] in [0, 1] (square) -> unit embeddings float32 [B, E]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(
                f"ContrastiveModel.embed_images: images must be [B, S, S, 3], got {images.shape}"
            )
        resized = np.asarray(resize_images(images, self.config.image_size))
        return self._chunks(self._fns[0], resized)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> unit embeddings float32 [B, E] (cut to the trained text length)."""
        ids = np.asarray(self.tokenizer.encode_batch(list(texts), self.text_length)[0], np.int32)
        return self._chunks(self._fns[1], ids)

    def similarity(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with its own caption, float32 [B]."""
        if len(texts) != len(images):
            raise ValueError(f"similarity: {len(images)} images for {len(texts)} captions")
        unique = {t: i for i, t in enumerate(dict.fromkeys(texts))}  # rows repeat prompts
        text = self.embed_texts(list(unique))
        rows = np.asarray([unique[t] for t in texts])
        return np.sum(self.embed_images(images) * text[rows], axis=1).astype(np.float32)

    def similarity_matrix(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarities float32 [B images, C captions]."""
        return (self.embed_images(images) @ self.embed_texts(texts).T).astype(np.float32)


def abstract_params(config: ContrastiveConfig, text_length: int) -> PyTree:
    """The dual encoder's parameters as ShapeDtypeStructs (host, unsharded)."""
    model = DualEncoder(config)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), images, jnp.ones((1, text_length), jnp.int32))
    )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.tree.map(lambda x: getattr(x, "value", x), shapes["params"],
                     is_leaf=lambda x: hasattr(x, "value")),
    )  # fmt: skip


class ContrastiveScorer:
    """Reranking scorer (`rerank.Scorer`): cosine similarity of image and prompt
    embeddings by a trained contrastive model (higher is better)."""

    name = "contrastive"

    def __init__(self, model: ContrastiveModel | str | os.PathLike):
        self.model = model if isinstance(model, ContrastiveModel) else ContrastiveModel.load(model)

    def score(
        self, images: np.ndarray, prompts: Sequence[str], *, image_tokens: np.ndarray | None = None
    ) -> np.ndarray:
        del image_tokens  # it reads pixels
        return self.model.similarity(images, list(prompts))
