"""`parti-jax demo`: the whole pipeline on the embedded shapes world, stage by stage, resumable.

Stages, in order, each in its own folder of the demo's work directory:

    world      world/       world.json (the world's settings and splits) + preview.png
    vocab      vocab/       vocab.json: the SentencePiece model used (shipped or trained)
                            and a check that it covers every word a caption can use
    vqgan      vqgan/       train-vqgan work directory
    codes      codes/       precompute-codes output (codes/train, codes/validation)
    t2i        t2i/         train work directory (encoder-decoder on the codes)
    contrastive contrastive/ train-contrastive work directory (the eval's reranker): its
                            text tower is t2i's text encoder, kept as it is
    upsampler  upsampler/   train-upsampler work directory
    sample     samples/     sample_to_folder output for `sample_prompts`
    eval       eval/        parti-jax eval (shapes faithfulness + reconstruction): N draws
                            per caption, judged each; one draw, best-of-N by the
                            contrastive model and by the judge (the oracle)
    inspect    inspect/     parti-jax inspect: cross-attention, per-position probabilities,
                            teacher-forced and linear probes, the tokenizer check
    report     report/      index.html: sample grids, accuracy, loss curves, stage times

A finished stage writes `stages/<name>.json` (its wall time, interrupted
attempts included, and a summary) and is skipped by the next run; an
interrupted stage runs again and resumes from what it left (the trainers from
`<folder>/checkpoints`, precompute from its complete shards, eval from the
prompts already judged). `demo.json` marks the folder as a demo's: a non-empty
folder without it is refused, so a demo never writes into another job's work
directory. The stage functions come from the caller (`DemoStageFns`), so this
module has no gin and no TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parti_jax.eval import demo_report
from parti_jax.eval.demo_report import _read_json as read_json  # {} when missing or torn

STAGES: tuple[str, ...] = (
    "world", "vocab", "vqgan", "codes", "t2i", "contrastive", "upsampler", "sample", "eval",
    "inspect", "report",
)  # fmt: skip
FOLDERS: dict[str, str] = {**{s: s for s in STAGES}, "sample": "samples"}  # in the work dir
MARKER = "demo.json"
FORMAT_VERSION = 1
CODES_SPLITS: tuple[str, ...] = ("train", "validation")
# The stages each stage reads from (finished in this run or an earlier one).
NEEDS: dict[str, tuple[str, ...]] = {
    "codes": ("vqgan",),
    "t2i": ("vqgan", "codes"),
    "upsampler": ("vqgan",),
    "sample": ("vqgan", "t2i", "upsampler"),
    "contrastive": ("vocab", "t2i"),
    "eval": ("vqgan", "t2i", "upsampler", "contrastive"),
    "inspect": ("vqgan", "codes", "t2i"),
}
# The inspect stage (`parti-jax inspect` on the demo's models): two scenes of each group
# viewed, the probes on 50 scenes per group and 1000 captions (~25 s on 2 cores).
INSPECT_OPTIONS: dict[str, Any] = dict(
    num_in_distribution=2, num_heldout=2, num_probe_scenes=50, num_probe_captions=1000
)


def inspect_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The inspect stage's record: per group the tokenizer and teacher-forced figures, and
    the probe of object 1's colour from its shape word's state."""
    out: dict[str, Any] = {}
    for group, g in (record.get("groups") or {}).items():
        tf = g["teacher_forced_one_object"]
        out[group] = {
            "reconstruction_accepted": g["tokenizer"]["reconstruction_accepted"],
            "object_codes_never_a_target": g["tokenizer"].get("object_codes_never_a_target"),
            "p_true_first_object_cell": tf["mean_p_true_first_object_cell"],
            "first_object_cell_mass_stated_color": tf["first_object_cell_mass_stated_color"],
            "first_object_cell_mass_background": tf["first_object_cell_mass_background"],
        }
    probe = ((record.get("linear_probes") or {}).get("probes") or {}).get(
        "object1_color_from_at_shape"
    )
    if probe:
        out["probe_color_at_shape_word"] = {
            "seen_pairs": probe["seen_pairs"], "heldout_pairs": probe["heldout_pairs"],
        }  # fmt: skip
    return out


# Prompts of the sample stage's grid: in-distribution scenes, then held-out pairs
# (shapes.HELDOUT_COMBINATIONS: blue triangle, red square, green circle, ...).
DEFAULT_SAMPLE_PROMPTS: tuple[str, ...] = (
    "a large red circle in the center",
    "a small blue square at the top left",
    "a large yellow triangle in the bottom right",
    "a small green diamond on the left",
    "a large purple cross at the top",
    "a large cyan circle above a small red triangle",
    "a yellow square to the left of a large blue diamond",
    "a small green cross below a large purple circle",
    "a large blue triangle in the center",
    "a small red square at the bottom",
    "a large green circle to the right of a yellow triangle",
    "a purple diamond above a cyan cross",
)
NUM_HELDOUT_SAMPLE_PROMPTS = 4  # the last prompts above use held-out (colour, shape) pairs


class DemoError(ValueError):
    """A problem with the demo's folder or settings; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class DemoStageFns:
    """The stage functions, configured by the caller (the CLI: gin). Each is called with
    keyword arguments only: the paths shown, nothing else.

    train_vqgan(workdir=)                                  -> result with .status
    precompute_codes(vqgan=, output_dir=, split=)          -> result with .meta
    train_t2i(workdir=, codebook_hash=)                    -> result with .status
        (its task reads the codes folder; the caller points it there)
    train_upsampler(workdir=, vqgan_path=)                 -> result with .status
    train_contrastive(workdir=, text_tower_from=, vocab_path=) -> result with .status
    sample(workdir=, prompts=, t2i_path=, vqgan_path=, upsampler_path=) -> manifest
    evaluate(workdir=, t2i_path=, vqgan_path=, upsampler_path=, contrastive_path=)
                                                           -> {suite: metrics}
    train_vocab(output_prefix=) -> model path (only with `train_vocab=True`)
    """

    train_vqgan: Callable[..., Any]
    precompute_codes: Callable[..., Any]
    train_t2i: Callable[..., Any]
    train_upsampler: Callable[..., Any]
    sample: Callable[..., Any]
    evaluate: Callable[..., Any]
    train_vocab: Callable[..., str] | None = None
    train_contrastive: Callable[..., Any] | None = None


@dataclasses.dataclass
class DemoResult:
    """What a demo run did and its headline numbers (see `headline`)."""

    workdir: Path
    report: Path
    stage_seconds: dict[str, float]  # every stage's recorded wall time (earlier runs included)
    ran: list[str]  # stages run by this call
    skipped: list[str]  # stages found complete
    headline: dict[str, Any]


# ------------------------------------------------------------------ folder checks


def stage_record_path(workdir: str | os.PathLike, stage: str) -> Path:
    return Path(workdir) / "stages" / f"{stage}.json"


def read_stage_record(workdir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The record a finished stage wrote, or None (not run, interrupted, or torn: it runs again)."""
    record = read_json(stage_record_path(workdir, stage))
    return record if record.get("stage") == stage else None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def check_stages(stages: Sequence[str] | None) -> list[str]:
    """The stages to run, in pipeline order; unknown names are an error naming them."""
    if stages is None:
        return list(STAGES)
    if isinstance(stages, str):
        stages = [stages]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise DemoError(
            f"demo.stages={list(stages)!r}: unknown or empty stage name(s) {unknown}; "
            f"choose from {list(STAGES)}"
        )
    return [s for s in STAGES if s in stages]


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Creates the demo folder or checks that an existing one belongs to a demo."""
    path = Path(workdir).expanduser()
    marker = path / MARKER
    if path.exists() and not path.is_dir():
        raise DemoError(f"--workdir={path} is a file; pass a folder for the demo")
    if marker.exists():
        try:
            version = json.loads(marker.read_text()).get("format_version")
        except (OSError, ValueError, AttributeError) as e:
            raise DemoError(
                f"{marker}: unreadable ({e}); delete the folder and start again"
            ) from None
        if version != FORMAT_VERSION:
            raise DemoError(
                f"{marker}: written by demo format {version!r}, this is {FORMAT_VERSION}; "
                "use a new --workdir"
            )
        return path
    ignored = ("config.gin", "operative_config.gin")
    extra = sorted(p.name for p in path.iterdir() if p.name not in ignored) if path.is_dir() else []
    if extra:
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise DemoError(
            f"--workdir={path} is not empty ({shown}) and holds no demo ({MARKER} is "
            "missing): it may be another job's folder; pass a new or empty folder, or "
            "the folder of an earlier demo to resume it"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_json(marker, {"format_version": FORMAT_VERSION, "created": time.time()})
    except OSError as e:
        raise DemoError(
            f"--workdir={path} is not writable ({e.strerror or e}); pass a folder you can write to"
        ) from None
    return path


# ------------------------------------------------------------------ progress


def _console(message: str) -> None:
    """Prints a line (through tqdm, so that an open progress bar is redrawn below it)."""
    if os.environ.get("PARTI_JAX_QUIET"):
        return
    from tqdm import tqdm

    tqdm.write(message)


def last_eval(metrics_file: Path) -> dict[str, float]:
    """The last evaluation a trainer logged to metrics.jsonl ({name: value}, 'eval/' dropped;
    {} when there is none or the file cannot be read)."""
    from parti_jax.train import metrics as metrics_lib

    found: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        for row in metrics_lib.read_metrics(metrics_file):
            evals = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
            if evals:
                found = {"eval_step": row.get("step"), **evals}
    return found


def last_logged_step(metrics_file: Path) -> int:
    """The largest `step` in a metrics.jsonl (0 when there is none yet)."""
    step = 0
    with contextlib.suppress(OSError), metrics_file.open() as f:
        for line in f:  # a torn last line or a foreign one is skipped
            with contextlib.suppress(json.JSONDecodeError, AttributeError, TypeError):
                step = max(step, int(json.loads(line).get("step", 0)))
    return step


@contextlib.contextmanager
def step_progress(
    stage: str, metrics_file: Path, total: int | None, *, enabled: bool = True
) -> Iterator[None]:
    """A tqdm bar for a training stage: follows the steps its trainer logs to metrics.jsonl."""
    if not enabled or not total:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=int(total), desc=f"demo {stage}", unit="step", dynamic_ncols=True)
    stop = threading.Event()

    def follow() -> None:
        while True:
            stopped = stop.wait(1.0)  # the last update follows the stop
            bar.update(max(0, min(last_logged_step(metrics_file), bar.total) - bar.n))
            if stopped:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


# ------------------------------------------------------------------ small stages


def run_world_stage(
    out_dir: Path, *, resolution: int, seed: int, num_preview: int, num_examples: Mapping[str, int]
) -> dict[str, Any]:
    """world/world.json (the world's settings, splits and held-out pairs) and preview.png."""
    from PIL import Image

    from parti_jax.data import shapes

    config = shapes.ShapesWorldConfig(resolution=resolution)
    examples = [shapes.generate_example(i, "train", seed, config) for i in range(num_preview)]
    side = int(np.ceil(np.sqrt(max(num_preview, 1))))
    tiles = np.zeros((side * side, resolution, resolution, 3), np.uint8)
    for k, ex in enumerate(examples):
        tiles[k] = ex.image
    grid = tiles.reshape(side, side, resolution, resolution, 3).swapaxes(1, 2)
    grid = grid.reshape(side * resolution, side * resolution, 3)  # tile k at row k // side
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out_dir / "preview.png")
    two = sum(len(ex.spec.objects) == 2 for ex in examples)
    info = {
        "resolution": resolution,
        "seed": seed,
        "splits": dict(num_examples),
        "colors": list(config.colors),
        "shapes": list(config.shapes),
        "heldout_combinations": [list(p) for p in config.heldout_combinations],
        "two_object_fraction": config.two_object_fraction,
        "preview": {"file": "preview.png", "captions": [ex.caption for ex in examples]},
        "preview_two_object_share": two / max(len(examples), 1),
    }
    _write_json(out_dir / "world.json", info)
    return {"resolution": resolution, "preview_images": len(examples)}


def run_vocab_stage(
    out_dir: Path, *, vocab_path: str | None, train: bool, train_fn: Callable[..., str] | None
) -> dict[str, Any]:
    """Picks (or trains) the SentencePiece model and checks it covers every caption word."""
    from parti_jax.data import shapes
    from parti_jax.data.vocab import SentencePieceTokenizer, default_vocab_path

    out_dir.mkdir(parents=True, exist_ok=True)
    if train:
        if train_fn is None:
            raise DemoError("demo.train_vocab=True needs a vocabulary trainer (train_vocab)")
        path = str(train_fn(output_prefix=str(out_dir / "shapes_sp")))
        source = "trained"
    else:
        path = vocab_path or default_vocab_path()
        source = "given" if vocab_path else "shipped"
    tokenizer = SentencePieceTokenizer(path)
    words = shapes.all_caption_words()
    unknown = [w for w in words if tokenizer.unk_id in tokenizer.encode(w)]
    if unknown:
        raise DemoError(
            f"{path}: the vocabulary has no pieces for caption word(s) {unknown[:10]}; "
            "use the shipped shapes vocabulary or set demo.train_vocab=True"
        )
    record = {"path": path, "source": source, "vocab_size": tokenizer.vocab_size,
              "caption_words": len(words)}  # fmt: skip
    _write_json(out_dir / "vocab.json", record)
    return record


def judge_reconstructions(vqgan_dir: str | os.PathLike, num_images: int, seed: int = 0) -> dict:
    """The shapes judge on the VQGAN's reconstructions of unseen ('validation') scenes.

    Returns {'judge_acceptance', 'num_images', 'psnr'}: the share of reconstructions
    the judge accepts against their own captions (issue 4's criterion).
    """
    from parti_jax.data import judge, shapes
    from parti_jax.vqgan.tokenizer import ImageTokenizer

    tokenizer = ImageTokenizer.load(vqgan_dir)
    config = shapes.ShapesWorldConfig(resolution=tokenizer.image_size)
    examples = [shapes.generate_example(i, "validation", seed, config) for i in range(num_images)]
    images = np.stack([e.image for e in examples]).astype(np.float32) / 255.0
    recon = np.clip(tokenizer.decode(tokenizer.encode(images)), 0.0, 1.0)
    accepted = [judge.judge(r, e.caption).match for r, e in zip(recon, examples)]
    mse = np.mean((recon - images) ** 2, axis=(1, 2, 3))
    return {
        "judge_acceptance": float(np.mean(accepted)),
        "num_images": int(num_images),
        "psnr": float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10)))),
    }


def headline(
    eval_metrics: Mapping[str, Any],
    stage_seconds: Mapping[str, float],
    vqgan_summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo's headline numbers from the eval metrics, the stage times and the
    vqgan stage's summary (the judge's acceptance of reconstructions)."""
    shapes_m, recon = eval_metrics.get("shapes", {}), eval_metrics.get("reconstruction", {})
    ind, held = shapes_m.get("in_distribution", {}), shapes_m.get("heldout", {})

    def rate(group: Mapping[str, Any], *keys: str) -> Any:
        for key in keys[:-1]:
            group = group.get(key) or {}
        return group.get(keys[-1])

    # With N judged draws per caption: draw 0 is the one-draw figure, the scorer's pick
    # the best-of-N, any accepted draw the judge's own best-of-N (the oracle).
    one_draw = "one_draw" in ind
    contrastive = ind.get("contrastive") or {}
    return {
        "in_distribution_accuracy": rate(ind, "one_draw", "accuracy")
        if one_draw
        else ind.get("accuracy"),
        "heldout_accuracy": rate(held, "one_draw", "accuracy")
        if one_draw
        else held.get("accuracy"),
        "in_distribution_best_of_n": ind.get("accuracy") if one_draw else None,
        "heldout_best_of_n": held.get("accuracy") if one_draw else None,
        "in_distribution_oracle": rate(ind, "oracle", "accuracy"),
        "heldout_oracle": rate(held, "oracle", "accuracy"),
        "scorer_agreement": rate(ind, "scorer_agreement", "rate"),
        "contrastive_r_precision": rate(contrastive, "r_precision_real", "r_precision"),
        "contrastive_judge_auc": rate(contrastive, "agreement_with_judge", "auc"),
        "two_object_share": ind.get("two_object_share"),
        "in_distribution_scenes": ind.get("num_scenes"),
        "heldout_scenes": held.get("num_scenes"),
        "near_miss_false_accept_rate": (ind.get("near_miss") or {}).get("false_accept_rate"),
        "num_samples": shapes_m.get("num_samples"),
        "scorer": shapes_m.get("scorer"),
        "vqgan_psnr": (recon.get("vqgan") or {}).get("psnr"),
        "vqgan_judge_acceptance": (vqgan_summary or {}).get("reconstruction_judge_acceptance"),
        "total_seconds": round(float(sum(stage_seconds.values())), 1),
    }


# ------------------------------------------------------------------ the demo


def run_demo(
    workdir: str | os.PathLike,
    fns: DemoStageFns,
    *,
    stages: Sequence[str] | None = None,
    world_resolution: int = 64,
    world_seed: int = 0,
    world_num_examples: Mapping[str, int] | None = None,
    num_preview: int = 16,
    vqgan_judge_images: int = 200,
    vocab_path: str | None = None,
    train_vocab: bool = False,
    vqgan_steps: int | None = None,
    t2i_steps: int | None = None,
    upsampler_steps: int | None = None,
    contrastive_steps: int | None = None,
    sample_prompts: Sequence[str] = DEFAULT_SAMPLE_PROMPTS,
    num_heldout_sample_prompts: int = NUM_HELDOUT_SAMPLE_PROMPTS,
    progress: bool = True,
    machine: str | None = None,
    inspect_options: Mapping[str, Any] | None = None,
) -> DemoResult:
    """Runs (or resumes) the demo's stages in `workdir`; see the module docstring.

    Args:
      workdir: the demo folder (new, empty, or an earlier demo's to resume).
      fns: the configured stage functions.
      stages: names from STAGES to run (default all; each needs the earlier ones
        to have finished, in this call or an earlier one).
      world_resolution, world_seed, world_num_examples, num_preview: what the
        world stage records and previews (the tasks themselves are the caller's).
      vqgan_judge_images: validation scenes on which the vqgan stage measures
        the judge's acceptance of reconstructions (0: not measured).
      vocab_path, train_vocab: the vocabulary stage (default: the shipped model).
      vqgan_steps, t2i_steps, upsampler_steps, contrastive_steps: the trainers'
        num_steps, for the progress bars only.
      sample_prompts: the sample stage's prompts (the report's grid); the last
        `num_heldout_sample_prompts` are marked as held-out combinations.
      progress: tqdm bars per stage.
      machine: a description of the machine for the report (default: CPU count).
      inspect_options: keyword arguments of the inspect stage's
        `inspection_report.run_inspection` (default INSPECT_OPTIONS).
    """
    wanted = check_stages(stages)
    if not sample_prompts:
        raise DemoError("demo.sample_prompts is empty; give at least one prompt")
    wd = prepare_workdir(workdir)
    paths = {s: wd / FOLDERS[s] for s in STAGES}
    ran, skipped = [], []
    total_start = time.perf_counter()

    def vqgan_hash() -> str:
        from parti_jax.vqgan.tokenizer import load_vqgan_meta

        return str(load_vqgan_meta(paths["vqgan"])["codebook_hash"])

    def trained_models() -> dict[str, str]:
        return {f"{s}_path": str(paths[s]) for s in ("t2i", "vqgan", "upsampler")}

    def train(stage: str, fn: Callable[..., Any], steps: int | None, **kwargs) -> dict[str, Any]:
        """Runs a trainer in the stage's folder; its summary: the step and final loss."""
        with step_progress(stage, paths[stage] / "metrics.jsonl", steps, enabled=progress):
            result = fn(workdir=str(paths[stage]), **kwargs)
        status = getattr(result, "status", "done")
        if status != "done":
            raise DemoError(
                f"stage {stage!r} stopped with status {status!r} at step "
                f"{getattr(result, 'step', '?')}; run the demo again to resume it"
            )
        metrics = getattr(result, "last_metrics", {}) or {}
        out = {"step": int(getattr(result, "step", 0))}
        if "loss" in metrics:
            out["final_loss"] = float(metrics["loss"])
        return out

    def do_vqgan() -> dict[str, Any]:
        out = {**train("vqgan", fns.train_vqgan, vqgan_steps), "codebook_hash": vqgan_hash()}
        if vqgan_judge_images:
            judged = judge_reconstructions(paths["vqgan"], vqgan_judge_images, world_seed)
            out["reconstruction_judge_acceptance"] = judged["judge_acceptance"]
            out["reconstruction_psnr"] = round(judged["psnr"], 2)
            out["judged_images"] = judged["num_images"]
        return out

    def do_codes() -> dict[str, Any]:
        out = {}
        for split in CODES_SPLITS:
            result = fns.precompute_codes(
                vqgan=str(paths["vqgan"]), output_dir=str(paths["codes"] / split), split=split
            )
            out[split] = int((getattr(result, "meta", None) or {}).get("num_examples", 0))
        return {"num_examples": out}

    def do_contrastive() -> dict[str, Any]:
        if fns.train_contrastive is None:
            raise DemoError("the contrastive stage needs DemoStageFns.train_contrastive")
        # The tower reads captions as t2i's encoder does (the same vocabulary).
        vocab = read_json(paths["vocab"] / "vocab.json").get("path")
        out = train("contrastive", fns.train_contrastive, contrastive_steps,
                    text_tower_from=str(paths["t2i"]), vocab_path=vocab)  # fmt: skip
        return {**out, **last_eval(paths["contrastive"] / "metrics.jsonl")}

    def do_sample() -> dict[str, Any]:
        manifest = fns.sample(
            workdir=str(paths["sample"]), prompts=list(sample_prompts), **trained_models()
        )
        return {"num_images": len((manifest or {}).get("images", []))}

    def do_inspect() -> dict[str, Any]:
        from parti_jax.eval.inspection_report import run_inspection

        record = run_inspection(
            paths["t2i"], paths["vqgan"], paths["inspect"], codes_dir=paths["codes"],
            **{**INSPECT_OPTIONS, **(inspect_options or {})},
        )  # fmt: skip
        return inspect_summary(record)

    def do_report() -> dict[str, Any]:
        page = demo_report.write_demo_report(
            wd,
            stage_seconds=_stage_seconds(wd),
            heldout_prompts=list(sample_prompts)[
                len(sample_prompts) - num_heldout_sample_prompts :
            ],
            machine=machine or _machine(),
        )
        return {"page": str(page)}

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "world": lambda: run_world_stage(
            paths["world"],
            resolution=world_resolution,
            seed=world_seed,
            num_preview=num_preview,
            num_examples=world_num_examples or {},
        ),
        "vocab": lambda: run_vocab_stage(
            paths["vocab"], vocab_path=vocab_path, train=train_vocab, train_fn=fns.train_vocab
        ),
        "vqgan": do_vqgan,
        "codes": do_codes,
        "t2i": lambda: train("t2i", fns.train_t2i, t2i_steps, codebook_hash=vqgan_hash()),
        "upsampler": lambda: train(
            "upsampler", fns.train_upsampler, upsampler_steps, vqgan_path=str(paths["vqgan"])
        ),
        "contrastive": do_contrastive,
        "sample": do_sample,
        "eval": lambda: {
            "headline": headline(
                fns.evaluate(
                    workdir=str(paths["eval"]),
                    contrastive_path=str(paths["contrastive"]),
                    **trained_models(),
                ),
                {},
            )
        },
        "inspect": do_inspect,
        "report": do_report,
    }
    from tqdm import tqdm

    with tqdm(
        total=len(wanted), desc="demo", unit="stage", dynamic_ncols=True, disable=not progress
    ) as stage_bar:
        for stage in wanted:
            stage_bar.set_postfix_str(stage)
            # The report is always rewritten: it shows the latest times and numbers.
            if stage != "report" and read_stage_record(wd, stage) is not None:
                skipped.append(stage)
                _console(f"demo: stage {stage} already complete, skipped")
            else:
                _run_stage(wd, stage, runners[stage])
                ran.append(stage)
            stage_bar.update(1)
    seconds = _stage_seconds(wd)
    vqgan_summary = (read_stage_record(wd, "vqgan") or {}).get("summary")
    return DemoResult(
        workdir=wd,
        report=paths["report"] / "index.html",
        stage_seconds=seconds,
        ran=ran,
        skipped=skipped,
        headline={
            **headline(read_json(paths["eval"] / "metrics.json"), seconds, vqgan_summary),
            "this_run_seconds": round(time.perf_counter() - total_start, 1),
        },
    )


def _run_stage(wd: Path, stage: str, runner: Callable[[], dict[str, Any]]) -> None:
    """Runs a stage once the stages it reads from are done, and writes its record (not
    the report's). Time spent by interrupted attempts counts towards the stage's time."""
    _console(f"demo: stage {stage} ...")
    start = time.perf_counter()
    partial = stage_record_path(wd, stage).with_suffix(".partial.json")
    earlier = float(read_json(partial).get("seconds", 0.0))
    try:
        missing = [e for e in NEEDS.get(stage, ()) if read_stage_record(wd, e) is None]
        if missing:
            raise DemoError(
                f"stage {stage!r} needs stage(s) {missing} finished first in {wd}; run them "
                "(demo.stages) or the whole demo"
            )
        summary = runner()
    except BaseException:
        spent = earlier + time.perf_counter() - start
        _write_json(partial, {"stage": stage, "seconds": round(spent, 3)})
        raise
    seconds = earlier + time.perf_counter() - start
    if stage != "report":
        _write_json(
            stage_record_path(wd, stage),
            {
                "stage": stage,
                "seconds": round(seconds, 3),
                "interrupted_seconds": round(earlier, 3),
                "finished": time.time(),
                "summary": summary,
            },
        )
    partial.unlink(missing_ok=True)
    _console(f"demo: stage {stage} done in {seconds:.1f} s")


def _stage_seconds(workdir: Path) -> dict[str, float]:
    records = {stage: read_stage_record(workdir, stage) for stage in STAGES}
    return {s: float(r.get("seconds", 0.0)) for s, r in records.items() if r is not None}


def _machine() -> str:
    import platform

    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU core(s)"


def format_headline(result: DemoResult) -> str:
    """The lines the CLI prints at the end: where the report is and its numbers."""
    h = result.headline

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100.0 * float(v):.1f}%"

    times = ", ".join(f"{k} {v:.0f}s" for k, v in result.stage_seconds.items())
    draws = h.get("num_samples") or 1
    # Draw 0 when every draw was judged (or there is one); else the scorer's pick.
    which = ("one draw" if draws == 1 or h.get("in_distribution_best_of_n") is not None
             else f"best of {draws} by the {h.get('scorer')} scorer")  # fmt: skip
    return "\n".join(
        [
            f"demo report: {result.report}",
            f"  in-distribution accuracy (judge, {which}): "
            f"{pct(h.get('in_distribution_accuracy'))} "
            f"of {h.get('in_distribution_scenes')} scenes "
            f"(two-object share {pct(h.get('two_object_share'))})",
            f"  held-out accuracy (judge, {which}):        {pct(h.get('heldout_accuracy'))} "
            f"of {h.get('heldout_scenes')} scenes",
            *(
                [
                    f"  best of {h.get('num_samples')} draws, in-distribution / held-out: "
                    f"{pct(h.get('in_distribution_best_of_n'))} / "
                    f"{pct(h.get('heldout_best_of_n'))} by the {h.get('scorer')} scorer, "
                    f"{pct(h.get('in_distribution_oracle'))} / {pct(h.get('heldout_oracle'))} "
                    "by the judge (oracle)",
                    f"  contrastive model: near-miss R-precision on real scenes "
                    f"{pct(h.get('contrastive_r_precision'))}, picks an accepted draw when "
                    f"there is one {pct(h.get('scorer_agreement'))}",
                ]
                if h.get("in_distribution_best_of_n") is not None
                else []
            ),
            f"  VQGAN reconstructions accepted by the judge: "
            f"{pct(h.get('vqgan_judge_acceptance'))}",
            f"  total time: {h.get('total_seconds')} s over all stages ({times})",
        ]
    )
