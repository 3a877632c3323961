"""The eval output folder: what an eval suite writes and every report reads.

An eval run over a prompt set (PartiPrompts, shapes, COCO captions) writes::

    <eval_dir>/
      metrics.json      # one JSON object of suite-level numbers, rewritten atomically
      manifest.jsonl    # one PromptRecord per line (below)
      images/...        # the images the manifest names (PNG)
      index.html        # the gallery (parti_jax.eval.gallery.write_gallery)

A manifest line::

    {"prompt_id": 12, "prompt": "a red cube", "category": "Artifacts",
     "challenge": "Basic", "note": "", "images": ["images/00012_0.png", ...],
     "scores": [0.31, ...], "seed": 0}

`prompt_id` is an int >= 0, unique in the manifest (the prompt's row in its
set; sampling folds it into the seed). Texts are untrusted (pages escape them).
`images` are relative POSIX paths inside the folder, best first; `scores` one
per image (higher is better) or []. An optional `extra` object holds suite
fields; any other key is an error, so a misspelt field is caught.

The manifest is append-only and each line is fsynced, so a crashed eval keeps
every record it wrote; a last line cut short by a crash is dropped with a
warning on resume, any other bad line is an error naming the file and line.
An eval folder may be a URL (gs://...): every file goes through
parti_jax/storage.py, and there the manifest object is rewritten whole when
lines are added (object stores cannot append; an object is never torn).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from parti_jax import storage

MANIFEST = "manifest.jsonl"
METRICS = "metrics.json"
IMAGES_DIR = "images"
INDEX = "index.html"

_REQUIRED = ("prompt_id", "prompt", "category", "challenge", "note", "images", "scores", "seed")

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
        out = {k: getattr(self, k) for k in _REQUIRED}
        out.update(images=list(self.images), scores=[float(s) for s in self.scores])
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
        unknown = sorted(set(obj) - {*_REQUIRED, "extra"})
        if unknown:
            raise RecordError(
                f"{where}: unknown field(s) {', '.join(unknown)}; put suite-specific "
                "fields under 'extra'"
            )
        for field in ("images", "scores"):
            if not isinstance(obj[field], list):
                raise RecordError(
                    f"{where}: field '{field}' must be a list, got {type(obj[field]).__name__}"
                )
        try:
            return cls(**{k: obj[k] for k in _REQUIRED}, extra=obj.get("extra") or {})
        except RecordError as e:
            raise RecordError(f"{where}: {e}") from None


def is_int(x: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _problem(r: PromptRecord) -> str | None:
    """Returns what is wrong with a record, or None."""
    if not is_int(r.prompt_id) or r.prompt_id < 0:
        return f"field 'prompt_id' must be an int >= 0, got {r.prompt_id!r}"
    for name in ("prompt", "category", "challenge", "note"):
        if not isinstance(getattr(r, name), str):
            return f"field '{name}' must be a string, got {type(getattr(r, name)).__name__}"
    if not is_int(r.seed):
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


def _parse(path: storage.Path, *, drop_torn_tail: bool) -> tuple[list[PromptRecord], bytes, int]:
    """Reads a manifest; returns its records, its bytes and the length of the valid prefix."""
    raw = storage.read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecordError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    records: list[PromptRecord] = []
    seen: dict[int, int] = {}
    lines = text.split("\n")
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
            if is_last and drop_torn_tail:  # no newline after it: torn
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
    return records, raw, valid_len


def read_manifest(
    eval_dir: str | os.PathLike, *, check_images: bool = False, allow_torn_tail: bool = False
) -> list[PromptRecord]:
    """Reads and validates `<eval_dir>/manifest.jsonl` (or a manifest file given directly);
    `check_images`: every image file must exist; `allow_torn_tail`: skip a last line cut short
    by a crash instead of failing."""
    path = storage.path(eval_dir)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise RecordError(f"{path}: no manifest; is {path.parent} an eval output folder?")
    records = _parse(path, drop_torn_tail=allow_torn_tail)[0]
    for lineno, record in enumerate(records if check_images else [], start=1):
        for image in record.images:
            if not (path.parent / image).is_file():
                raise RecordError(
                    f"{path}:{lineno}: image {image!r} of prompt_id {record.prompt_id} "
                    f"does not exist under {path.parent}"
                )
    return records


def read_metrics(eval_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `<eval_dir>/metrics.json`; an absent file is an empty dict."""
    path = storage.path(eval_dir) / METRICS
    if not path.exists():
        return {}
    try:
        obj = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_atomic(path: str | os.PathLike, text: str) -> storage.Path:
    """Writes a text file so that a reader sees the old or the new text, never a part
    (`storage.write_text`: a fsynced temp file and a rename locally, one object at a URL)."""
    path = storage.path(path)
    storage.write_text(path, text)
    return path


def write_metrics(eval_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> storage.Path:
    """Writes `metrics.json` atomically; values must be JSON-able."""
    path = storage.path(eval_dir) / METRICS
    try:
        text = json.dumps(dict(metrics), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{path}: metrics are not plain JSON ({e})") from None
    return write_atomic(path, text + "\n")


def update_metrics(eval_dir: str | os.PathLike, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merges `updates` into metrics.json (suites add their keys without dropping others)."""
    merged = read_metrics(eval_dir)
    merged.update(updates)
    write_metrics(eval_dir, merged)
    return merged


def manifest_line(record: PromptRecord) -> str:
    """A record as one manifest line; ASCII-only, so U+2028 and friends cannot split it."""
    return json.dumps(record.to_json(), ensure_ascii=True, allow_nan=False) + "\n"


class ManifestWriter:
    """Append-only writer for `manifest.jsonl`, a context manager: one durable line per
    finished prompt; a resumed run skips the ids in `done_ids` (written by an earlier run).
    At a URL, the object is rewritten whole at each durable point (`storage.Appender`)."""

    def __init__(self, eval_dir: str | os.PathLike, *, fsync_each: bool = True):
        self.eval_dir = storage.path(eval_dir)
        self.fsync_each = fsync_each
        self._unsynced = False
        self._url = storage.is_url(self.eval_dir)
        self.path = self.eval_dir / MANIFEST
        try:
            storage.makedirs(self.eval_dir / IMAGES_DIR)
        except OSError as e:
            raise RecordError(f"{self.eval_dir}: cannot create the eval folder ({e})") from None
        self.records: list[PromptRecord] = []
        if self.path.exists():
            self.records, raw, valid_len = _parse(self.path, drop_torn_tail=True)
            valid = raw[:valid_len]
            newline = b"\n" if valid and not valid.endswith(b"\n") else b""
            if valid + newline != raw and self._url:  # an object is whole: a written one
                storage.write_bytes(self.path, valid + newline)
            elif valid + newline != raw:  # cut a torn last line, or end a complete one
                with open(self.path, "r+b") as f:
                    f.truncate(valid_len)
                    f.seek(valid_len)
                    f.write(newline)
                    f.flush()
                    os.fsync(f.fileno())
        self.done_ids: set[int] = {r.prompt_id for r in self.records}
        if self._url:
            self._file: Any = storage.Appender(self.path)
        else:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._closed = False

    def append(self, record: PromptRecord) -> None:
        """Writes one record and fsyncs it; a prompt id already written is an error."""
        if record.prompt_id in self.done_ids:
            raise RecordError(
                f"{self.path}: prompt_id {record.prompt_id} is already in the manifest; "
                "skip ids in ManifestWriter.done_ids when resuming"
            )
        for image in record.images:
            if not (self.eval_dir / image).is_file():
                raise RecordError(
                    f"{self.path}: prompt_id {record.prompt_id} names image {image!r}, "
                    f"which does not exist under {self.eval_dir}; write the image first"
                )
        self._file.write(manifest_line(record))
        if not self.fsync_each:
            self._unsynced = True
        elif self._url:
            self._file.flush()  # the object, rewritten with this line
        else:
            self._file.flush()
            os.fsync(self._file.fileno())
        self.done_ids.add(record.prompt_id)
        self.records.append(record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unsynced and not self._url:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()  # an Appender writes the object here

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(eval_dir: str | os.PathLike, records: Sequence[PromptRecord]) -> storage.Path:
    """Appends `records` to the eval folder's manifest (creating it), with one fsync at the
    end; returns its path."""
    with ManifestWriter(eval_dir, fsync_each=False) as writer:
        for record in records:
            writer.append(record)
    return writer.path
