"""Reranking the samples of each prompt: the scorer interface and a likelihood scorer.

A scorer follows the contract of docs/DESIGN.md section 3::

    scorer.score(images [B, H, W, 3] float in [0, 1], prompts [B], *,
                 image_tokens=None [B, N]) -> np.ndarray [B]   (higher is better)

Rows are prompt-major (`parti_jax.decoding.sample_ids`). The paper's CoCa-style
contrastive reranker plugs in as such a class (cosine similarity of image and
prompt embeddings per row); without its weights `LikelihoodScorer` (the
model's own log-likelihood through a teacher-forced scoring callback,
`parti_jax.sampling.token_scores`: no model code here) is the generic
fallback, and the shapes world has its exact pixel judge (`parti_jax.data.judge`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

ArrayLike = np.ndarray


@runtime_checkable
class Scorer(Protocol):
    """Scores how well each image matches its prompt; higher is better."""

    def score(
        self, images: np.ndarray, prompts: Sequence[str], *, image_tokens: np.ndarray | None = None
    ) -> np.ndarray:
        """images float [B, H, W, 3] in [0, 1], one prompt per row -> float [B]."""


def name_of(scorer: Any) -> str | None:
    """How records name a scorer: its name (a string, or None) or its class name."""
    return scorer if scorer is None or isinstance(scorer, str) else type(scorer).__name__


def rerank(
    scores: ArrayLike,
    *,
    num_samples: int,
    keep_top_k: int,
    prompts: Sequence[str] | None = None,
) -> np.ndarray:
    """Row indices [num_prompts, keep_top_k] of the best samples of each prompt, best first.

    Args:
      scores: float [num_prompts * num_samples], prompt-major.
      num_samples: samples per prompt.
      keep_top_k: how many to keep per prompt (1 <= keep_top_k <= num_samples).
      prompts: optional prompt of each row, checked to be constant within a
        prompt's group (a batch that is not prompt-major fails).

    Ties keep the lower sample index first; NaN scores rank last.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"rerank: scores must be [rows], got shape {scores.shape}")
    if num_samples < 1 or scores.shape[0] % num_samples:
        raise ValueError(
            f"rerank: {scores.shape[0]} scores are not a whole number of prompts with "
            f"num_samples={num_samples}; pass num_samples as sampled"
        )
    if not 1 <= keep_top_k <= num_samples:
        raise ValueError(
            f"rerank: keep_top_k={keep_top_k} must be in [1, num_samples={num_samples}]"
        )
    num_prompts = scores.shape[0] // num_samples
    if prompts is not None:
        if len(prompts) != scores.shape[0]:
            raise ValueError(f"rerank: {len(prompts)} prompts for {scores.shape[0]} scores")
        for p in range(num_prompts):
            group = prompts[p * num_samples : (p + 1) * num_samples]
            if any(q != group[0] for q in group):
                raise ValueError(
                    f"rerank: rows {p * num_samples}..{(p + 1) * num_samples - 1} hold different "
                    f"prompts; rows must be prompt-major (decoding.sample_ids)"
                )
    grouped = scores.reshape(num_prompts, num_samples)
    key = np.where(np.isnan(grouped), np.inf, -grouped)  # ascending: best first, NaN last
    order = np.argsort(key, axis=1, kind="stable")[:, :keep_top_k]
    return (order + np.arange(num_prompts)[:, None] * num_samples).astype(np.int64)


def score_and_rerank(
    scorer: Scorer | None,
    images: np.ndarray,
    prompts: Sequence[str],
    *,
    num_samples: int,
    keep_top_k: int,
    image_tokens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores every row with `scorer` (None: all 0, draw order kept) and reranks; returns
    (indices [P, k], scores [B])."""
    if scorer is None:
        scores = np.zeros((len(prompts),), np.float32)
    else:
        scores = np.asarray(scorer.score(images, prompts, image_tokens=image_tokens), np.float32)
    if scores.shape != (len(prompts),):
        raise ValueError(
            f"score_and_rerank: {type(scorer).__name__}.score returned shape {scores.shape}, "
            f"expected [{len(prompts)}] (one score per row)"
        )
    return rerank(scores, num_samples=num_samples, keep_top_k=keep_top_k, prompts=prompts), scores


class LikelihoodScorer:
    """Scores image tokens by the model's own mean log-probability given the prompt.

    The model's decoder runs teacher-forced on each row's image tokens
    (`score_fn`, e.g. `parti_jax.sampling.token_scores` jitted: on the device,
    only one float per row comes back). It ignores the pixels: it needs
    `image_tokens`.

    Args:
      score_fn: `(encoder_input_tokens int32 [B, L], image_tokens int32 [B, N]
        [, unconditional_tokens int32 [B, L], unconditional_weight float])
        -> float [B]`: each row's mean over the grid of `log p(token_t |
        tokens_<t, text)`, id 0 and the vocabulary padding masked as in
        sampling, minus `unconditional_weight` times that given
        `unconditional_tokens` (passed only when unconditional_weight > 0).
      encode_prompts: prompts -> encoder_input_tokens int32 [B, L] (the text
        vocabulary with EOS, padded), as used for sampling.
      num_valid_tokens: codebook_size + 1 (image tokens must lie below it);
        None checks only that id 0 is absent.
      batch_size: rows per `score_fn` call (None: all at once).
      unconditional_weight: w in `log p(x | prompt) - w log p(x | "")` (per-token
        means). 0 is the plain likelihood; 1 the pointwise mutual information of
        image and prompt (a model trained with conditioning dropout has it): it
        discounts what is likely under any prompt (on the shapes world: one
        object where the caption asks for two). The empty prompt is
        `encode_prompts([""])`, `[EOS]` for the shipped tokenizers, the
        unconditional row of classifier-free guidance.
    """

    def __init__(
        self,
        score_fn: Callable[..., ArrayLike],
        encode_prompts: Callable[[Sequence[str]], np.ndarray],
        *,
        num_valid_tokens: int | None = None,
        batch_size: int | None = None,
        unconditional_weight: float = 0.0,
    ):
        if not 0.0 <= unconditional_weight <= 1.0:
            raise ValueError(
                f"LikelihoodScorer: unconditional_weight={unconditional_weight} must be in "
                "[0, 1] (0: likelihood, 1: pointwise mutual information)"
            )
        self.score_fn = score_fn
        self.encode_prompts = encode_prompts
        self.num_valid_tokens = num_valid_tokens
        self.batch_size = batch_size
        self.unconditional_weight = float(unconditional_weight)

    def score(
        self, images: np.ndarray, prompts: Sequence[str], *, image_tokens: np.ndarray | None = None
    ) -> np.ndarray:
        """Mean log-likelihood per row, float32 [B] (higher is better)."""
        del images  # the likelihood lives in token space
        if image_tokens is None:
            raise ValueError(
                "LikelihoodScorer.score needs image_tokens= (the sampled decoder ids [B, N], "
                "codes + 1); it scores tokens, not pixels"
            )
        tokens = np.asarray(image_tokens).astype(np.int32)
        if tokens.ndim != 2 or tokens.shape[0] != len(prompts):
            raise ValueError(
                f"LikelihoodScorer.score: image_tokens must be [B={len(prompts)}, N], "
                f"got {tokens.shape}"
            )
        if tokens.min(initial=1) < 1:
            raise ValueError(
                "LikelihoodScorer.score: image_tokens contain id 0 (pad/BOS); pass decoder "
                "ids (codes + 1), not codes"
            )
        limit = self.num_valid_tokens
        if limit is not None and tokens.max(initial=0) >= limit:
            raise ValueError(
                f"LikelihoodScorer: image token {int(tokens.max())} is >= num_valid_tokens "
                f"{limit} (codebook_size + 1); the tokens do not come from this model"
            )
        step = self.batch_size or len(prompts)
        out = [
            self._score_batch(list(prompts[i : i + step]), tokens[i : i + step])
            for i in range(0, len(prompts), step)
        ]
        return np.concatenate(out).astype(np.float32)

    def _score_batch(self, prompts: list[str], tokens: np.ndarray) -> np.ndarray:
        text = np.asarray(self.encode_prompts(prompts), np.int32)
        if self.unconditional_weight:
            empty = np.asarray(self.encode_prompts([""]), np.int32)
            args = (np.repeat(empty, len(prompts), axis=0), self.unconditional_weight)
        else:
            args = ()
        scores = np.asarray(self.score_fn(text, tokens, *args))
        if scores.shape != (len(prompts),):
            raise ValueError(
                f"LikelihoodScorer: score_fn returned shape {scores.shape}, expected "
                f"[{len(prompts)}] (one score per row)"
            )
        return scores
