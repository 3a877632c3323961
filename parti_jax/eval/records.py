"""The eval output folder: what an eval suite writes and every report reads.

An eval run over a prompt set (PartiPrompts, shapes, COCO captions) writes one
folder::

    <eval_dir>/
      metrics.json      # one JSON object: suite-level numbers (e.g. {"fid": 7.2,
                        #   "fid_status": "unvalidated", ...}); rewritten atomically
      manifest.jsonl    # one JSON object per prompt, one per line (see below)
      images/...        # the images the manifest names (PNG), any sub-folders
      index.html        # the gallery (parti_jax.eval.gallery.write_gallery)

Each manifest line is a `PromptRecord`::

    {"prompt_id": 12, "prompt": "a red cube", "category": "Artifacts",
     "challenge": "Basic", "note": "", "images": ["images/00012_0.png", ...],
     "scores": [0.31, ...], "seed": 0}

- `prompt_id`: int >= 0, unique within the manifest (the prompt's row in its
  prompt set; sampling folds it into the seed, see docs/DESIGN.md "Sampling").
- `prompt`, `category`, `challenge`, `note`: strings (untrusted text; every page
  escapes them). Prompt sets without categories use "" (shown as "(none)").
- `images`: relative POSIX paths inside the eval folder ("/" separators, no
  "..", not absolute), in rank order (best first after reranking).
- `scores`: one number per image (reranker or judge score, higher is better), or
  an empty list when nothing scored the images.
- `seed`: int, the sampling seed.
- `extra` (optional): a JSON object with suite-specific fields (judge verdicts,
  timings); no other keys are allowed, so a misspelt field is an error.

The manifest is append-only: `ManifestWriter` writes one line per finished
prompt and flushes it to disk (fsync) before returning, so a crashed or
pre-empted eval keeps every record it wrote, and a resumed eval skips the
prompt ids already present (`ManifestWriter.done_ids`). A last line cut short
by a crash (no trailing newline, not valid JSON) is dropped with a warning when
the writer reopens the file; any other bad line is an error naming the file
and line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.jsonl"
METRICS = "metrics.json"
IMAGES_DIR = "images"
INDEX = "index.html"

_REQUIRED = ("prompt_id", "prompt", "category", "challenge", "note", "images", "scores", "seed")
_OPTIONAL = ("extra",)

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A malformed eval folder, manifest line or metrics file (message names the file)."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt's result: the prompt, its labels, its images and their scores."""

    prompt_id: int
    prompt: str
    category: str = ""
    challenge: str = ""
    note: str = ""
    images: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    seed: int = 0
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "scores", tuple(self.scores))
        problem = _problem(self)
        if problem:
            raise RecordError(f"prompt_id {self.prompt_id!r}: {problem}")

    def to_json(self) -> dict[str, Any]:
        """The manifest line's object (key order fixed; `extra` only when non-empty)."""
        out: dict[str, Any] = {
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "category": self.category,
            "challenge": self.challenge,
            "note": self.note,
            "images": list(self.images),
            "scores": [float(s) for s in self.scores],
            "seed": self.seed,
        }
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "record") -> PromptRecord:
        """Parses one manifest object; errors start with `where` (e.g. "file:line")."""
        if not isinstance(obj, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise RecordError(
                f"{where}: missing field(s) {', '.join(missing)}; every manifest line needs "
                f"{', '.join(_REQUIRED)}"
            )
        unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise RecordError(
                f"{where}: unknown field(s) {', '.join(unknown)}; put suite-specific "
                "fields under 'extra'"
            )
        try:
            return cls(
                prompt_id=obj["prompt_id"],
                prompt=obj["prompt"],
                category=obj["category"],
                challenge=obj["challenge"],
                note=obj["note"],
                images=_as_tuple(obj["images"], "images", where),
                scores=_as_tuple(obj["scores"], "scores", where),
                seed=obj["seed"],
                extra=obj.get("extra") or {},
            )
        except RecordError as e:
            raise RecordError(f"{where}: {e}") from None


def _as_tuple(value: Any, field: str, where: str) -> tuple:
    if not isinstance(value, list):
        raise RecordError(f"{where}: field '{field}' must be a list, got {type(value).__name__}")
    return tuple(value)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _problem(r: PromptRecord) -> str | None:
    """Returns what is wrong with a record, or None."""
    if not _is_int(r.prompt_id) or r.prompt_id < 0:
        return f"field 'prompt_id' must be an int >= 0, got {r.prompt_id!r}"
    for name in ("prompt", "category", "challenge", "note"):
        if not isinstance(getattr(r, name), str):
            return f"field '{name}' must be a string, got {type(getattr(r, name)).__name__}"
    if not _is_int(r.seed):
        return f"field 'seed' must be an int, got {r.seed!r}"
    for path in r.images:
        problem = image_path_problem(path)
        if problem:
            return f"field 'images': {problem}"
    for s in r.scores:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            return f"field 'scores' must hold finite numbers, got {s!r}"
    if r.scores and len(r.scores) != len(r.images):
        return (
            f"field 'scores' has {len(r.scores)} entries but 'images' has {len(r.images)}; "
            "give one score per image or an empty list"
        )
    if not isinstance(r.extra, Mapping):
        return f"field 'extra' must be a JSON object, got {type(r.extra).__name__}"
    return None


def image_path_problem(path: Any) -> str | None:
    """Why `path` is not a relative POSIX path inside the eval folder, or None."""
    if not isinstance(path, str) or not path:
        return f"image path must be a non-empty string, got {path!r}"
    if "\\" in path or path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return f"image path {path!r} must be relative with '/' separators"
    parts = PurePosixPath(path).parts
    if any(p in ("..", ".") for p in parts) or "//" in path:
        return f"image path {path!r} must not contain '.', '..' or empty segments"
    return None


# --------------------------------------------------------------------------- reading


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecordError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def manifest_path(eval_dir: str | os.PathLike) -> Path:
    return Path(eval_dir) / MANIFEST


def metrics_path(eval_dir: str | os.PathLike) -> Path:
    return Path(eval_dir) / METRICS


def _parse_lines(path: Path, text: str, *, drop_torn_tail: bool) -> tuple[list[PromptRecord], int]:
    """Parses manifest text; returns records and the byte length of the valid prefix."""
    records: list[PromptRecord] = []
    seen: dict[int, int] = {}
    lines = text.split("\n")
    torn = not text.endswith("\n") and text != ""
    valid_len = 0
    for lineno, line in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        if is_last and line == "":
            break
        where = f"{path}:{lineno}"
        if not line.strip():
            raise RecordError(f"{where}: empty line; a manifest has one JSON object per line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if is_last and torn and drop_torn_tail:
                log.warning("%s: dropping a last line cut short by a crash (%s)", where, e.msg)
                break
            raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        record = PromptRecord.from_json(obj, where=where)
        if record.prompt_id in seen:
            raise RecordError(
                f"{where}: prompt_id {record.prompt_id} already written on line "
                f"{seen[record.prompt_id]}; a manifest holds each prompt once"
            )
        seen[record.prompt_id] = lineno
        records.append(record)
        valid_len += len(line.encode("utf-8")) + (0 if is_last else 1)
    return records, valid_len


def read_manifest(
    eval_dir: str | os.PathLike, *, check_images: bool = False, allow_torn_tail: bool = False
) -> list[PromptRecord]:
    """Reads and validates `<eval_dir>/manifest.jsonl` (or a manifest file path given directly).

    Args:
      eval_dir: the eval folder, or the path of a manifest file.
      check_images: also check that every image file exists (error names the line).
      allow_torn_tail: skip a last line cut short by a crash instead of failing.
    """
    path = Path(eval_dir)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise RecordError(f"{path}: no manifest; is {path.parent} an eval output folder?")
    text = _decode(path, path.read_bytes())
    records, _ = _parse_lines(path, text, drop_torn_tail=allow_torn_tail)
    if check_images:
        root = path.parent
        for lineno, record in enumerate(records, start=1):
            for image in record.images:
                if not (root / image).is_file():
                    raise RecordError(
                        f"{path}:{lineno}: image {image!r} of prompt_id {record.prompt_id} "
                        f"does not exist under {root}"
                    )
    return records


def read_metrics(eval_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `<eval_dir>/metrics.json`; an absent file is an empty dict."""
    path = metrics_path(eval_dir)
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- writing


def write_metrics(eval_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Writes `metrics.json` atomically (temp file + rename); values must be JSON-able."""
    path = metrics_path(eval_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(dict(metrics), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{path}: metrics are not plain JSON ({e})") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def update_metrics(eval_dir: str | os.PathLike, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merges `updates` into metrics.json (suites add their keys without dropping others)."""
    merged = read_metrics(eval_dir)
    merged.update(updates)
    write_metrics(eval_dir, merged)
    return merged


class ManifestWriter:
    """Append-only writer for `manifest.jsonl`; one durable line per finished prompt.

    Use as a context manager::

        with ManifestWriter(eval_dir) as writer:
            for prompt in prompts:
                if prompt.prompt_id in writer.done_ids:
                    continue  # written by an earlier, interrupted run
                writer.append(PromptRecord(...))
    """

    def __init__(
        self, eval_dir: str | os.PathLike, *, check_images: bool = True, fsync_each: bool = True
    ):
        self.eval_dir = Path(eval_dir)
        self.fsync_each = fsync_each
        self._unsynced = False
        self.path = self.eval_dir / MANIFEST
        self.check_images = check_images
        try:
            (self.eval_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordError(f"{self.eval_dir}: cannot create the eval folder ({e})") from None
        self.records: list[PromptRecord] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            text = _decode(self.path, raw)
            self.records, valid_len = _parse_lines(self.path, text, drop_torn_tail=True)
            if valid_len != len(raw) or (valid_len and not raw.endswith(b"\n")):
                # Cut a torn last line, or add the newline a complete last line lacks.
                with open(self.path, "r+b") as f:
                    f.truncate(valid_len)
                    if valid_len and not raw[:valid_len].endswith(b"\n"):
                        f.seek(valid_len)
                        f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        self.done_ids: set[int] = {r.prompt_id for r in self.records}
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, record: PromptRecord) -> None:
        """Writes one record and fsyncs it; a prompt id already written is an error."""
        if record.prompt_id in self.done_ids:
            raise RecordError(
                f"{self.path}: prompt_id {record.prompt_id} is already in the manifest; "
                "skip ids in ManifestWriter.done_ids when resuming"
            )
        if self.check_images:
            for image in record.images:
                if not (self.eval_dir / image).is_file():
                    raise RecordError(
                        f"{self.path}: prompt_id {record.prompt_id} names image {image!r}, "
                        f"which does not exist under {self.eval_dir}; write the image first"
                    )
        # ASCII-only lines: U+2028 and friends cannot split a record for any reader.
        line = json.dumps(record.to_json(), ensure_ascii=True, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        if self.fsync_each:
            os.fsync(self._file.fileno())
        else:
            self._unsynced = True
        self.done_ids.add(record.prompt_id)
        self.records.append(record)

    def extend(self, records: Iterable[PromptRecord]) -> None:
        for record in records:
            self.append(record)

    def close(self) -> None:
        if not self._file.closed:
            if self._unsynced:
                os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(
    eval_dir: str | os.PathLike, records: Sequence[PromptRecord], *, check_images: bool = True
) -> Path:
    """Appends `records` to the eval folder's manifest (creating it); returns its path.

    Bulk writes fsync once at the end; an eval loop uses ManifestWriter (one fsync per prompt).
    """
    with ManifestWriter(eval_dir, check_images=check_images, fsync_each=False) as writer:
        writer.extend(records)
    return writer.path
