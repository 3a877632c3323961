"""Contrastive-model figures of an eval folder: CLIP score, R-precision, agreement with a verdict.

The model is the generator's (`Generator.contrastive`, loaded from
`eval.contrastive_dir`; parti_jax/contrastive/scorer.py). It reads the images
as saved in the eval folder (any square size; resized to the model's), after
generation, so a resumed or merged folder is scored as a whole by the model
loaded now. An in-project contrastive model scoring in-project images gives a
relative measure (checkpoints or settings against each other under one
contrastive model), not a figure comparable with published CLIP scores.

- clip_score: the mean cosine similarity of each prompt's best image with its
  prompt (raw cosine in [-1, 1], not x100 and not clipped at 0).
- r_precision: the share of best images whose prompt scores strictly above
  every distractor caption: up to R_PRECISION_DISTRACTORS other prompts of the
  suite (distinct texts), drawn per prompt from (seed, prompt_id).
- auc: the probability that an image the judge accepted scores above one it
  rejected (ties count half); the shapes suite's agreement with its judge.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import records as R
from parti_jax.eval import suites as S

R_PRECISION_DISTRACTORS = 99  # other prompts per R-precision query (CLIP R-precision's 99)
_IMAGES_PER_CALL = 256  # PNGs loaded and embedded at a time


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def embed_saved_images(model: Any, folder: str | os.PathLike, paths: Sequence[str]) -> np.ndarray:
    """Unit embeddings float32 [len(paths), E] of PNGs under `folder` (loaded in chunks)."""
    folder = storage.path(folder)
    out = []
    for start in range(0, len(paths), _IMAGES_PER_CALL):
        chunk = [S.load_png(folder / p) for p in paths[start : start + _IMAGES_PER_CALL]]
        out.append(model.embed_images(np.stack(chunk).astype(np.float32) / 255.0))
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def embed_arrays(model: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """Unit embeddings of uint8 [H, W, 3] images (in chunks)."""
    out = []
    for start in range(0, len(images), _IMAGES_PER_CALL):
        chunk = np.stack(images[start : start + _IMAGES_PER_CALL]).astype(np.float32) / 255.0
        out.append(model.embed_images(chunk))
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for `labels` (Mann-Whitney, ties half);
    None without both a positive and a negative."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if not num_pos or not num_neg:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def distractors(
    own: int, num_texts: int, prompt_id: int, seed: int, count: int = R_PRECISION_DISTRACTORS
) -> np.ndarray:
    """Indices of up to `count` texts other than `own` among `num_texts`, drawn from
    (seed, prompt_id): the same for a prompt whatever the order of the records."""
    pool = num_texts - 1
    k = min(int(count), pool)
    if k <= 0:
        return np.zeros((0,), np.int64)
    picks = np.random.default_rng([int(seed), int(prompt_id)]).choice(pool, size=k, replace=False)
    return picks + (picks >= own)


def retrieval_metrics(
    model: Any,
    folder: str | os.PathLike,
    records: Sequence[R.PromptRecord],
    *,
    seed: int = 0,
    num_distractors: int = R_PRECISION_DISTRACTORS,
    groups: Mapping[str, Callable[[list[str]], list[str]]] | None = None,
) -> dict[str, Any]:
    """CLIP score and R-precision of each prompt's best image (`records[i].images[0]`).

    Returns {"clip_score", "r_precision", "r_precision_distractors",
    "contrastive_num_images", "contrastive_model"} and, for each `groups` field
    (a PromptRecord attribute: "category", "challenge"; its value orders the
    names), "clip_score_per_<field>" and "r_precision_per_<field>". R-precision
    is null when the suite has a single distinct prompt.
    """
    recs = sorted((r for r in records if r.images), key=lambda r: r.prompt_id)
    texts = list(dict.fromkeys(r.prompt for r in recs))
    where = {t: i for i, t in enumerate(texts)}
    text_emb = model.embed_texts(texts) if texts else np.zeros((0, 1), np.float32)
    image_emb = embed_saved_images(model, folder, [r.images[0] for r in recs])
    own = np.asarray([where[r.prompt] for r in recs], np.int64)
    sims = np.sum(image_emb * text_emb[own], axis=1) if recs else np.zeros((0,), np.float32)
    hits: list[bool | None] = []
    for i, r in enumerate(recs):
        others = distractors(int(own[i]), len(texts), r.prompt_id, seed, num_distractors)
        if not len(others):
            hits.append(None)
            continue
        hits.append(bool(sims[i] > np.max(text_emb[others] @ image_emb[i])))
    counted = [h for h in hits if h is not None]
    out: dict[str, Any] = {
        "clip_score": mean(sims.tolist()),
        "r_precision": mean(counted),
        "r_precision_distractors": int(min(num_distractors, max(len(texts) - 1, 0))),
        "contrastive_num_images": len(recs),
        "contrastive_model": model.record(),
    }
    for field, order in (groups or {}).items():
        by_sim, by_hit = defaultdict(list), defaultdict(list)
        for r, s, h in zip(recs, sims.tolist(), hits):
            by_sim[getattr(r, field)].append(s)
            if h is not None:
                by_hit[getattr(r, field)].append(h)
        names = order(list(by_sim))
        out[f"clip_score_per_{field}"] = {n: mean(by_sim[n]) for n in names}
        out[f"r_precision_per_{field}"] = {n: mean(by_hit[n]) for n in names if by_hit[n]}
    return out
