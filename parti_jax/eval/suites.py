"""What every eval suite shares: host sharding and resumable generation into an eval folder.

Each suite of `parti-jax eval` (parti_jax/eval/runner.py) writes its own folder:
the generating suites (parti_prompts, shapes, coco_fid) an eval folder
(parti_jax/eval/records.py) and their reports, the others metrics.json and report.html.

Sharding: process i of n takes prompts i::n. With several processes each
writes a complete eval folder of its own under `shards/process_<i>_of_<n>/`
and marks it done (`DONE.json`); the process that finds every shard done
(process 0 after a barrier on a real multi-host run) merges the shard
manifests into the suite folder's (image paths prefixed by the shard folder)
and writes the metrics and reports.

Resume: a prompt whose id is in the suite folder's or any shard's manifest is
skipped; images are written before their manifest line, so an interrupted eval
loses at most the prompts in flight. Resuming with other generation settings
(recorded in `generation.json`) is refused, naming the field and both values.

Suites take any object with `parti_jax.sampling.Generator.generate` (tests pass
stand-ins); a prompt to generate for is a `records.PromptRecord` without images.
A generator's contrastive model (`Generator.contrastive`, loaded from
`eval.contrastive_dir`) reranks with scorer='contrastive' and adds the suites'
contrastive metrics (parti_jax/eval/contrastive_metrics.py).
Folders may be URLs (gs://...): every file goes through parti_jax/storage.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import records as R
from parti_jax.rerank import name_of

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
DONE_FILE = "DONE.json"
SETTINGS_FILE = "generation.json"
REPORT = "report.html"
# Suites run by `parti-jax eval`, in the order of `eval.suites`.
SUITE_NAMES = ("parti_prompts", "shapes", "reconstruction", "fid", "coco_fid")
GENERATING_SUITES = ("parti_prompts", "shapes", "coco_fid")


class SuiteError(ValueError):
    """Bad suite arguments or an eval folder that does not fit (message names the field/file)."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How a suite samples: passed to `generate`, recorded in `generation.json`."""

    num_samples: int = 1
    keep_top_k: int = 1
    sampling_config: Any = None
    seed: int = 0
    scorer: Any = None  # None (the generator's default), a name it knows ('likelihood',
    # 'pmi', 'contrastive', 'shapes_judge', 'none') or a Scorer object
    batch_size: int | None = None  # rows per sampling batch (the generator's batch_size)
    prompts_per_call: int | None = None  # prompts per generate() call (resume granularity)
    image_size: int | None = None  # saved images are resized to this side when set

    def __post_init__(self) -> None:
        if int(self.num_samples) < 1:
            raise SuiteError(f"num_samples must be >= 1, got {self.num_samples}")
        if not 1 <= int(self.keep_top_k) <= int(self.num_samples):
            raise SuiteError(
                f"keep_top_k={self.keep_top_k} must be in [1, num_samples={self.num_samples}]"
            )
        for name in ("batch_size", "prompts_per_call", "image_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise SuiteError(f"{name} must be >= 1 or None, got {value}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> GenerationSettings:
        """The settings among a suite's arguments (its `locals()`); `num_samples` and
        `seed` default to the sampling config's (else 1 and 0)."""
        fields = {f.name: args[f.name] for f in dataclasses.fields(cls) if f.name in args}
        config = fields.get("sampling_config")
        for name, default in (("num_samples", 1), ("seed", 0)):
            if fields.get(name) is None:
                fields[name] = int(getattr(config, name, default) or default)
        return cls(**fields)

    def calls_size(self) -> int:
        if self.prompts_per_call:
            return int(self.prompts_per_call)
        if self.batch_size:
            return max(1, int(self.batch_size) // int(self.num_samples))
        return 64

    def record(self) -> dict[str, Any]:
        """The settings that decide the images (compared when resuming)."""
        config = self.sampling_config
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        return {
            "num_samples": int(self.num_samples),
            "keep_top_k": int(self.keep_top_k),
            "seed": int(self.seed),
            "sampling_config": json.loads(json.dumps(config, default=str)),
            "scorer": name_of(self.scorer),
            "image_size": self.image_size,
        }


def resolve_processes(
    process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int, bool]:
    """(index, count, real_multihost): given values, else jax's (imported only then)."""
    if process_index is None and process_count is None:
        import jax

        index, count = jax.process_index(), jax.process_count()
        return index, count, count > 1
    if process_index is None or process_count is None:
        raise SuiteError("give both process_index and process_count, or neither")
    index, count = int(process_index), int(process_count)
    if count < 1 or not 0 <= index < count:
        raise SuiteError(f"process_index={index} must be in [0, process_count={count})")
    return index, count, False


def process_0_only(name: str, process_index: int | None) -> dict[str, Any] | None:
    """For a suite that runs on process 0 only: a "skipped" note on other processes, else None."""
    index = process_index if process_index is not None else resolve_processes()[0]
    return (
        None if index == 0 else {"suite": name, "status": "skipped", "reason": "runs on process 0"}
    )


def contrastive_model(generator: Any) -> Any:
    """The generator's contrastive model (`Generator.contrastive`: a `ContrastiveModel`
    loaded from eval.contrastive_dir), or None (none loaded, or a stand-in without one)."""
    return getattr(generator, "contrastive", None)


def check_contrastive_scorer(name: str, settings: GenerationSettings, generator: Any) -> None:
    """Refuses scorer='contrastive' without a contrastive model, naming the setting."""
    if settings.scorer == "contrastive" and contrastive_model(generator) is None:
        raise SuiteError(
            f"{name}.scorer='contrastive' needs a contrastive model: set eval.contrastive_dir "
            "to a `parti-jax train-contrastive` work directory (or choose another scorer)"
        )


def shard_dir(out_dir: str | os.PathLike, index: int, count: int) -> storage.Path:
    return storage.path(out_dir) / SHARDS_DIR / f"process_{index}_of_{count}"


def _shard_dirs(out_dir: storage.Path) -> list[storage.Path]:
    """The shard folders that hold a manifest, sorted."""
    shards = out_dir / SHARDS_DIR
    return [shards / n for n in storage.listdir(shards) if (shards / n / R.MANIFEST).exists()]


def _gather(out_dir: storage.Path) -> tuple[list[R.PromptRecord], int]:
    """The suite folder's records, then each prompt found only in a shard (image paths
    prefixed by the shard folder); and how many came from the suite folder."""
    main = out_dir / R.MANIFEST
    records = R.read_manifest(out_dir, allow_torn_tail=True) if main.exists() else []
    num_main, seen = len(records), {r.prompt_id for r in records}
    for folder in _shard_dirs(out_dir):
        prefix = folder.relative_to(out_dir).as_posix() + "/"
        for r in R.read_manifest(folder, allow_torn_tail=True):
            if r.prompt_id not in seen:
                seen.add(r.prompt_id)
                records.append(dataclasses.replace(r, images=tuple(prefix + i for i in r.images)))
    return records, num_main


def merge_shards(out_dir: str | os.PathLike) -> list[R.PromptRecord]:
    """Folds every shard's records into the suite folder's manifest (rewritten atomically,
    each prompt id once); returns all records."""
    records, num_main = _gather(storage.path(out_dir))
    if len(records) > num_main:
        text = "".join(R.manifest_line(r) for r in records)
        R.write_atomic(storage.path(out_dir) / R.MANIFEST, text)
    return records


def task_batches(task: Any, *, split: str, batch_size: int, **options: Any) -> Any:
    """A SeqIO pixels task's split in order, once: {image, text} batches (TensorFlow via
    parti_jax.data; `options`: image_size, seed)."""
    from parti_jax.data import pipeline

    return pipeline.make_pixels_iterator(task, batch_size=batch_size, split=split, shuffle=False,
                                         repeat=False, drop_remainder=False, **options)  # fmt: skip


def to_uint8(image: Any) -> np.ndarray:
    """float [H, W, 3] in [0, 1] (or uint8) -> uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise SuiteError(f"a generated image must be [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray, size: int | None = None) -> None:
    """Writes a PNG (a URL's as one object through storage)."""
    from PIL import Image

    pil = Image.fromarray(image)
    if size is not None and pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    if storage.is_url(path):
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG", optimize=False, compress_level=1)
        storage.write_bytes(path, buffer.getvalue())
        return
    storage.makedirs(storage.path(path).parent)
    pil.save(os.fspath(path), optimize=False, compress_level=1)


def load_png(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    with storage.open(path, "rb") as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


# (prompt, uint8 images as saved, image paths, the generator's result) -> record `extra`.
ResultHook = Callable[[R.PromptRecord, list[np.ndarray], list[str], Any], Mapping[str, Any]]


@dataclasses.dataclass
class SuiteRun:
    """What one process did, and whether it writes the suite's metrics and reports."""

    name: str
    settings: GenerationSettings
    generated: int  # prompts generated by this call
    skipped: int  # prompts of this process found done by an earlier run
    seconds: float
    records: list[R.PromptRecord]  # every record of the suite folder (when this process reports)
    pending: dict | None  # else: the metrics to return at once (another process reports)

    def summary(self) -> dict[str, Any]:
        """The metrics every generating suite reports: its settings and this run's work."""
        this_run = {"generated": self.generated, "skipped": self.skipped,
                    "seconds": round(self.seconds, 3)}  # fmt: skip
        return {"suite": self.name, "num_samples": self.settings.num_samples,
                "keep_top_k": self.settings.keep_top_k, "seed": self.settings.seed,
                "scorer": name_of(self.settings.scorer), "this_run": this_run}  # fmt: skip


def _check_settings(out_dir: storage.Path, settings: GenerationSettings) -> None:
    path = out_dir / SETTINGS_FILE
    new = settings.record()
    if path.exists():
        try:
            old = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise SuiteError(f"{path}: not valid JSON ({e}); delete it to start over") from None
        for key, value in new.items():
            if key in old and old[key] != value:
                raise SuiteError(
                    f"{out_dir}: images there were made with {key}={old[key]!r}, this run has "
                    f"{key}={value!r}; use another work directory or the same settings"
                )
    else:  # every process writes the same record, atomically
        R.write_atomic(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def _result_scores(result: Any, num_images: int, prompt_id: int) -> list[float]:
    scores = getattr(result, "scores", None)
    scores = [] if scores is None else [float(s) for s in np.asarray(scores).reshape(-1)]
    if scores and len(scores) != num_images:
        raise SuiteError(
            f"prompt_id {prompt_id}: the generator returned {num_images} images but "
            f"{len(scores)} scores"
        )
    if not all(math.isfinite(s) for s in scores):
        log.warning("prompt_id %d: non-finite rerank scores %s; not recorded", prompt_id, scores)
        return []
    return scores


def generate_suite(
    generator: Any,
    out_dir: str | os.PathLike,
    prompts: Sequence[R.PromptRecord],
    settings: GenerationSettings,
    *,
    name: str = "eval",
    process_index: int | None = None,
    process_count: int | None = None,
    on_result: ResultHook | None = None,
) -> SuiteRun:
    """Generates images for this process's share of `prompts` into an eval folder, resumably.

    `generator`: a `parti_jax.sampling.Generator` or anything with its
    `generate`. When `run.pending` is None this process writes the reports:
    `run.records` holds every record of the suite folder (shards merged).
    """
    check_contrastive_scorer(name, settings, generator)
    index, count, real_multihost = resolve_processes(process_index, process_count)
    out_dir = storage.path(out_dir)
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SuiteError(f"{name}: prompt ids are not unique")
    try:
        storage.makedirs(out_dir)
    except OSError as e:
        raise SuiteError(f"{out_dir}: cannot create the suite folder ({e})") from None
    _check_settings(out_dir, settings)
    if count == 1:
        merge_shards(out_dir)  # records of an earlier multi-process run
        folder = out_dir
    else:
        folder = shard_dir(out_dir, index, count)
        storage.makedirs(folder)
        storage.remove(folder / DONE_FILE)
    mine = list(prompts[index::count])
    done = {r.prompt_id: r.prompt for r in _gather(out_dir)[0]}
    for p in prompts:
        if p.prompt_id in done and done[p.prompt_id] != p.prompt:
            raise SuiteError(
                f"{out_dir}: prompt_id {p.prompt_id} was generated for {done[p.prompt_id]!r} "
                f"but this run asks for {p.prompt!r} (another prompt file or seed?); use "
                "another work directory"
            )
    todo = [p for p in mine if p.prompt_id not in done]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("%s: %d of %d prompts already generated; skipping them", name, skipped, len(mine))
    start = time.perf_counter()
    step = settings.calls_size()
    for chunk_start in range(0, len(todo), step):
        chunk = todo[chunk_start : chunk_start + step]
        results = generator.generate(
            [p.prompt for p in chunk], num_samples=settings.num_samples,
            keep_top_k=settings.keep_top_k, sampling_config=settings.sampling_config,
            seed=settings.seed, scorer=settings.scorer, batch_size=settings.batch_size,
            prompt_ids=[p.prompt_id for p in chunk],
        )  # fmt: skip
        if len(results) != len(chunk):
            raise SuiteError(
                f"{name}: the generator returned {len(results)} results for {len(chunk)} prompts"
            )
        records = [
            _save_result(folder, p, r, settings, on_result, name) for p, r in zip(chunk, results)
        ]
        R.write_manifest(folder, records)  # one fsync per chunk
        log.info("%s: %d/%d prompts (%.1f s)", name, skipped + chunk_start + len(chunk),
                 len(mine), time.perf_counter() - start)  # fmt: skip
    seconds = time.perf_counter() - start
    finalize = True
    if count > 1:
        key = f"{count}|" + "".join(f"{p.prompt_id}," for p in prompts)
        plan = hashlib.sha256(key.encode()).hexdigest()[:16]
        marker = {"plan": plan, "prompts": len(mine), "generated": len(todo)}
        storage.write_text(folder / DONE_FILE, json.dumps(marker) + "\n")
        if real_multihost:
            from parti_jax.train import distributed

            distributed.barrier(f"eval/{name}/{plan}")
            finalize = index == 0
        else:
            finalize = all(_marker_plan(shard_dir(out_dir, i, count)) == plan for i in range(count))
    run = SuiteRun(name, settings, len(todo), skipped, seconds, [], None)
    if finalize:
        run.records = merge_shards(out_dir)
    else:
        run.pending = {
            "suite": name,
            "status": "pending",
            "reason": f"process {index} of {count} finished its shard; the reports are written "
            "once every shard is done",
            "this_run": {"generated": run.generated, "skipped": run.skipped},
        }
    return run


def _save_result(
    folder: storage.Path, prompt: R.PromptRecord, result: Any, settings: GenerationSettings,
    on_result: ResultHook | None, name: str,
) -> R.PromptRecord:  # fmt: skip
    """Writes one prompt's images; returns its manifest record."""
    got_id = getattr(result, "prompt_id", prompt.prompt_id)
    if got_id is not None and int(got_id) != prompt.prompt_id:
        raise SuiteError(f"{name}: result for prompt_id {prompt.prompt_id} says prompt_id {got_id}")
    images = [to_uint8(im) for im in result.images]
    if not images:
        raise SuiteError(f"{name}: no images returned for prompt_id {prompt.prompt_id}")
    paths = [f"{R.IMAGES_DIR}/{prompt.prompt_id:05d}_{rank}.png" for rank in range(len(images))]
    for path, image in zip(paths, images):
        save_png(folder / path, image, settings.image_size)
    if settings.image_size is not None:
        images = [load_png(folder / p) for p in paths]
    extra = dict(on_result(prompt, images, paths, result)) if on_result else {}
    scores = _result_scores(result, len(paths), prompt.prompt_id)
    return dataclasses.replace(
        prompt, images=tuple(paths), scores=tuple(scores), seed=settings.seed, extra=extra
    )


def _marker_plan(folder: storage.Path) -> str | None:
    try:
        return json.loads(storage.read_text(folder / DONE_FILE)).get("plan")
    except (OSError, json.JSONDecodeError):
        return None
