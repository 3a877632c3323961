"""FID suites: FID of a generated eval folder, and the COCO-30k zero-shot protocol.

`run_fid` scores the top-ranked image of every prompt of an eval folder;
`run_coco_fid` follows DALL-E, GLIDE, Imagen and Parti: 30,000 COCO captions
drawn at random (kept in `prompts.jsonl` for a resume), one image each at 256 px,
then FID of that folder.

Without Inception weights or reference statistics the metric is skipped and
metrics.json says why (`fid: null`, `fid_status: "skipped"`); coco_fid then
stops before generating (unless `generate_without_fid`). metrics.json holds
"suite", "fid", "fid_status", "fid_reason", "fid_num_images", "eval_dir";
coco_fid adds "num_prompts", "image_size" and the generation summary, and
with a contrastive model (the generator's, from eval.contrastive_dir)
"clip_score" (mean cosine of each image with its caption), "r_precision" (the
caption above 99 other drawn captions), "r_precision_distractors",
"contrastive_num_images" and "contrastive_model"
(parti_jax/eval/contrastive_metrics.py: a relative measure).
`report.html` shows the figure with its status (and every metric).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import contrastive_metrics as CM
from parti_jax.eval import fid as F
from parti_jax.eval import gallery
from parti_jax.eval import html as H
from parti_jax.eval import records as R
from parti_jax.eval import suites as S
from parti_jax.models.config import check_counts

PROMPTS_FILE = "prompts.jsonl"


def _write_metrics_and_report(out_dir: storage.Path, title: str, metrics: dict[str, Any]) -> dict:
    """Merges `metrics` into metrics.json and writes report.html with the FID and its status."""
    R.update_metrics(out_dir, metrics)
    status = metrics.get("fid_status")
    value = metrics.get("fid")
    shown = "skipped" if value is None else f"{value:.3f}"
    badge = "" if status == "validated" else f' <span class="badge">{H.esc(status)}</span>'
    body = (
        f"<header><h1>{H.esc(title)}</h1></header>"
        f'<p id="fid">FID: <strong>{H.esc(shown)}</strong>{badge}</p>'
        f'<p class="muted" id="reason">{H.esc(metrics.get("fid_reason", ""))}</p>'
        f"{H.metrics_table(metrics)}"
    )
    H.write_page(out_dir / S.REPORT, title, body)
    return metrics


def run_fid(
    out_dir: str | os.PathLike,
    *,
    eval_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    batch_size: int = 50,
    first_only: bool = True,
    inception_params_path: str | None = None,
    ref_stats_path: str | None = None,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
    process_index: int | None = None,
) -> dict[str, Any]:
    """FID of `eval_dir` (relative paths are taken inside `workdir`); writes metrics + report."""
    if skipped := S.process_0_only("fid", process_index):
        return skipped
    if not eval_dir:
        raise S.SuiteError("fid.eval_dir: give the eval folder to score (e.g. 'parti_prompts')")
    folder = os.fspath(eval_dir)
    if not (storage.is_url(folder) or os.path.isabs(folder)) and workdir is not None:
        folder = storage.join(workdir, folder)
    folder = storage.path(folder)
    batches = F.eval_dir_batches(folder, batch_size, first_only=first_only)
    result = F.compute_fid(batches, inception_params_path, ref_stats_path, feature_fn=feature_fn)
    metrics = {"suite": "fid", "eval_dir": str(folder), **result.to_metrics()}
    return _write_metrics_and_report(storage.path(out_dir), "FID", metrics)


def draw_prompts(
    out_dir: storage.Path, fingerprint: dict, pool: Callable[[], Sequence[str]], num: int, seed: int
) -> list[R.PromptRecord]:
    """`num` captions of `pool()` drawn without replacement (prompt_id = position in the
    draw), kept in prompts.jsonl: a resumed run reads them back instead of drawing."""
    path = out_dir / PROMPTS_FILE
    if path.exists():
        lines = storage.read_text(path).splitlines()
        head = json.loads(lines[0])
        if head != fingerprint:
            raise S.SuiteError(
                f"{path}: captions were drawn with {head}, this run asks {fingerprint}; "
                "use another work directory"
            )
        return [R.PromptRecord(**json.loads(line)) for line in lines[1:]]
    captions = pool()
    if not captions:
        raise S.SuiteError("coco_fid: the caption source is empty")
    n = min(int(num), len(captions))
    picks = np.random.default_rng(int(seed)).choice(len(captions), size=n, replace=False)
    rows = [
        {"prompt_id": j, "prompt": captions[i], "note": f"caption {i}"}
        for j, i in enumerate(map(int, picks))
    ]
    R.write_atomic(path, "".join(json.dumps(row) + "\n" for row in [fingerprint, *rows]))
    return [R.PromptRecord(**row) for row in rows]


def run_coco_fid(
    generator: Any,
    out_dir: str | os.PathLike,
    *,
    task: Any = None,
    splits: Sequence[str] = ("validation",),
    captions: Sequence[str] | str | None = None,
    num_prompts: int = 30000,
    prompt_seed: int = 0,
    image_size: int | None = 256,
    num_samples: int = 1,
    keep_top_k: int = 1,
    sampling_config: Any = None,
    seed: int | None = None,
    scorer: Any = None,
    batch_size: int | None = 64,
    prompts_per_call: int | None = None,
    inception_params_path: str | None = None,
    ref_stats_path: str | None = None,
    inception_batch_size: int = 50,
    generate_without_fid: bool = False,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
    r_precision_seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, Any]:
    """COCO-30k: draws captions, generates one image per caption, computes FID.

    Args:
      task, splits: a COCO captions pixels task (or its registered name) and the
        splits whose union is the caption pool (TFDS coco_captions: validation,
        test and restval together are COCO 2014 val).
      captions: instead of a task, a list of captions or a text file (one per line).
      num_prompts, prompt_seed: how many captions to draw, and the draw's seed.
      image_size: saved images are resized to this side (the protocol's 256).
      inception_params_path, ref_stats_path: the FID Inception .npz and reference
        statistics; without them the suite stops before generating unless
        `generate_without_fid`.
      feature_fn: replaces the Inception network (tests); the figure is then unvalidated.
      r_precision_seed: draws each caption's R-precision distractors (with a
        contrastive model: the generator's, from eval.contrastive_dir).
    """
    settings = S.GenerationSettings.from_args(locals())
    out_dir = storage.path(out_dir)
    check_counts("coco_fid", num_prompts=num_prompts, inception_batch_size=inception_batch_size)
    if feature_fn is None:
        early = F.compute_fid(iter(()), inception_params_path, ref_stats_path)
        if early.status == "skipped" and not generate_without_fid:
            metrics = {"suite": "coco_fid", "eval_dir": str(out_dir), **early.to_metrics()}
            metrics["fid_reason"] += "; no images generated (coco_fid.generate_without_fid)"
            return _write_metrics_and_report(out_dir, "COCO FID", metrics)
    if isinstance(captions, str):
        captions = storage.read_text(captions).splitlines()
        captions = [c for c in captions if c.strip()]
    source = "captions" if captions is not None else str(getattr(task, "name", task))
    if captions is None and task is None:
        raise S.SuiteError("coco_fid: give coco_fid.task (a COCO captions pixels task) or captions")
    fingerprint = dict(source=source, splits=list(splits) if captions is None else None)
    fingerprint.update(num_prompts=int(num_prompts), prompt_seed=int(prompt_seed))

    def pool() -> Sequence[str]:  # every caption of the task's splits (TensorFlow)
        if captions is not None:
            return captions
        batches = (S.task_batches(task, split=split, batch_size=256) for split in splits)
        return [
            str(t) for split_batches in batches for batch in split_batches for t in batch["text"]
        ]

    prompts = draw_prompts(out_dir, fingerprint, pool, num_prompts, prompt_seed)
    run = S.generate_suite(generator, out_dir, prompts, settings, name="coco_fid",
                           process_index=process_index, process_count=process_count)  # fmt: skip
    if run.pending is not None:
        return run.pending
    batches = F.eval_dir_batches(out_dir, inception_batch_size)
    result = F.compute_fid(batches, inception_params_path, ref_stats_path, feature_fn=feature_fn)
    metrics = {**run.summary(), "eval_dir": str(out_dir), **result.to_metrics()}
    metrics.update(num_prompts=len(run.records), image_size=image_size)
    model = S.contrastive_model(generator)
    if model is not None:
        metrics.update(CM.retrieval_metrics(model, out_dir, run.records, seed=r_precision_seed))
    _write_metrics_and_report(out_dir, "COCO FID", metrics)
    gallery.write_gallery(out_dir, "COCO captions")
    return metrics
