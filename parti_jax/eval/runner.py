"""The runner behind `parti-jax eval`: loads the models once, runs the gin-selected suites.

Each suite writes its own folder (layout in parti_jax/eval/suites.py); the
summary is `OUT/metrics.json` ({suite: metrics}) and `OUT/index.html`.
With `eval.contrastive_dir` the generator carries a contrastive model: the
suites' scorer='contrastive' reranks with it, and the generating suites add
its figures (CLIP score, R-precision; shapes: agreement with the judge).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from parti_jax import storage
from parti_jax.decoding import SamplingConfig
from parti_jax.eval import html as H
from parti_jax.eval import records as R
from parti_jax.eval.suites import (
    GENERATING_SUITES,
    REPORT,
    SUITE_NAMES,
    SuiteError,
    resolve_processes,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SuiteInputs:
    """Lazily loaded models shared by the suites of one `parti-jax eval` run."""

    load_generator: Callable[[], Any] | None = None
    load_tokenizer: Callable[[], Any] | None = None
    load_upsampler: Callable[[], Any] | None = None
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, what: str) -> Any:
        if what not in self._cache:
            loader = getattr(self, f"load_{what}")
            if loader is None:
                raise SuiteError(f"no {what} to load; set the eval checkpoint paths")
            self._cache[what] = loader()
        return self._cache[what]


def headline(name: str, metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A few numbers per suite for the summary page and the console."""
    picks = {
        "parti_prompts": [
            "num_prompts",
            "num_images",
            "mean_rerank_score",
            "clip_score",
            "r_precision",
        ],
        "shapes": [
            "in_distribution.accuracy",
            "in_distribution.two_object_share",
            "heldout.accuracy",
            "in_distribution.near_miss.false_accept_rate",
            "in_distribution.one_draw.accuracy",
            "in_distribution.oracle.accuracy",
            "in_distribution.contrastive.clip_score",
            "in_distribution.contrastive.r_precision_real.r_precision",
            "in_distribution.contrastive.agreement_with_judge.auc",
        ],
        "reconstruction": ["vqgan.psnr", "vqgan.lpips", "vqgan.codebook_usage", "upsampler.psnr"],
        "fid": ["fid", "fid_status"],
        "coco_fid": ["fid", "fid_status", "num_prompts", "clip_score", "r_precision"],
    }.get(name, [])
    out = []
    for key in [*picks, "status"]:
        value: Any = metrics
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            out.append((key, value))
    return out


def write_summary(
    workdir: str | os.PathLike, results: Mapping[str, Mapping[str, Any]]
) -> storage.Path:
    """`<workdir>/metrics.json` (merged per suite) and `<workdir>/index.html` linking reports."""
    workdir = storage.path(workdir)
    merged = R.update_metrics(workdir, {k: dict(v) for k, v in results.items()})
    rows = []
    for name, metrics in merged.items():
        if not isinstance(metrics, Mapping):
            continue
        folder = workdir / name
        page = next((p for p in (REPORT, R.INDEX) if (folder / p).exists()), None)
        link = f'<a href="{H.esc(H.image_src(f"{name}/{page}"))}">{H.esc(name)}</a>' if page else ""
        numbers = "; ".join(
            f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
            for k, v in headline(name, metrics)
        )
        rows.append(f"<tr><td>{link or H.esc(name)}</td><td>{H.esc(numbers)}</td></tr>")
    body = (
        "<header><h1>parti_jax eval</h1></header>"
        '<table id="suites"><thead><tr><th>suite</th><th>headline</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="muted">All numbers: metrics.json in this folder and in each suite folder.</p>'
    )
    return H.write_page(workdir / R.INDEX, "parti_jax eval", body)


def run_eval_suites(
    workdir: str | os.PathLike,
    *,
    suites: Sequence[str],
    suite_fns: Mapping[str, Callable[..., dict]],
    checkpoint_dir: str | None = None,
    vqgan_dir: str | None = None,
    upsampler_dir: str | None = None,
    vocab_path: str | None = None,
    contrastive_dir: str | None = None,
    sampling_config: SamplingConfig | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    inputs: SuiteInputs | None = None,
) -> dict[str, dict]:
    """`parti-jax eval` (gin: `eval.*`): runs `suites` in order, each into `<workdir>/<suite>`.

    Generating suites get the generator and the shared sampling settings,
    `reconstruction` the tokenizer and upsampler, `fid` only its folder; each
    model is loaded once, when a suite first needs it.

    Args:
      workdir: where each suite writes its folder and the summary (a folder or a URL).
      suites: names from SUITE_NAMES, run in order.
      suite_fns: each suite's entry with its options bound (gin: `parti_prompts.*`, ...).
      checkpoint_dir: the encoder-decoder's `parti-jax train` work directory.
      vqgan_dir, upsampler_dir: `train-vqgan` / `train-upsampler` work directories.
      vocab_path: the SentencePiece model, if the checkpoint does not record it.
      contrastive_dir: a `parti-jax train-contrastive` work directory: the generator
        loads its model (`Generator.load(contrastive_path=...)`), so a suite's
        scorer='contrastive' works, and the generating suites add its metrics
        (clip_score, r_precision; shapes: a `contrastive` block per group).
      sampling_config, seed, batch_size: shared by the generating suites.
      process_index, process_count: simulate or override this host's share.
      inputs: preloaded models (tests); default: loaded from the paths above.

    Returns:
      {suite: metrics}.
    """
    workdir = storage.path(workdir)
    unknown = [s for s in suites if s not in SUITE_NAMES]
    if unknown or not suites:
        raise SuiteError(
            f"eval.suites={list(suites)!r}: unknown or empty; choose from {list(SUITE_NAMES)}"
        )
    if batch_size is not None and batch_size < 1:
        raise SuiteError(f"eval.batch_size={batch_size} must be >= 1 (or None: each suite's own)")
    if inputs is None:
        inputs = _inputs_from_paths(
            checkpoint_dir, vqgan_dir, upsampler_dir, vocab_path, contrastive_dir
        )
    index, count, _ = resolve_processes(process_index, process_count)
    shared = {"sampling_config": sampling_config, "seed": seed, "batch_size": batch_size}
    results: dict[str, dict] = {}
    for name in suites:
        out_dir = workdir / name
        kwargs: dict[str, Any] = {"out_dir": out_dir, "process_index": index}
        if name in GENERATING_SUITES:
            kwargs.update(generator=inputs.get("generator"), process_count=count)
            kwargs.update({k: v for k, v in shared.items() if v is not None})
        elif name == "reconstruction":
            upsampler = inputs.get("upsampler") if inputs.load_upsampler else None
            kwargs.update(tokenizer=inputs.get("tokenizer"), upsampler=upsampler)
        else:  # fid over another folder, relative to the work directory
            kwargs.update(workdir=workdir)
        start = time.perf_counter()
        log.info("eval: running suite %s into %s", name, out_dir)
        metrics = dict(suite_fns[name](**kwargs))
        metrics.setdefault("seconds", round(time.perf_counter() - start, 3))
        results[name] = metrics
    if index == 0 or count == 1:
        write_summary(workdir, results)
    return results


def _inputs_from_paths(
    checkpoint_dir: str | None, vqgan_dir: str | None, upsampler_dir: str | None,
    vocab_path: str | None, contrastive_dir: str | None = None,
) -> SuiteInputs:  # fmt: skip
    """Loaders of the models named by the eval paths (each run when first needed)."""

    def generator() -> Any:
        if not checkpoint_dir or not vqgan_dir:
            raise SuiteError(
                "eval.checkpoint_dir (the `parti-jax train` work directory) and eval.vqgan_dir "
                "(the `parti-jax train-vqgan` work directory) are needed to generate images"
            )
        from parti_jax.sampling import Generator

        return Generator.load(checkpoint_dir, vqgan_dir, upsampler_dir, vocab_path=vocab_path,
                              contrastive_path=contrastive_dir)  # fmt: skip

    def tokenizer() -> Any:
        if not vqgan_dir:
            raise SuiteError(
                "eval.vqgan_dir: the reconstruction suite needs the VQGAN work directory"
            )
        from parti_jax.vqgan.tokenizer import ImageTokenizer

        return ImageTokenizer.load(vqgan_dir)

    def upsampler() -> Any:
        from parti_jax.loading import load_upsampler

        return load_upsampler(upsampler_dir)

    return SuiteInputs(generator, tokenizer, upsampler if upsampler_dir else None)
