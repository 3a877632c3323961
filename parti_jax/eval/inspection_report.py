"""`parti-jax inspect`: runs the instruments of `inspection.py` and writes them out.

    <out>/inspect.json   every figure and per-scene view (numbers only)
    <out>/index.html     one self-contained page (images inline as PNG data URIs):
                         the diagnosis figures, the linear probes, then per scene the
                         sampled image with each caption word's cross-attention
                         (layer mean, or one layer: the buttons), p(chosen code),
                         entropy, the least likely cells' top alternatives, and the
                         teacher-forced probe on the scene's true image

Scenes come from the shapes world (eval scenes, in-distribution and held-out, as
the shapes suite picks them) or from --prompt (sampled views only: a prompt has no
true image to probe against).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import html as H
from parti_jax.eval import inspection as I
from parti_jax.eval.records import write_atomic

JSON_FILE = "inspect.json"
PAGE_FILE = "index.html"
SCALE = 4  # heatmap and image pixels per source pixel on the page


def run_inspection(
    t2i_workdir: str | os.PathLike,
    vqgan_workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    codes_dir: str | os.PathLike | None = None,
    prompts: Sequence[str] | None = None,
    num_in_distribution: int = 4,
    num_heldout: int = 4,
    num_probe_scenes: int = 100,
    num_probe_captions: int = 1500,
    temperature: float = 0.3,
    guidance_scale: float | None = 1.2,
    seed: int = 0,
    world_seed: int = 0,
) -> dict[str, Any]:
    """Runs every instrument and writes `inspect.json` and `index.html` into `out`.

    Args:
      t2i_workdir, vqgan_workdir: the trained encoder-decoder and VQGAN.
      codes_dir: the encoder-decoder's training codes (`precompute-codes` output,
        the `train` split folder or its parent); None skips the code-coverage figures.
      prompts: sample these instead of shapes-world eval scenes for the per-scene views.
      num_in_distribution, num_heldout: eval scenes with per-scene views.
      num_probe_scenes: scenes per group for the teacher-forced probes and the tokenizer
        check (0 skips both).
      num_probe_captions: 'train' captions the linear probes are fitted on (0 skips them).
      temperature, guidance_scale, seed: how the per-scene images are drawn (the demo's).
    """
    t0 = time.time()
    inspector = I.Inspector.load(t2i_workdir, vqgan_workdir)
    size = inspector.image_tokenizer.image_size
    colors = I.code_colors(inspector.image_tokenizer)
    summary: dict[str, Any] = {
        "t2i_workdir": os.fspath(t2i_workdir), "vqgan_workdir": os.fspath(vqgan_workdir),
        "codes_dir": None if codes_dir is None else os.fspath(codes_dir),
        "sampling": {"temperature": temperature, "guidance_scale": guidance_scale, "seed": seed},
    }  # fmt: skip

    # Per-scene views: sampled images.
    if prompts:
        captions, truth, scenes = list(prompts), None, None
        ids = list(range(len(captions)))
    else:
        scenes, truth = I.scene_set(num_in_distribution, num_heldout, world_seed=world_seed,
                                    image_size=size)  # fmt: skip
        captions, ids = [s.caption for s in scenes], [s.prompt_id for s in scenes]
    codes = inspector.sample(captions, temperature=temperature, guidance_scale=guidance_scale,
                             seed=seed, prompt_ids=ids)  # fmt: skip
    views = I.scene_views(inspector, captions, codes)
    probes_of_views = I.teacher_forced_probes(inspector, scenes, truth, colors) if scenes else None
    from parti_jax.data.judge import judge

    for i, view in enumerate(views):
        view["group"] = scenes[i].group if scenes else "prompt"
        try:
            verdict = judge(view["image"], view["caption"])
            view["judge"] = {"match": bool(verdict.match), "attributes": verdict.attributes}
        except ValueError:  # not a shapes-world caption: nothing to judge it by
            view["judge"] = None
        if probes_of_views:
            view["probe"] = probes_of_views[i]
            view["true_image"] = truth[i]

    # Group figures: teacher-forced probes and the tokenizer check.
    groups: dict[str, Any] = {}
    if num_probe_scenes:
        usage = None
        if codes_dir is not None:
            usage = I.training_code_usage(
                _train_codes(codes_dir), inspector.image_tokenizer.codebook_size,
                inspector.config.num_image_tokens,
            )  # fmt: skip
        # The eval scenes 0..n-1 of each group (the views above are the first of them).
        all_scenes, all_images = I.scene_set(num_probe_scenes, num_probe_scenes,
                                             world_seed=world_seed, image_size=size)  # fmt: skip
        rows = I.teacher_forced_probes(inspector, all_scenes, all_images, colors)
        for group in ("in_distribution", "heldout"):
            pick = [i for i, s in enumerate(all_scenes) if s.group == group]
            one = [i for i in pick if all_scenes[i].num_objects == 1]
            groups[group] = {
                "teacher_forced": I.summarize_probes([rows[i] for i in pick]),
                "teacher_forced_one_object": I.summarize_probes([rows[i] for i in one]),
                "tokenizer": I.tokenizer_check(
                    inspector, [all_scenes[i] for i in pick], all_images[pick], usage
                ),
            }
    summary["groups"] = groups
    summary["linear_probes"] = (
        I.linear_probes(inspector, num_train=num_probe_captions, world_seed=world_seed)
        if num_probe_captions
        else None
    )
    summary["seconds"] = round(time.time() - t0, 1)
    out_dir = storage.path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**summary, "scenes": [_view_json(v) for v in views]}
    write_atomic(out_dir / JSON_FILE, json.dumps(record, indent=1, allow_nan=False) + "\n")
    write_page(out_dir / PAGE_FILE, summary, views, inspector.config.num_decoder_layers,
               tuple(inspector.image_tokenizer.grid))  # fmt: skip
    return record


def _train_codes(codes_dir: str | os.PathLike) -> str:
    """The `train` split folder of a precompute-codes output (or the folder itself)."""
    path = storage.path(codes_dir)
    return (
        os.fspath(path / "train")
        if (path / "train" / "codes_meta.json").exists()
        else os.fspath(path)
    )


def _view_json(view: dict[str, Any]) -> dict[str, Any]:
    """A scene view without pixels: numbers rounded for a readable JSON file."""
    out = {
        "caption": view["caption"], "group": view["group"], "words": view["words"],
        "judge": view["judge"], "positions": view["positions"],
        "attention_mean": np.round(view["attention_mean"], 4).tolist(),
        "attention_per_layer": np.round(view["attention"], 4).tolist(),
        "alternatives": {k: view["alternatives"][k] for k in ("cells", "codes")},
    }  # fmt: skip
    if "probe" in view:
        out["probe"] = {k: v for k, v in view["probe"].items() if k != "patches"}
    return out


# --------------------------------------------------------------------- drawing
def png_data_uri(image: np.ndarray, scale: int = SCALE) -> str:
    """float [H, W, 3] in [0, 1] -> 'data:image/png;base64,...', upscaled by pixel repetition."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heat(values: np.ndarray, grid: tuple[int, int], image: np.ndarray | None = None) -> np.ndarray:
    """Values [h * w] -> an RGB heatmap at the image's size (magma, scaled to the max),
    blended over a dimmed `image` when given."""
    from matplotlib import colormaps

    v = np.asarray(values, np.float32).reshape(grid)
    v = v / max(float(v.max()), 1e-9)
    rgb = colormaps["magma"](v)[..., :3]
    if image is not None:
        ry, rx = image.shape[0] // grid[0], image.shape[1] // grid[1]
        rgb = rgb.repeat(ry, 0).repeat(rx, 1)
        return 0.65 * rgb + 0.35 * image
    return rgb


def _img(image: np.ndarray, title: str, scale: int = SCALE, cls: str = "") -> str:
    klass = f' class="{H.esc(cls)}"' if cls else ""
    return (
        f'<figure{klass}><img src="{png_data_uri(image, scale)}" alt="{H.esc(title)}" '
        f'title="{H.esc(title)}"><figcaption>{H.esc(title)}</figcaption></figure>'
    )


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _summary_tables(summary: dict[str, Any]) -> str:
    groups = summary.get("groups") or {}
    parts = []
    if groups:
        rows = []
        labels = [
            ("reconstructions the judge accepts", "tokenizer", "reconstruction_accepted"),
            ("object codes never a training target", "tokenizer", "object_codes_never_a_target"),
            ("object (cell, code) pairs never a target at that cell", "tokenizer",
             "object_cell_codes_never_a_target_there"),
            ("images with a code never a target", "tokenizer", "images_with_an_unseen_code"),
            ("teacher-forced: object cells predicted right", "teacher_forced_one_object",
             "object_cell_accuracy"),
            ("teacher-forced: p(true code) at the first object cell", "teacher_forced_one_object",
             "mean_p_true_first_object_cell"),
            ("  mass there on the caption's colour", "teacher_forced_one_object",
             "first_object_cell_mass_stated_color"),
            ("  mass there on background", "teacher_forced_one_object",
             "first_object_cell_mass_background"),
            ("  mass there on another colour", "teacher_forced_one_object",
             "first_object_cell_mass_other_color"),
            ("first error at the first object cell", "teacher_forced_one_object",
             "first_error_at_first_object_cell"),
            ("cross-attention there on the colour word", "teacher_forced_one_object",
             "first_object_cell_attention_color_word"),
            ("cross-attention there on the shape word", "teacher_forced_one_object",
             "first_object_cell_attention_shape_word"),
        ]  # fmt: skip
        for label, block, key in labels:
            rows.append([label, *(_pct((groups.get(g, {}).get(block) or {}).get(key))
                                  for g in ("in_distribution", "heldout"))])  # fmt: skip
        n = {g: (groups.get(g, {}).get("tokenizer") or {}).get("scenes") for g in groups}
        parts.append(
            "<h2>Where held-out pairs fail</h2>"
            f"<p class=muted>Scenes per group: {H.esc(n)}; teacher-forced rows are one-object "
            "scenes, the true image's codes fed to the decoder. Decoder slot t predicts cell t.</p>"
            + H.table(["figure", "in-distribution", "held-out pairs"], rows, numeric={1, 2})
        )
    probes = (summary.get("linear_probes") or {}).get("probes") or {}
    if probes:
        rows = [
            [name.replace("_", " "), e.get("train"), _pct(e.get("seen_pairs")),
             _pct(e.get("heldout_pairs")), e.get("heldout_pairs_n")]
            for name, e in probes.items()
        ]  # fmt: skip
        chance = summary["linear_probes"]["chance"]
        parts.append(
            "<h2>Linear probes on the text encoder</h2><p class=muted>Logistic-regression probes fitted "
            "on captions of seen pairs; read back on seen pairs and on objects whose pair was "
            f"held out. Chance: colour {_pct(chance['color'])}, shape {_pct(chance['shape'])}.</p>"
            + H.table(
                ["probe", "fitted on", "seen pairs", "held-out pairs", "held-out n"],
                rows,
                numeric={1, 2, 3, 4},
            )  # fmt: skip
        )
    return "".join(parts)


def _scene_card(index: int, view: dict[str, Any], grid: tuple[int, int], layers: int) -> str:
    image = view["image"]
    verdict = (
        "not judged"
        if view["judge"] is None
        else ("the judge: passes" if view["judge"]["match"] else "the judge: fails")
    )
    head = (
        f"<h3>{H.esc(view['caption'])} <span class=muted>({H.esc(view['group'])}; "
        f"{verdict})</span></h3>"
    )
    figures = [_img(image, "sampled image")]
    pos = view["positions"]
    figures.append(_img(heat(pos["p_chosen"], grid), "p(chosen code) per cell", SCALE * 4))
    figures.append(_img(heat(pos["entropy"], grid), "entropy per cell", SCALE * 4))
    maps = []
    for w, word in enumerate(view["words"]):
        maps.append(_img(heat(view["attention_mean"][w], grid, image), word, cls="layer-mean"))
        for layer in range(layers):
            maps.append(
                _img(
                    heat(view["attention"][layer, w], grid, image),
                    f"{word} (layer {layer})",
                    cls=f"layer-{layer}",
                )  # fmt: skip
            )
    alts = []
    a = view["alternatives"]
    for i, cell in enumerate(a["cells"]):
        cells = [
            _img(a["patches"][i, j], f"code {code}: p={pos['top_p'][cell][j]:.3f}", SCALE * 4)
            for j, code in enumerate(a["codes"][i])
        ]
        chosen = f"cell {cell} (row {cell // grid[1]}, col {cell % grid[1]}): chose p={pos['p_chosen'][cell]:.3f}"
        alts.append(f"<div class=alt><div class=muted>{H.esc(chosen)}</div>{''.join(cells)}</div>")
    probe = ""
    if "probe" in view:
        p = view["probe"]
        marks = np.asarray(p["p_true"], np.float32)
        text = (
            f"first object cell {p['first_object_cell']}, first wrong object cell "
            f"{p['first_wrong_object_cell']}; p(true) at the first object cell "
            f"{p['p_true_first_object_cell'] if p['p_true_first_object_cell'] is None else round(p['p_true_first_object_cell'], 4)}"
        )
        probe_figs = [_img(view["true_image"], "true image"),
                      _img(heat(marks, grid), "teacher-forced p(true code)", SCALE * 4)]  # fmt: skip
        if "patches" in p:
            probe_figs.append(
                _img(p["patches"]["true"], f"true patch ({p.get('true_color')})", SCALE * 4)
            )
            probe_figs.append(
                _img(
                    p["patches"]["preferred"],
                    f"preferred patch ({p.get('preferred_color')})",
                    SCALE * 4,
                )
            )
        probe = (f"<h4>Teacher-forced probe</h4><p class=muted>{H.esc(text)}</p>"
                 f"<div class=figs>{''.join(probe_figs)}</div>")  # fmt: skip
    return (
        f'<section class=scene id="scene-{index}">{head}<div class=figs>{"".join(figures)}</div>'
        f'<h4>Cross-attention per caption word</h4><div class="figs maps">{"".join(maps)}</div>'
        f"<h4>Least likely cells: the top alternatives, decoded in place</h4>{''.join(alts)}"
        f"{probe}</section>"
    )


PAGE_CSS = """
.figs { display: flex; flex-wrap: wrap; gap: .5rem; }
figure { margin: 0; text-align: center; }
figure img { image-rendering: pixelated; display: block; }
figcaption { font-size: 12px; color: var(--muted); max-width: 140px; overflow-wrap: anywhere; }
.scene { border-top: 1px solid var(--line); margin-top: 1rem; }
.alt { display: flex; gap: .5rem; align-items: center; margin: .25rem 0; }
.maps figure { display: none; }
body[data-layer="mean"] .maps .layer-mean { display: block; }
"""

PAGE_SCRIPT = """
const buttons = $$('button[data-layer]');
function show(layer) {
  document.body.dataset.layer = layer;
  buttons.forEach(b => b.classList.toggle('selected', b.dataset.layer === layer));
}
buttons.forEach(b => b.addEventListener('click', () => show(b.dataset.layer)));
show('mean');
"""


def write_page(
    path: Any,
    summary: dict[str, Any],
    views: Sequence[dict[str, Any]],
    layers: int,
    grid: tuple[int, int],
) -> Any:
    """The page: summary tables, then one card per scene view."""
    css = PAGE_CSS + "".join(
        f'body[data-layer="{i}"] .maps .layer-{i} {{ display: block; }}\n' for i in range(layers)
    )
    buttons = "".join(
        f'<button data-layer="{H.esc(k)}">{H.esc(label)}</button>'
        for k, label in [("mean", "all layers"), *((str(i), f"layer {i}") for i in range(layers))]
    )
    sampling = summary["sampling"]
    body = (
        "<header><h1>Inside the encoder-decoder</h1>"
        f"<div class=muted>{H.esc(summary['t2i_workdir'])} · VQGAN {H.esc(summary['vqgan_workdir'])}"
        f" · sampled at temperature {H.esc(sampling['temperature'])}, guidance "
        f"{H.esc(sampling['guidance_scale'])}, seed {H.esc(sampling['seed'])} · "
        f"{H.esc(summary['seconds'])} s</div>"
        f"<div class=controls>cross-attention maps: {buttons}</div></header>"
        + _summary_tables(summary)
        + "<h2>Scenes</h2>"
        + "".join(_scene_card(i, v, grid, layers) for i, v in enumerate(views))
    )
    return H.write_page(path, "parti_jax inspect", body, script=PAGE_SCRIPT,
                        head_extra=f"<style>{css}</style>")  # fmt: skip
