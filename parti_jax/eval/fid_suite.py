"""FID suites: FID of a generated eval folder, and the COCO-30k zero-shot protocol.

- `run_fid(out_dir, eval_dir=...)`: FID (parti_jax/eval/fid.py) of the
  top-ranked image of every prompt of an eval folder against reference
  statistics. No Inception weights or no reference statistics: the metric is
  skipped, and metrics.json says why (`fid: null`, `fid_status: "skipped"`).
  Weights without a passed provenance record give `fid_status: "unvalidated"`.
- `run_coco_fid(generator, out_dir, ...)`: the protocol of DALL-E, GLIDE,
  Imagen and Parti: `num_prompts` (30,000) captions drawn at random (seed
  `prompt_seed`) from the given splits of a COCO captions pixels task, one
  image per caption (reranked from `num_samples`), saved at `image_size`
  (256), then FID of that folder. The drawn captions are kept in
  `prompts.jsonl`, so a resumed run uses the same ones without re-reading
  COCO. Without weights or statistics the suite stops before generating
  (unless `generate_without_fid=True`), since the images would serve nothing.

metrics.json (both): {"suite", "fid", "fid_status", "fid_reason",
"fid_num_images", "eval_dir"}; coco_fid adds "num_prompts", "image_size" and
the generation summary ("num_samples", "keep_top_k", "seed", "scorer",
"this_run"). `report.html` shows the figure with its status.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parti_jax.eval import fid as F
from parti_jax.eval import gallery
from parti_jax.eval import html as H
from parti_jax.eval import records as R
from parti_jax.eval import suites as S

PROMPTS_FILE = "prompts.jsonl"


def _write_metrics_and_report(out_dir: Path, title: str, metrics: dict[str, Any]) -> dict:
    """Merges `metrics` into metrics.json and writes report.html with the FID and its status."""
    R.update_metrics(out_dir, metrics)
    status = metrics.get("fid_status")
    value = metrics.get("fid")
    shown = "skipped" if value is None else f"{value:.3f}"
    badge = "" if status == "validated" else f' <span class="badge">{H.esc(status)}</span>'
    rows = [list(r) for r in H.flatten_metrics(metrics)]
    body = (
        f"<header><h1>{H.esc(title)}</h1></header>"
        f'<p id="fid">FID: <strong>{H.esc(shown)}</strong>{badge}</p>'
        f'<p class="muted" id="reason">{H.esc(metrics.get("fid_reason", ""))}</p>'
        f"{H.table(['metric', 'value'], rows)}"
    )
    H.write_page(out_dir / S.REPORT, H.page(title, body))
    return metrics


def fid_of_folder(
    eval_dir: str | os.PathLike | None,
    *,
    inception_params_path: str | os.PathLike | None,
    ref_stats_path: str | os.PathLike | None,
    batch_size: int = 50,
    first_only: bool = True,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
) -> F.FIDResult:
    """FID of an eval folder's images (the top-ranked per prompt by default)."""

    def batches():
        paths = F.eval_dir_image_paths(eval_dir, first_only=first_only)
        yield from F.iter_image_batches(paths, batch_size)

    return F.compute_fid(batches(), inception_params_path, ref_stats_path, feature_fn=feature_fn)


def run_fid(
    out_dir: str | os.PathLike,
    *,
    eval_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    inception_params_path: str | None = None,
    ref_stats_path: str | None = None,
    batch_size: int = 50,
    first_only: bool = True,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
    process_index: int | None = None,
) -> dict[str, Any]:
    """FID of `eval_dir` (relative paths are taken inside `workdir`); writes metrics + report."""
    index = process_index if process_index is not None else S.resolve_processes()[0]
    if index != 0:
        return {"suite": "fid", "status": "skipped", "reason": "runs on process 0"}
    if not eval_dir:
        raise S.SuiteError("fid.eval_dir: give the eval folder to score (e.g. 'parti_prompts')")
    folder = Path(eval_dir)
    if not folder.is_absolute() and workdir is not None:
        folder = Path(workdir) / folder
    result = fid_of_folder(
        folder,
        inception_params_path=inception_params_path,
        ref_stats_path=ref_stats_path,
        batch_size=batch_size,
        first_only=first_only,
        feature_fn=feature_fn,
    )
    metrics = {"suite": "fid", "eval_dir": str(folder), **result.to_metrics()}
    return _write_metrics_and_report(Path(out_dir), "FID", metrics)


# --------------------------------------------------------------------------- COCO-30k


def read_task_captions(task: Any, splits: Sequence[str], batch_size: int = 256) -> list[str]:
    """Every caption of a pixels task's splits, in order (TensorFlow via parti_jax.data)."""
    return [
        str(t)
        for split in splits
        for batch in S.task_batches(task, split=split, batch_size=batch_size)
        for t in batch["text"]
    ]


def draw_captions(captions: Sequence[str], num_prompts: int, seed: int) -> list[R.PromptRecord]:
    """`num_prompts` captions drawn without replacement; prompt_id = position in the draw."""
    if not captions:
        raise S.SuiteError("coco_fid: the caption source is empty")
    n = min(int(num_prompts), len(captions))
    picks = np.random.default_rng(int(seed)).choice(len(captions), size=n, replace=False)
    return [
        R.PromptRecord(j, captions[int(i)], note=f"caption {int(i)}") for j, i in enumerate(picks)
    ]


def _load_or_draw(
    out_dir: Path, draw: Callable[[], list[R.PromptRecord]], fingerprint: dict
) -> list[R.PromptRecord]:
    path = out_dir / PROMPTS_FILE
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        if head != fingerprint:
            raise S.SuiteError(
                f"{path}: captions were drawn with {head}, this run asks {fingerprint}; "
                "use another work directory"
            )
        return [R.PromptRecord(**json.loads(line)) for line in lines[1:]]
    prompts = draw()
    out_dir.mkdir(parents=True, exist_ok=True)
    text = (
        json.dumps(fingerprint)
        + "\n"
        + "".join(
            json.dumps({"prompt_id": p.prompt_id, "prompt": p.prompt, "note": p.note}) + "\n"
            for p in prompts
        )
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return prompts


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
    """
    settings = S.GenerationSettings.from_args(locals())
    out_dir = Path(out_dir)
    if feature_fn is None:
        early = F.compute_fid(iter(()), inception_params_path, ref_stats_path)
        if early.status == "skipped" and not generate_without_fid:
            metrics = {"suite": "coco_fid", "eval_dir": str(out_dir), **early.to_metrics()}
            metrics["fid_reason"] += "; no images generated (coco_fid.generate_without_fid)"
            return _write_metrics_and_report(out_dir, "COCO FID", metrics)
    if isinstance(captions, str):
        captions = Path(captions).read_text(encoding="utf-8").splitlines()
        captions = [c for c in captions if c.strip()]
    source = "captions" if captions is not None else str(getattr(task, "name", task))
    if captions is None and task is None:
        raise S.SuiteError("coco_fid: give coco_fid.task (a COCO captions pixels task) or captions")
    fingerprint = {
        "source": source,
        "splits": list(splits) if captions is None else None,
        "num_prompts": int(num_prompts),
        "prompt_seed": int(prompt_seed),
    }

    def draw() -> list[R.PromptRecord]:
        pool = list(captions) if captions is not None else read_task_captions(task, splits)
        return draw_captions(pool, num_prompts, prompt_seed)

    prompts = _load_or_draw(out_dir, draw, fingerprint)
    run = S.generate_suite(generator, out_dir, prompts, settings, name="coco_fid",
                           process_index=process_index, process_count=process_count)  # fmt: skip
    if run.pending is not None:
        return run.pending
    result = fid_of_folder(
        out_dir,
        inception_params_path=inception_params_path,
        ref_stats_path=ref_stats_path,
        batch_size=inception_batch_size,
        feature_fn=feature_fn,
    )
    metrics = {
        **run.summary(),
        "eval_dir": str(out_dir),
        **result.to_metrics(),
        "num_prompts": len(run.records),
        "image_size": image_size,
    }
    _write_metrics_and_report(out_dir, "COCO FID", metrics)
    gallery.write_gallery(out_dir, "COCO captions")
    return metrics
