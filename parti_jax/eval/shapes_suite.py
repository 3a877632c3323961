"""Shapes-world faithfulness: does the model draw what the caption says? The judge decides.

Captions come from the world's 'validation' split ("in_distribution": unseen
scenes of (colour, shape) pairs seen in training; prompt id i) and 'heldout'
split (each scene has a pair never seen in training; HELDOUT_ID_OFFSET + i).
The judge (parti_jax/data/judge.py) reads the objects back from every kept
image and checks every attribute the caption states; "accuracy" is the best
(top-ranked) image's.

Beside the accuracy stands the judge's false-accept rate on near-miss captions
of the same images (one attribute changed). A near miss counts only where it is
certainly wrong: the image was accepted for its own caption, and that caption
stated the changed attribute; the others are counted as excluded. Each record's
`extra` holds the verdicts, the kept images' draw indices and the near misses,
so a resume recomputes the metrics from the manifest. Categories are the groups
and challenges "one object" / "two objects", so the gallery groups them.

With keep_top_k == num_samples = N > 1 every draw is judged, and each group
adds: `one_draw` (draw 0's verdict: the same image as a 1-draw eval with the
same seed, since a draw's randomness is fold_in(seed, prompt_id, draw)),
`best_of_n` (the scorer's pick, the top-ranked image: "accuracy" again),
`oracle` (any of the N draws accepted: best-of-N by the judge) and
`scorer_agreement` (among scenes with an accepted and a rejected draw, the
share where the scorer picked an accepted one).

With a contrastive model (the generator's, from eval.contrastive_dir) each
group adds `contrastive` (parti_jax/eval/contrastive_metrics.py): the CLIP
score of the best image and of the scene's real image (the world's own
rendering), R-precision against the caption's stated near misses
(`shapes.near_miss_captions(stated=...)`, drawn from (near_miss_seed,
prompt_id) on a stream apart from the judge's) for the best generated image
and for the real one (the contrastive model's own quality figure), and its
agreement with the judge: the AUC of its similarity against the judge's
verdict over all kept images. It reads the saved images after generation.
metrics.json::

    {"suite": "shapes", "num_samples", "keep_top_k", "seed", "scorer", "world_seed",
     "contrastive_model": {"checkpoint", "step", ...},   # with a contrastive model
     "in_distribution": GROUP, "heldout": GROUP}
    GROUP = {"num_scenes", "num_two_object", "two_object_share",
             "accuracy",                          # best image matches every stated attribute
             "attributes": {"color"|"shape"|"size"|"position"|"relation"|"count":
                            {"accuracy", "num_stated"}},
             "one_object": {"num_scenes", "accuracy", "attributes"},
             "two_objects": {...},
             "all_kept_images": {"num_images", "accuracy"},
             "near_miss": {"num_captions", "num_accepted", "false_accept_rate",
                           "num_excluded", "per_attribute": {attr: {"num_captions",
                           "num_accepted", "false_accept_rate"}}},
             # keep_top_k == num_samples > 1:
             "one_draw" | "best_of_n" | "oracle": DRAWS,
             "scorer_agreement": {"num_scenes", "num_agree", "rate",
                                  "one_object": {...}, "two_objects": {...}},
             # with a contrastive model:
             "contrastive": {"num_scenes",
                             "clip_score",        # mean cosine: best image vs its caption
                             "clip_score_real",   # mean cosine: real image vs its caption
                             "r_precision_generated": RPREC, "r_precision_real": RPREC,
                             "agreement_with_judge": {"auc", "num_images", "num_accepted"}}}
    DRAWS = {"num_scenes", "num_accepted", "accuracy",
             "one_object": {"num_scenes", "num_accepted", "accuracy"}, "two_objects": {...}}
    RPREC = {"num_scenes", "r_precision",         # caption above all its near misses
             "num_near_misses", "near_miss_accuracy",   # caption above a near miss, pairwise
             "per_attribute": {attr: {"num_near_misses", "r_precision"}}}

An accuracy or rate with nothing to count is null.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import contrastive_metrics as CM
from parti_jax.eval import gallery
from parti_jax.eval import html as H
from parti_jax.eval import records as R
from parti_jax.eval import suites as S

NAME = "shapes"
HELDOUT_ID_OFFSET = 1_000_000
GROUPS = {"in_distribution": "validation", "heldout": "heldout"}
ONE, TWO = "one object", "two objects"
DRAW_BLOCKS = ("one_draw", "best_of_n", "oracle")
# The R-precision near misses: a stream of (near_miss_seed, prompt_id) apart from the judge's.
_R_PRECISION_STREAM = 1


@dataclasses.dataclass(frozen=True)
class ShapesScene:
    """One eval scene: where it comes from, its caption and what the caption states."""

    prompt_id: int
    group: str  # "in_distribution" | "heldout"
    split: str  # the world's split: "validation" | "heldout"
    index: int
    caption: str
    spec: Any  # shapes.SceneSpec
    requirements: Any  # shapes.CaptionRequirements

    @property
    def num_objects(self) -> int:
        return len(self.spec.objects)

    def eval_prompt(self) -> R.PromptRecord:
        return R.PromptRecord(
            self.prompt_id, self.caption, self.group, ONE if self.num_objects == 1 else TWO
        )


def shapes_scenes(
    num_in_distribution: int,
    num_heldout: int,
    *,
    world_seed: int = 0,
    world_config: Any = None,
) -> list[ShapesScene]:
    """Validation scenes 0..n-1 then heldout scenes 0..m-1 (no images drawn)."""
    from parti_jax.data import shapes
    from parti_jax.data.shapes_parsing import parse_caption

    config = world_config or shapes.ShapesWorldConfig()
    out = []
    for group, count, offset in (
        ("in_distribution", num_in_distribution, 0),
        ("heldout", num_heldout, HELDOUT_ID_OFFSET),
    ):
        if count < 0:
            raise S.SuiteError(f"{NAME}: num_{group} must be >= 0, got {count}")
        split = GROUPS[group]
        for i in range(count):
            spec, caption = shapes.generate_scene(i, split, world_seed, config)
            req = parse_caption(caption)
            out.append(ShapesScene(offset + i, group, split, i, caption, spec, req))
    return out


def _determined(attribute: str, req: Any) -> bool:
    """Whether a near miss changing `attribute` is certainly wrong for an image that the
    judge accepted for a caption stating `req`."""
    if attribute == "count" or (attribute == "relation" and req.relation is not None):
        return True
    field = "cell" if attribute in ("position", "relation") else attribute
    return all(getattr(o, field) is not None for o in req.objects)


def make_judge_hook(
    scenes: Sequence[ShapesScene], *, near_miss_seed: int = 0, judge_config: Any = None,
    world_config: Any = None,
) -> S.ResultHook:  # fmt: skip
    """The per-prompt hook: verdicts of every kept image, their draw indices
    (`result.sample_indices`, when the generator gives them), near misses of the best one."""
    from parti_jax.data import judge, shapes
    from parti_jax.data.shapes_parsing import parse_caption

    by_id = {s.prompt_id: s for s in scenes}
    config = world_config or shapes.ShapesWorldConfig()

    def hook(prompt: R.PromptRecord, images: list[np.ndarray], paths: list[str], result: Any):
        del paths
        scene = by_id[prompt.prompt_id]
        detections = [judge.analyse(image, judge_config) for image in images]
        verdicts = []
        for found in detections:
            v = judge.judge_requirements(found, scene.requirements, judge_config)
            verdicts.append({"match": bool(v.match), "attributes": dict(v.attributes)})
        rng = np.random.default_rng([int(near_miss_seed), int(prompt.prompt_id)])
        near = []
        for caption, attribute in shapes.near_miss_captions(scene.spec, rng, config):
            v = judge.judge_requirements(detections[0], parse_caption(caption), judge_config)
            sure = _determined(attribute, scene.requirements)
            near.append(
                dict(caption=caption, attribute=attribute, accepted=bool(v.match), determined=sure)
            )
        where = dict(split=scene.split, index=scene.index, num_objects=scene.num_objects)
        draws = getattr(result, "sample_indices", None)
        if draws is not None:
            where["sample_indices"] = [int(i) for i in np.asarray(draws).reshape(-1)]
        return {**where, "verdicts": verdicts, "near_misses": near}

    return hook


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _accuracy_block(records: Sequence[R.PromptRecord]) -> dict[str, Any]:
    from parti_jax.data.judge import ATTRIBUTES

    best = [r.extra["verdicts"][0] for r in records]
    attributes = {}
    for a in ATTRIBUTES:
        stated = [v["attributes"].get(a) for v in best if v["attributes"].get(a) is not None]
        attributes[a] = {"accuracy": _rate(sum(map(bool, stated)), len(stated)),
                         "num_stated": len(stated)}  # fmt: skip
    return {
        "num_scenes": len(records),
        "accuracy": _rate(sum(v["match"] for v in best), len(best)),
        "attributes": attributes,
    }


def _near_miss_block(records: Sequence[R.PromptRecord]) -> dict[str, Any]:
    counted: dict[str, list[bool]] = {}
    excluded = 0
    for r in records:
        accepted_own = r.extra["verdicts"][0]["match"]
        for n in r.extra["near_misses"]:
            if accepted_own and n["determined"]:
                counted.setdefault(n["attribute"], []).append(bool(n["accepted"]))
            else:
                excluded += 1
    flat = [x for v in counted.values() for x in v]
    per_attribute = {a: _accepts(v) for a, v in sorted(counted.items())}
    return {**_accepts(flat), "num_excluded": excluded, "per_attribute": per_attribute}


def _accepts(accepted: list[bool]) -> dict[str, Any]:
    n, hits = len(accepted), sum(accepted)
    return {"num_captions": n, "num_accepted": hits, "false_accept_rate": _rate(hits, n)}


def _draws_block(
    outcomes: Sequence[tuple[int, bool]], hits: str = "num_accepted", rate: str = "accuracy"
) -> dict[str, Any]:
    """(num_objects, outcome) per scene -> counts and rate, overall and per object count."""

    def count(values: list[bool]) -> dict[str, Any]:
        return {"num_scenes": len(values), hits: sum(values), rate: _rate(sum(values), len(values))}

    return {
        **count([v for _, v in outcomes]),
        "one_object": count([v for k, v in outcomes if k == 1]),
        "two_objects": count([v for k, v in outcomes if k == 2]),
    }


def _draws_blocks(records: Sequence[R.PromptRecord]) -> dict[str, Any]:
    """one_draw / best_of_n / oracle / scorer_agreement of scenes whose every draw is kept."""
    picks: dict[str, list[tuple[int, bool]]] = {k: [] for k in (*DRAW_BLOCKS, "agree")}
    for r in records:
        matches = [bool(v["match"]) for v in r.extra["verdicts"]]
        k = r.extra["num_objects"]
        draws = r.extra.get("sample_indices") or []
        if 0 in draws:  # folders judged before draw indices were recorded have none
            picks["one_draw"].append((k, matches[draws.index(0)]))
        picks["best_of_n"].append((k, matches[0]))
        picks["oracle"].append((k, any(matches)))
        if any(matches) and not all(matches):
            picks["agree"].append((k, matches[0]))
    out = {name: _draws_block(picks[name]) for name in DRAW_BLOCKS}
    out["scorer_agreement"] = _draws_block(picks["agree"], "num_agree", "rate")
    return out


def shapes_metrics(
    records: Sequence[R.PromptRecord], *, num_samples: int = 1, keep_top_k: int = 1
) -> dict[str, Any]:
    """Accuracy per attribute and overall, per group and object count, with near misses;
    with keep_top_k == num_samples > 1 also one_draw / best_of_n / oracle / scorer_agreement."""
    every_draw = int(num_samples) == int(keep_top_k) > 1
    out = {}
    for group in GROUPS:
        recs = [r for r in records if r.category == group]
        two = [r for r in recs if r.extra["num_objects"] == 2]
        one = [r for r in recs if r.extra["num_objects"] == 1]
        kept = [v["match"] for r in recs for v in r.extra["verdicts"]]
        block = _accuracy_block(recs)
        block.update(
            num_two_object=len(two),
            two_object_share=_rate(len(two), len(recs)),
            one_object=_accuracy_block(one),
            two_objects=_accuracy_block(two),
            all_kept_images={"num_images": len(kept), "accuracy": _rate(sum(kept), len(kept))},
            near_miss=_near_miss_block(recs),
        )
        if every_draw:
            block.update(_draws_blocks(recs))
        out[group] = block
    return out


def _r_precision_block(rows: Sequence[tuple[float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """(caption's similarity, [(changed attribute, near miss's similarity)]) per scene."""
    from parti_jax.data.judge import ATTRIBUTES

    per: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    scenes = []
    for own, misses in rows:
        beats = [(a, bool(own > s)) for a, s in misses]
        for a, b in beats:
            per.setdefault(a, []).append(b)
        scenes.append(all(b for _, b in beats))
    flat = [b for v in per.values() for b in v]
    return {
        "num_scenes": len(scenes),
        "r_precision": _rate(sum(scenes), len(scenes)),
        "num_near_misses": len(flat),
        "near_miss_accuracy": _rate(sum(flat), len(flat)),
        "per_attribute": {
            a: {"num_near_misses": len(v), "r_precision": _rate(sum(v), len(v))}
            for a, v in per.items()
        },
    }


def contrastive_shapes_metrics(
    model: Any,
    folder: str | os.PathLike,
    records: Sequence[R.PromptRecord],
    scenes: Sequence[ShapesScene],
    *,
    near_miss_seed: int = 0,
    world_config: Any = None,
) -> dict[str, dict[str, Any]]:
    """{group: the `contrastive` block} (module docstring) of the judged `records`, whose
    images are read from `folder`, by `model` (a `ContrastiveModel`)."""
    from parti_jax.data import shapes

    config = world_config or shapes.ShapesWorldConfig()
    by_id = {s.prompt_id: s for s in scenes}
    recs = [r for r in records if r.prompt_id in by_id and r.images]
    misses = []
    for r in recs:
        scene = by_id[r.prompt_id]
        rng = np.random.default_rng([int(near_miss_seed), int(r.prompt_id), _R_PRECISION_STREAM])
        misses.append(shapes.near_miss_captions(scene.spec, rng, config, stated=scene.requirements))
    texts = list(dict.fromkeys([r.prompt for r in recs] + [c for m in misses for c, _ in m]))
    where = {t: i for i, t in enumerate(texts)}
    text_emb = model.embed_texts(texts) if texts else None
    kept_emb = CM.embed_saved_images(model, folder, [p for r in recs for p in r.images])
    # The world draws from 32 px; the model resizes to its own side.
    size = min(max(int(model.config.image_size), 32), 1024)
    real = [shapes.render(by_id[r.prompt_id].spec, size, supersample=config.supersample)
            for r in recs]  # fmt: skip
    real_emb = CM.embed_arrays(model, real)
    rows: dict[str, dict[str, list]] = {
        g: {"best": [], "real": [], "gen_rp": [], "real_rp": [], "kept": [], "match": []}
        for g in GROUPS
    }
    start = 0
    for i, r in enumerate(recs):
        own = text_emb[where[r.prompt]]
        best_emb = kept_emb[start]
        kept = kept_emb[start : start + len(r.images)] @ own
        start += len(r.images)
        attrs = [a for _, a in misses[i]]
        miss_emb = text_emb[[where[c] for c, _ in misses[i]]]
        real_own = float(real_emb[i] @ own)
        row = rows[r.category]
        row["best"].append(float(kept[0]))
        row["real"].append(real_own)
        row["gen_rp"].append((float(kept[0]), list(zip(attrs, (miss_emb @ best_emb).tolist()))))
        row["real_rp"].append((real_own, list(zip(attrs, (miss_emb @ real_emb[i]).tolist()))))
        row["kept"] += kept.tolist()
        row["match"] += [bool(v["match"]) for v in r.extra["verdicts"]]
    out = {}
    for group, row in rows.items():
        out[group] = {
            "num_scenes": len(row["best"]),
            "clip_score": CM.mean(row["best"]),
            "clip_score_real": CM.mean(row["real"]),
            "r_precision_generated": _r_precision_block(row["gen_rp"]),
            "r_precision_real": _r_precision_block(row["real_rp"]),
            "agreement_with_judge": {
                "auc": CM.auc(row["kept"], row["match"]),
                "num_images": len(row["kept"]),
                "num_accepted": sum(row["match"]),
            },
        }
    return out


def _tables(metrics: dict[str, Any]) -> str:
    from parti_jax.data.judge import ATTRIBUTES

    def row(label: str, cell: Callable[[dict], Any]) -> list[Any]:
        return [label, *(cell(metrics[g]) for g in GROUPS)]

    def of(m: dict, rate: str, n: str) -> str:
        return f"{H.pct(m[rate])} of {m[n]}"

    return H.table(
        ["", *GROUPS],
        [
            row("scenes", lambda m: m["num_scenes"]),
            row("two-object share", lambda m: H.pct(m["two_object_share"])),
            row("accuracy (all stated attributes)", lambda m: H.pct(m["accuracy"])),
            row("  one-object scenes", lambda m: H.pct(m["one_object"]["accuracy"])),
            row("  two-object scenes", lambda m: H.pct(m["two_objects"]["accuracy"])),
            *(
                row(
                    f"{a} accuracy", lambda m, a=a: of(m["attributes"][a], "accuracy", "num_stated")
                )
                for a in ATTRIBUTES
            ),
            row(
                "judge false-accept rate on near misses",
                lambda m: of(m["near_miss"], "false_accept_rate", "num_captions"),
            ),
        ],
        numeric={1, 2},
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _draws_table(metrics: dict[str, Any]) -> str:
    """One draw / best of N / oracle / scorer agreement (keep_top_k == num_samples > 1)."""
    n = metrics["num_samples"]

    def row(label: str, block: str, rate: str, hits: str) -> list[Any]:
        def cell(m: dict) -> str:
            b = m[block]
            return f"{H.pct(b[rate])} ({b[hits]} of {b['num_scenes']})"

        return [label, *(cell(metrics[g]) for g in GROUPS)]

    return H.table(
        ["", *GROUPS],
        [
            row("one draw (draw 0: as a 1-draw eval)", "one_draw", "accuracy", "num_accepted"),
            row(f"best of {n} (the scorer's pick)", "best_of_n", "accuracy", "num_accepted"),
            row(f"oracle (any of {n} draws accepted)", "oracle", "accuracy", "num_accepted"),
            row(
                "scorer agreement (picked an accepted draw, where some are rejected)",
                "scorer_agreement",
                "rate",
                "num_agree",
            ),
        ],
        numeric={1, 2},
    )


def _contrastive_table(metrics: dict[str, Any]) -> str:
    from parti_jax.data.judge import ATTRIBUTES

    def row(label: str, cell: Callable[[dict], Any]) -> list[Any]:
        return [label, *(cell(metrics[g]["contrastive"]) for g in GROUPS)]

    def rp(kind: str) -> list[list[Any]]:
        def whole(c: dict) -> str:
            b = c[kind]
            return f"{H.pct(b['r_precision'])} of {b['num_scenes']}"

        def attr(c: dict, a: str) -> str:
            b = c[kind]["per_attribute"][a]
            return f"{H.pct(b['r_precision'])} of {b['num_near_misses']}"

        label = "generated (best) image" if kind == "r_precision_generated" else "real image"
        return [
            row(f"R-precision, {label}: caption above all its near misses", whole),
            *(row(f"  {a}", lambda c, a=a: attr(c, a)) for a in ATTRIBUTES),
        ]

    return H.table(
        ["contrastive model", *GROUPS],
        [
            row("CLIP score (mean cosine), best image", lambda c: _num(c["clip_score"])),
            row("CLIP score (mean cosine), real image", lambda c: _num(c["clip_score_real"])),
            *rp("r_precision_generated"),
            *rp("r_precision_real"),
            row(
                "agreement with the judge (AUC over all kept images)",
                lambda c: (
                    f"{_num(c['agreement_with_judge']['auc'])} "
                    f"({c['agreement_with_judge']['num_images']} images)"
                ),
            ),
        ],
        numeric={1, 2},
    )


def _contrastive_note(metrics: dict[str, Any]) -> str:
    auc = {g: metrics[g]["contrastive"]["agreement_with_judge"]["auc"] for g in GROUPS}
    real = metrics["in_distribution"]["contrastive"]["r_precision_real"]["r_precision"]
    unknown = (
        " (n/a: the judge accepted all kept images of a group or none)"
        if None in auc.values()
        else ""
    )
    return (
        "An in-project contrastive model scores in-project images: a relative measure; on "
        "the shapes world its agreement with the judge (AUC of its similarity against the "
        f"judge's verdict over all kept images) is {_num(auc['in_distribution'])} in "
        f"distribution and {_num(auc['heldout'])} held out{unknown}. R-precision ranks each "
        "caption against its near misses (one stated attribute changed); on the real images it is "
        f"the contrastive model's own quality ({H.pct(real)} in distribution)."
    )


def _mark(value: Any) -> str:
    return {True: "✓", False: "✗", None: "–"}[value]


def _scene_card(record: R.PromptRecord) -> str:
    verdict = record.extra["verdicts"][0]
    attrs = " ".join(
        f'<span class="tag">{H.esc(a)} {_mark(v)}</span>' for a, v in verdict["attributes"].items()
    )
    status = "match" if verdict["match"] else "mismatch"
    return (
        f'<article class="card {status}" data-prompt-id="{record.prompt_id}">'
        f"{H.img_tag(record.images[0], title=record.prompt, caption=status)}"
        f'<div class="prompt">{H.esc(record.prompt)}</div>'
        f'<div class="meta">{H.esc(record.challenge)} · #{record.prompt_id}</div>'
        f"<div>{attrs}</div></article>"
    )


def write_report(
    out_dir: str | os.PathLike,
    records: Sequence[R.PromptRecord],
    metrics: dict[str, Any],
    *,
    max_scenes: int = 48,
) -> storage.Path:
    """`report.html`: the accuracy tables (with every draw judged: one draw / best of N /
    oracle / scorer agreement; with a contrastive model: its block) and a grid of
    images with their verdicts."""
    scorer = {
        None: "the model's likelihood",
        "likelihood": "the model's likelihood",
        "pmi": "the model's own pointwise mutual information of image and caption (no judge)",
        "contrastive": "the in-project contrastive model's image-caption similarity (no judge)",
        "shapes_judge": "the judge itself",
        "none": "nothing (draw order)",
    }.get(metrics["scorer"], metrics["scorer"])
    settings = (
        f"{metrics['num_samples']} sample(s) per caption, best {metrics['keep_top_k']} kept, "
        f"reranked by {scorer}; the judge reads the best image."
    )
    if metrics["scorer"] == "shapes_judge":
        settings += " Note: the reranker is the judge itself (best-of-N by the evaluator)."
    draws = contrastive = ""
    if all("oracle" in metrics[g] for g in GROUPS):
        draws = (
            f'<h2>Draws</h2><p class="muted">Every one of the {metrics["num_samples"]} draws '
            "per caption judged: the first draw alone, the scorer's pick, and the oracle "
            "(best-of-N by the judge).</p>"
            f'<div id="draws">{_draws_table(metrics)}</div>'
        )
    if all("contrastive" in metrics[g] for g in GROUPS):
        contrastive = (
            f'<h2>Contrastive model</h2><p class="muted">{H.esc(_contrastive_note(metrics))}</p>'
            f'<div id="contrastive">{_contrastive_table(metrics)}</div>'
        )
    grids = []
    for group in GROUPS:
        recs = sorted((r for r in records if r.category == group), key=lambda r: r.prompt_id)
        cards = "".join(_scene_card(r) for r in recs[:max_scenes])
        grids.append(
            f"<h2>{H.esc(group)}: first {min(len(recs), max_scenes)} of {len(recs)} scenes</h2>"
            f'<div class="cards">{cards}</div>'
        )
    body = (
        "<header><h1>Shapes-world faithfulness</h1></header>"
        f'<p class="muted">{H.esc(settings)} Near misses count only where the image was '
        "accepted for its own caption and that caption stated the changed attribute.</p>"
        f'<div id="tables">{_tables(metrics)}</div>'
        f"{draws}{contrastive}"
        f'<p><a href="{R.INDEX}">All images (gallery)</a> · metrics.json</p>' + "".join(grids)
    )
    return H.write_page(storage.path(out_dir) / S.REPORT, "Shapes-world faithfulness", body)


def run_shapes(
    generator: Any,
    out_dir: str | os.PathLike,
    *,
    num_in_distribution: int = 200,
    num_heldout: int = 200,
    world_seed: int = 0,
    world_config: Any = None,
    num_samples: int | None = None,
    keep_top_k: int = 1,
    sampling_config: Any = None,
    seed: int | None = None,
    scorer: Any = "none",
    batch_size: int | None = None,
    prompts_per_call: int | None = None,
    near_miss_seed: int = 0,
    judge_config: Any = None,
    report_scenes: int = 48,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, Any]:
    """Generates images for shapes-world captions, judges them, writes metrics and reports.

    Args:
      generator: a `parti_jax.sampling.Generator` or anything with its `generate`.
      num_in_distribution, num_heldout: scenes from the 'validation' / 'heldout' splits.
      world_seed, world_config: the world's seed and `ShapesWorldConfig` (default: shipped).
      num_samples, seed: default to `sampling_config`'s; keep_top_k: images kept.
      scorer: the reranker: 'none' (draw order), 'likelihood' (None: the generator's
        default), 'pmi' (likelihood given the caption minus given the empty one),
        'contrastive' (the generator's contrastive model: eval.contrastive_dir)
        or 'shapes_judge' (best-of-N by the judge itself; the report flags it).
        With keep_top_k == num_samples > 1 every draw is judged: one_draw,
        best_of_n, oracle and scorer_agreement.
      near_miss_seed: draws the near-miss captions (the judge's, and on another
        stream the contrastive R-precision's).
      report_scenes: scenes per group shown in report.html.
      process_index, process_count: this host's share (default: jax's).
    """
    settings = S.GenerationSettings.from_args(locals())
    scenes = shapes_scenes(
        num_in_distribution, num_heldout, world_seed=world_seed, world_config=world_config
    )
    hook = make_judge_hook(
        scenes, near_miss_seed=near_miss_seed, judge_config=judge_config, world_config=world_config
    )
    run = S.generate_suite(generator, out_dir, [s.eval_prompt() for s in scenes], settings,
                           name=NAME, process_index=process_index, process_count=process_count,
                           on_result=hook)  # fmt: skip
    if run.pending is not None:
        return run.pending
    wanted = {s.prompt_id for s in scenes}
    records = [r for r in run.records if r.prompt_id in wanted]
    metrics = {**run.summary(), "world_seed": world_seed}
    metrics.update(shapes_metrics(records, num_samples=settings.num_samples,
                                  keep_top_k=settings.keep_top_k))  # fmt: skip
    model = S.contrastive_model(generator)
    if model is not None:
        blocks = contrastive_shapes_metrics(model, out_dir, records, scenes,
                                            near_miss_seed=near_miss_seed,
                                            world_config=world_config)  # fmt: skip
        for group, block in blocks.items():
            metrics[group]["contrastive"] = block
        metrics["contrastive_model"] = model.record()
    R.update_metrics(out_dir, metrics)
    gallery.write_gallery(out_dir, "Shapes world")
    write_report(out_dir, records, metrics, max_scenes=report_scenes)
    return metrics
