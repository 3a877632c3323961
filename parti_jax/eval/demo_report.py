"""The demo's report: `<demo>/report/index.html`, one page that opens from the file system.

The headline (the shapes judge's accuracy in-distribution and held-out), the
time and summary of each stage, loss curves (PNGs drawn with matplotlib's Agg
backend from each trainer's metrics.jsonl, in `report/plots/`), the samples,
the world's preview, the VQGAN's reconstructions and links to the suites'
reports. Every text is escaped (`parti_jax.eval.html`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parti_jax.eval import html as H

REPORT_DIR = "report"
PLOTS_DIR = "plots"
# Training stages with a metrics.jsonl, their folder and the curves drawn (first found).
CURVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vqgan": ("vqgan", ("loss", "l2", "eval/psnr")),
    "t2i": ("t2i", ("loss", "eval/loss")),
    "contrastive": ("contrastive", ("loss", "eval/loss")),
    "upsampler": ("upsampler", ("loss", "psnr", "eval/psnr")),
}
# The stages in the time table, with what each does (the report's own stage is not listed).
STAGE_WORDS: dict[str, str] = {
    "world": "generate the shapes world (preview, splits)",
    "vocab": "text vocabulary (SentencePiece)",
    "vqgan": "train the ViT-VQGAN",
    "codes": "precompute image codes",
    "t2i": "train the encoder-decoder",
    "contrastive": "train the contrastive model (the reranker)",
    "upsampler": "train the upsampler",
    "sample": "sample the prompt grid",
    "eval": "eval: shapes judge + reconstruction",
    "inspect": "parti-jax inspect: attention, probabilities, probes",
}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's contents; {} when missing, torn or not an object."""
    try:
        return _json_object(path.read_text())
    except OSError:
        return {}


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def plot_curves(metrics_file: Path, keys: Sequence[str], out_png: Path, title: str) -> list[str]:
    """Draws each of `keys` present in a metrics.jsonl against the step; returns those drawn
    (none: nothing is written)."""
    try:
        rows = [_json_object(line) for line in metrics_file.read_text().splitlines()]
    except OSError:
        return []
    series = {}
    for key in keys:
        points = {
            r["step"]: r[key]
            for r in rows
            if isinstance(r.get("step"), int | float) and isinstance(r.get(key), int | float)
        }
        if points:
            series[key] = sorted(points.items())  # a resumed run may repeat steps
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.0), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(f"{title}: {key}", fontsize=9)
        ax.set_xlabel("step")
        if key.endswith("loss") and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return list(series)


def _link(target: Path, report_dir: Path, text: str) -> str:
    if not target.exists():
        return H.esc(text) + ' <span class="muted">(not written)</span>'
    href = H.image_src(H.relative_path(target, report_dir))
    return f'<a href="{H.esc(href)}">{H.esc(text)}</a>'


def _img(target: Path, report_dir: Path, title: str, caption: str | None = None) -> str:
    return H.img_tag(H.relative_path(target, report_dir), title=title, caption=caption)


def _headline_section(
    eval_metrics: Mapping[str, Any], total: float, vqgan_summary: Mapping[str, Any]
) -> str:
    shapes_m = eval_metrics.get("shapes") or {}
    ind, held = shapes_m.get("in_distribution") or {}, shapes_m.get("heldout") or {}
    if not shapes_m:
        return '<p id="headline" class="muted">No eval results yet (stage eval has not run).</p>'
    scorer = shapes_m.get("scorer")
    draws = shapes_m.get("num_samples")
    every_draw = "one_draw" in ind  # N draws, each judged: one draw beside best-of-N
    how = (
        f"{draws} draws per caption, each judged: one draw is draw 0 (as a one-draw eval), "
        f"best-of-{draws} the {scorer} scorer's pick, the oracle any accepted draw"
        if every_draw
        else f"{draws} draw(s) per caption, reranked by the judge itself (best-of-{draws})"
        if scorer == "shapes_judge"
        else f"{draws} draw(s) per caption, reranked by {scorer or 'the likelihood'}"
        if draws and draws > 1
        else "one draw per caption, no reranking"
    )

    def block(group: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        return group.get(name) or {}

    contrastive = block(block(ind, "contrastive"), "r_precision_real")
    reranked = (
        [
            ["in-distribution accuracy, one draw", H.pct(block(ind, "one_draw").get("accuracy")),
             ind.get("num_scenes")],
            [f"  best of {draws} by the {scorer} scorer", H.pct(ind.get("accuracy")), ""],
            [f"  best of {draws} by the judge (oracle)",
             H.pct(block(ind, "oracle").get("accuracy")), ""],
            ["held-out accuracy, one draw / best of N / oracle",
             " / ".join(H.pct(block(held, k).get("accuracy")) if k else H.pct(held.get("accuracy"))
                        for k in ("one_draw", None, "oracle")), held.get("num_scenes")],
            ["scorer picks an accepted draw (scenes with one accepted and one not)",
             H.pct(block(ind, "scorer_agreement").get("rate")),
             block(ind, "scorer_agreement").get("num_scenes")],
            ["contrastive model: near-miss R-precision on the real scenes",
             H.pct(contrastive.get("r_precision")), contrastive.get("num_scenes")],
        ]
        if every_draw
        else [["in-distribution accuracy", H.pct(ind.get("accuracy")), ind.get("num_scenes")]]
    )  # fmt: skip
    which = f" (best of {draws})" if every_draw else ""
    rows = [
        *reranked,
        [f"  one-object scenes{which}", H.pct((ind.get("one_object") or {}).get("accuracy")),
         (ind.get("one_object") or {}).get("num_scenes")],
        [f"  two-object scenes{which}", H.pct((ind.get("two_objects") or {}).get("accuracy")),
         (ind.get("two_objects") or {}).get("num_scenes")],
        *([] if every_draw else [["held-out accuracy (unseen colour-shape pairs)",
                                  H.pct(held.get("accuracy")), held.get("num_scenes")]]),
        ["two-object share (in-distribution)", H.pct(ind.get("two_object_share")), ""],
        ["judge false-accept rate on near misses",
         H.pct((ind.get("near_miss") or {}).get("false_accept_rate")),
         (ind.get("near_miss") or {}).get("num_captions")],
        ["VQGAN reconstructions accepted by the judge (validation)",
         H.pct(vqgan_summary.get("reconstruction_judge_acceptance")),
         vqgan_summary.get("judged_images", "")],
        ["total time of all stages", f"{total:.0f} s", ""],
    ]  # fmt: skip
    return (
        '<section id="headline"><h2>Headline</h2>'
        + H.table(["", "value", "scenes"], rows, numeric={1, 2})
        + f'<p class="muted">The shapes judge reads colour, shape, size, position and '
        f"relations back from the pixels and accepts an image only if every attribute its "
        f"caption states is right; {H.esc(how)}.</p></section>"
    )


def _stage_table(stage_seconds: Mapping[str, float], workdir: Path) -> str:
    rows = []
    for stage, words in STAGE_WORDS.items():
        seconds = stage_seconds.get(stage)
        summary = _read_json(workdir / "stages" / f"{stage}.json").get("summary") or {}
        detail = "; ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary.items()
            if isinstance(v, (int, float, str)) and k != "page"
        )
        rows.append([stage, words, "not run" if seconds is None else f"{seconds:.1f}", detail])
    total = sum(stage_seconds.values())
    rows.append(["total", "", f"{total:.1f}", ""])
    return (
        '<section id="stage-times"><h2>Time per stage (seconds)</h2>'
        + H.table(["stage", "what", "seconds", "summary"], rows, numeric={2})
        + "</section>"
    )


def _samples_section(workdir: Path, report_dir: Path, heldout_prompts: Sequence[str]) -> str:
    manifest = _read_json(workdir / "samples" / "manifest.json")
    images = manifest.get("images") or []
    if not images:
        return '<section id="samples"><h2>Samples</h2><p class="muted">none yet</p></section>'
    held = set(heldout_prompts)
    cards = []
    for entry in images:
        if entry.get("rank") not in (0, None):
            continue
        prompt = str(entry.get("prompt", ""))
        path = workdir / "samples" / str(entry.get("file", ""))
        figures = _img(path, report_dir, prompt, "upsampled")
        if entry.get("low_res_file"):
            figures += _img(workdir / "samples" / str(entry["low_res_file"]), report_dir, prompt,
                            "VQGAN output")  # fmt: skip
        tag = '<span class="tag">held-out pair</span>' if prompt in held else ""
        cards.append(
            f'<article class="card"><div class="prompt">{H.esc(prompt)}</div>'
            f'<div class="meta">{tag}score {float(entry.get("score", 0.0)):.3f}'
            f'</div><div class="images">{figures}</div></article>'
        )
    sampling = manifest.get("sampling") or {}
    words = ", ".join(f"{k} {v}" for k, v in sampling.items() if not isinstance(v, (dict, list)))
    return (
        '<section id="samples"><h2>Samples</h2>'
        f'<p class="muted">{H.esc(words)}</p><div class="cards">{"".join(cards)}</div></section>'
    )


def _curves_section(workdir: Path, report_dir: Path) -> str:
    figures = []
    for stage, (folder, keys) in CURVES.items():
        png = report_dir / PLOTS_DIR / f"{stage}_loss.png"
        drawn = plot_curves(workdir / folder / "metrics.jsonl", keys, png, stage)
        if drawn:
            href = H.image_src(H.relative_path(png, report_dir))
            figures.append(
                f'<figure class="plot"><img src="{H.esc(href)}" alt="{H.esc(stage)} curves">'
                f"<figcaption>{H.esc(stage)}: {H.esc(', '.join(drawn))}</figcaption></figure>"
            )
        else:
            figures.append(f'<p class="muted">{H.esc(stage)}: no metrics logged yet</p>')
    return '<section id="curves"><h2>Loss curves</h2>' + "".join(figures) + "</section>"


def _inspect_section(workdir: Path, report_dir: Path) -> str:
    """The inspect stage's figures (`parti-jax inspect`) and its page, framed in place."""
    from parti_jax.eval.inspection_report import JSON_FILE, PAGE_FILE, _summary_tables

    record = _read_json(workdir / "inspect" / JSON_FILE)
    page = workdir / "inspect" / PAGE_FILE
    if not record or not page.exists():
        return ""
    src = H.image_src(H.relative_path(page, report_dir))
    return (
        '<section id="inspect"><h2>Inside the model: why held-out pairs fail</h2>'
        f"<p>{_link(page, report_dir, 'the whole inspect page')} (cross-attention of every "
        "caption word, per-position probabilities, the teacher-forced probe per scene; "
        "docs/COMPOSITIONALITY.md reads these figures).</p>"
        + _summary_tables(record)
        + f'<iframe src="{H.esc(src)}" title="parti-jax inspect" loading="lazy" '
        'style="width:100%;height:900px;border:1px solid var(--line)"></iframe></section>'
    )


def write_demo_report(
    workdir: str | os.PathLike,
    *,
    stage_seconds: Mapping[str, float],
    heldout_prompts: Sequence[str] = (),
    machine: str = "",
) -> Path:
    """Writes `<workdir>/report/index.html` (+ plots/) from what the stages left; returns it."""
    workdir = Path(workdir)
    report_dir = workdir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    eval_metrics = _read_json(workdir / "eval" / "metrics.json")
    total = float(sum(stage_seconds.values()))
    grids = sorted(
        (workdir / "vqgan" / "images").glob("step_*.png"),
        key=lambda p: int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else -1,
    )
    pictures = "".join(
        _img(path, report_dir, title, caption)
        for path, title, caption in (
            (workdir / "world" / "preview.png", "shapes world: training examples", "world preview"),
            (
                (grids or [None])[-1],
                "validation images (top) and VQGAN reconstructions (bottom)",
                "VQGAN: inputs / reconstructions",
            ),
        )  # fmt: skip
        if path is not None and path.exists()
    )
    recon = (eval_metrics.get("reconstruction") or {}).get("vqgan") or {}
    recon_rows = [[k, f"{v:.3f}"] for k, v in sorted(recon.items()) if isinstance(v, float)]
    links = " · ".join(
        _link(workdir / rel, report_dir, text)
        for rel, text in (
            ("eval/shapes/report.html", "shapes eval report"),
            ("eval/index.html", "all eval suites"),
            ("eval/reconstruction/report.html", "reconstruction report"),
            ("world/world.json", "world.json"),
        )
    )
    body = (
        "<header><h1>parti_jax demo: the shapes world</h1>"
        f'<div class="muted">{H.esc(str(workdir))} · {H.esc(machine)}</div></header>'
        + _headline_section(
            eval_metrics,
            total,
            _read_json(workdir / "stages" / "vqgan.json").get("summary") or {},
        )
        + _stage_table(stage_seconds, workdir)
        + _samples_section(workdir, report_dir, heldout_prompts)
        + _curves_section(workdir, report_dir)
        + _inspect_section(workdir, report_dir)
        + '<section id="pictures"><h2>World and tokenizer</h2>'
        + f'<div class="images">{pictures}</div>'
        + (
            H.table(["VQGAN reconstruction (validation)", "value"], recon_rows)
            if recon_rows
            else ""
        )  # fmt: skip
        + "</section>"
        + f"<p>{links}</p>"
    )
    css = (
        "<style>figure.plot img { width: auto; height: 260px; }"
        " #pictures figure img { width: 256px; height: 256px; }"
        " #samples figure img, #pictures figure img { image-rendering: pixelated; }</style>"
    )
    return H.write_page(report_dir / "index.html", "parti_jax demo", body, head_extra=css)
