"""PartiPrompts (P2) eval: every prompt (or a filtered subset) -> reranked images + gallery.

    run_parti_prompts(generator, "OUT/parti_prompts", num_samples=16, keep_top_k=4)

Each prompt's row number in PartiPrompts.tsv is its prompt_id (folded into
its samples' seed, so an image never depends on the batch, host count or
resumption). `num_samples` images are drawn per prompt and reranked; the best
`keep_top_k` are saved, best first, with their scores. The folder is an eval
folder (parti_jax/eval/records.py) with the gallery as `index.html`, grouped by
the 12 categories and 11 challenge aspects, and `metrics.json`::

    {"suite": "parti_prompts", "num_prompts": 1632, "num_images": 1632,
     "prompts_per_category": {"Abstract": 51, ...},     # 12 entries for all prompts
     "prompts_per_challenge": {"Basic": 262, ...},      # 11 entries
     "mean_rerank_score": 0.31 | null,                  # best image's score, averaged
     "mean_rerank_score_per_category": {...}, "mean_rerank_score_per_challenge": {...},
     "num_samples": 16, "keep_top_k": 4, "seed": 0, "scorer": "likelihood" | null,
     "filters": {"categories": null, "challenges": null, "limit": null},
     "this_run": {"generated": 1632, "skipped": 0, "seconds": 812.4}}

The metrics and gallery describe every record in the folder (an earlier run
with more prompts included).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from parti_jax.eval import gallery
from parti_jax.eval import records as R
from parti_jax.eval import suites as S

NAME = "parti_prompts"


def parti_eval_prompts(
    prompts_path: str | None = None,
    *,
    categories: Iterable[str] | None = None,
    challenges: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[R.PromptRecord]:
    """PartiPrompts rows as prompts to generate for (prompt_id = row number), optionally
    filtered."""
    from parti_jax.data.prompts import load_parti_prompts

    try:
        rows = load_parti_prompts(
            prompts_path, categories=categories, challenges=challenges, limit=limit
        )
    except ValueError as e:
        raise S.SuiteError(f"{NAME}: {e}") from None
    return [R.PromptRecord(p.index, p.prompt, p.category, p.challenge, p.note) for p in rows]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def parti_metrics(records: Sequence[R.PromptRecord]) -> dict[str, Any]:
    """Counts per category / challenge and mean best-image rerank score."""
    by_cat: dict[str, list[float]] = defaultdict(list)
    by_chal: dict[str, list[float]] = defaultdict(list)
    best = []
    for r in records:
        if r.scores:
            best.append(r.scores[0])
            by_cat[r.category].append(r.scores[0])
            by_chal[r.challenge].append(r.scores[0])
    cats = Counter(r.category for r in records)
    chals = Counter(r.challenge for r in records)
    order_cat = gallery.ordered_groups(list(cats), gallery.PARTI_CATEGORIES)
    order_chal = gallery.ordered_groups(list(chals), gallery.PARTI_CHALLENGES)
    return {
        "num_prompts": len(records),
        "num_images": sum(len(r.images) for r in records),
        "prompts_per_category": {c: cats[c] for c in order_cat},
        "prompts_per_challenge": {c: chals[c] for c in order_chal},
        "mean_rerank_score": _mean(best),
        "mean_rerank_score_per_category": {c: _mean(by_cat[c]) for c in order_cat if by_cat[c]},
        "mean_rerank_score_per_challenge": {c: _mean(by_chal[c]) for c in order_chal if by_chal[c]},
    }


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
      process_index, process_count: this host's share (default: jax's).

    Returns:
      The metrics (module docstring), or a "pending" note on a process that
      leaves the reports to another.
    """
    settings = S.GenerationSettings.from_args(locals())
    prompts = parti_eval_prompts(
        prompts_path, categories=categories, challenges=challenges, limit=limit
    )
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
    R.update_metrics(out_dir, metrics)
    gallery.write_gallery(out_dir, title)
    return metrics
