"""Shapes-world faithfulness: does the model draw what the caption says? The judge decides.

Captions come from the world's 'validation' split ("in_distribution": unseen
scenes of (colour, shape) pairs seen in training; prompt id i) and 'heldout'
split (each scene has a pair never seen in training; HELDOUT_ID_OFFSET + i).
The judge (parti_jax/data/judge.py) reads the objects back from the best image
and checks every attribute the caption states.

Beside the accuracy stands the judge's false-accept rate on near-miss captions
of the same images (one attribute changed). A near miss counts only where it is
certainly wrong: the image was accepted for its own caption, and that caption
stated the changed attribute; the others are counted as excluded. Each record's
`extra` holds the verdicts and near misses, so a resume recomputes the metrics
from the manifest. Categories are the groups and challenges "one object" /
"two objects", so the gallery groups them. metrics.json::

    {"suite": "shapes", "num_samples", "keep_top_k", "seed", "scorer", "world_seed",
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
                           "num_accepted", "false_accept_rate"}}}}

An accuracy with nothing to count is null.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import gallery
from parti_jax.eval import html as H
from parti_jax.eval import records as R
from parti_jax.eval import suites as S

NAME = "shapes"
HELDOUT_ID_OFFSET = 1_000_000
GROUPS = {"in_distribution": "validation", "heldout": "heldout"}
ONE, TWO = "one object", "two objects"


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
    """The per-prompt hook: verdicts of every kept image, near misses of the best one."""
    from parti_jax.data import judge, shapes
    from parti_jax.data.shapes_parsing import parse_caption

    by_id = {s.prompt_id: s for s in scenes}
    config = world_config or shapes.ShapesWorldConfig()

    def hook(prompt: R.PromptRecord, images: list[np.ndarray], paths: list[str], result: Any):
        del paths, result
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


def shapes_metrics(records: Sequence[R.PromptRecord]) -> dict[str, Any]:
    """Accuracy per attribute and overall, per group and object count, with near misses."""
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
        out[group] = block
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
    """`report.html`: the accuracy tables and a grid of images with their verdicts."""
    scorer = {
        None: "the model's likelihood",
        "likelihood": "the model's likelihood",
        "pmi": "the model's own pointwise mutual information of image and caption (no judge)",
        "none": "nothing (draw order)",
    }.get(metrics["scorer"], metrics["scorer"])
    settings = (
        f"{metrics['num_samples']} sample(s) per caption, best {metrics['keep_top_k']} kept, "
        f"reranked by {scorer}; the judge reads the best image."
    )
    if metrics["scorer"] == "shapes_judge":
        settings += " Note: the reranker is the judge itself (best-of-N by the evaluator)."
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
        default), 'pmi' (likelihood given the caption minus given the empty one)
        or 'shapes_judge' (best-of-N by the judge itself; the report flags it).
      near_miss_seed: draws the near-miss captions.
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
    metrics = {**run.summary(), "world_seed": world_seed, **shapes_metrics(records)}
    R.update_metrics(out_dir, metrics)
    gallery.write_gallery(out_dir, "Shapes world")
    write_report(out_dir, records, metrics, max_scenes=report_scenes)
    return metrics
