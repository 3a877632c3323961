"""PartiPrompts (P2) eval: every prompt (or a filtered subset) -> reranked images + gallery.

    run_parti_prompts(generator, "OUT/parti_prompts", num_samples=16, keep_top_k=4)

A prompt's row in PartiPrompts.tsv is its prompt_id (folded into its seed, so
an image never depends on the batch, host count or resumption); the best
`keep_top_k` of `num_samples` images are kept with their scores. The folder is
an eval folder (parti_jax/eval/records.py) with the gallery as `index.html`;
`metrics.json` (describing every record in the folder)::

    {"suite": "parti_prompts", "num_prompts": 1632, "num_images": 1632,
     "prompts_per_category": {"Abstract": 51, ...}, "prompts_per_challenge": {...},
     "mean_rerank_score": 0.31 | null,                  # best image's score, averaged
     "mean_rerank_score_per_category": {...}, "mean_rerank_score_per_challenge": {...},
     "num_samples": 16, "keep_top_k": 4, "seed": 0, "scorer": "likelihood" | null,
     "filters": {"categories": null, "challenges": null, "limit": null},
     "this_run": {"generated": 1632, "skipped": 0, "seconds": 812.4},
     # with a contrastive model (eval.contrastive_dir; parti_jax/eval/contrastive_metrics.py):
     "clip_score": 0.27,                     # mean cosine of each best image with its prompt
     "clip_score_per_category": {...}, "clip_score_per_challenge": {...},
     "r_precision": 0.61,                    # prompt above 99 other prompts of the suite
     "r_precision_per_category": {...}, "r_precision_per_challenge": {...},
     "r_precision_distractors": 99, "contrastive_num_images": 1632,
     "contrastive_model": {"checkpoint", "step", "vocab_sha256", "image_size"}}

An in-project contrastive model scoring these images gives a relative measure
(checkpoints or settings against each other under one contrastive model).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import contrastive_metrics as CM
from parti_jax.eval import gallery
from parti_jax.eval import records as R
from parti_jax.eval import suites as S
from parti_jax.models.config import check_counts

NAME = "parti_prompts"


def parti_metrics(records: Sequence[R.PromptRecord]) -> dict[str, Any]:
    """Counts per category / challenge and mean best-image rerank score."""

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    scored = [r for r in records if r.scores]
    out = {
        "num_prompts": len(records),
        "num_images": sum(len(r.images) for r in records),
        "mean_rerank_score": mean([r.scores[0] for r in scored]),
    }
    for group, known in (
        ("category", gallery.PARTI_CATEGORIES),
        ("challenge", gallery.PARTI_CHALLENGES),
    ):
        counts = Counter(getattr(r, group) for r in records)
        best = defaultdict(list)
        for r in scored:
            best[getattr(r, group)].append(r.scores[0])
        order = gallery.ordered_groups(list(counts), known)
        out[f"prompts_per_{group}"] = {c: counts[c] for c in order}
        out[f"mean_rerank_score_per_{group}"] = {c: mean(best[c]) for c in order if best[c]}
    return out


def run_parti_prompts(
    generator: Any,
    out_dir: str | os.PathLike,
    *,
    prompts_path: str | None = None,
    categories: Sequence[str] | None = None,
    challenges: Sequence[str] | None = None,
    limit: int | None = None,
    num_samples: int | None = None,
    keep_top_k: int = 1,
    sampling_config: Any = None,
    seed: int | None = None,
    scorer: Any = None,
    batch_size: int | None = None,
    prompts_per_call: int | None = None,
    image_size: int | None = None,
    title: str = "PartiPrompts",
    r_precision_seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, Any]:
    """Generates PartiPrompts images into `out_dir`, then writes metrics.json and the gallery.

    Args:
      generator: a `parti_jax.sampling.Generator` or anything with its `generate`.
      prompts_path: a PartiPrompts.tsv; default the shipped copy (1632 prompts).
      categories, challenges, limit: keep only these categories / challenges,
        then the first `limit` rows.
      num_samples, seed: default to `sampling_config`'s.
      keep_top_k: images kept per prompt after reranking by `scorer`.
      batch_size: rows per sampling batch; prompts_per_call: prompts per
        `generate` call (default batch_size // num_samples).
      image_size: resize saved images to this side (default: as generated).
      r_precision_seed: draws each prompt's R-precision distractors (with a
        contrastive model: the generator's, from eval.contrastive_dir).
      process_index, process_count: this host's share (default: jax's).

    Returns:
      The metrics (module docstring), or a "pending" note on a process that
      leaves the reports to another.
    """
    from parti_jax.data.prompts import load_parti_prompts

    check_counts("parti_prompts", limit=limit)
    settings = S.GenerationSettings.from_args(locals())
    # A URL's file is read through storage (a local copy while it is parsed).
    fetched = storage.fetched(prompts_path, kind="file") if prompts_path else None
    try:
        with fetched or contextlib.nullcontext() as local:
            rows = load_parti_prompts(
                local, categories=categories, challenges=challenges, limit=limit
            )
    except ValueError as e:
        raise S.SuiteError(f"{NAME}: {e}") from None
    prompts = [R.PromptRecord(p.index, p.prompt, p.category, p.challenge, p.note) for p in rows]
    run = S.generate_suite(generator, out_dir, prompts, settings, name=NAME,
                           process_index=process_index, process_count=process_count)  # fmt: skip
    if run.pending is not None:
        return run.pending
    metrics = {
        **run.summary(),
        **parti_metrics(run.records),
        "filters": {
            "categories": list(categories) if categories else None,
            "challenges": list(challenges) if challenges else None,
            "limit": limit,
        },
    }
    model = S.contrastive_model(generator)
    if model is not None:
        order = {
            "category": lambda names: gallery.ordered_groups(names, gallery.PARTI_CATEGORIES),
            "challenge": lambda names: gallery.ordered_groups(names, gallery.PARTI_CHALLENGES),
        }
        metrics.update(
            CM.retrieval_metrics(model, out_dir, run.records, seed=r_precision_seed, groups=order)
        )
    R.update_metrics(out_dir, metrics)
    gallery.write_gallery(out_dir, title)
    return metrics
