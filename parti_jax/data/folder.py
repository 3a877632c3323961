"""A folder of images plus a captions file, as a seqio data source.

Layout:

    my_photos/
      captions.jsonl   {"file": "cats/1.jpg", "caption": "a cat on a mat"} per line
                       ("image" / "text" are accepted for "file" / "caption";
                       an optional "split" key assigns the example's split)
      (or captions.tsv file<TAB>caption[<TAB>split], with an optional header row)
      cats/1.jpg ...

A split is exactly one of `SPLITS`. Paths are resolved inside the folder only:
absolute paths, `..` escapes and symlinks that lead outside are refused. Every
bad row — malformed JSON, a missing key or column, an extra TSV column, an
unknown split, an empty caption, text that is not UTF-8 or not valid Unicode (a
lone surrogate), a missing file, an unsafe path, an empty, truncated or
undecodable image — is an error naming the captions file and its line, or,
with `skip_bad_examples=True`, is counted, logged and skipped
(`FolderIndex.skipped` holds the reasons). An image that turns bad after the
scan (or is not checked: `verify_images=False`, or 'auto', the default, for a
folder of more than EAGER_VERIFY_LIMIT rows) is met while reading: the same
one-line error, or with `skip_bad_examples=True` skipped and counted
(`FolderDataSource.skipped_at_read`, the iterator's `stats`).

Without a split key/column, a deterministic hash of the file path sends
`validation_fraction` of the images (all captions of an image together) to
'validation' and the rest to 'train'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import tensorflow as tf

from parti_jax.data import features
from parti_jax.data.preprocessors import ImageDecodeError, decode_image_rgb
from parti_jax.data.vocab import CAPTION_KEYS, text_lines, text_problem

CAPTION_FILES = ("captions.jsonl", "captions.tsv")
FILE_KEYS = ("file", "image")
SPLITS = ("train", "validation", "test")  # the split names a row may give
# verify_images='auto' decodes every image at registration up to this many rows (every
# host does it: ~1000 photos take seconds); larger folders are checked as they are read.
EAGER_VERIFY_LIMIT = 1000

logger = logging.getLogger(__name__)


class FolderDataError(ValueError):
    """A bad row in a captions folder (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class FolderRecord:
    file: str  # path relative to the folder, as written in the captions file
    path: str  # resolved absolute path
    caption: str
    split: str
    line: int  # 1-based line in the captions file


@dataclasses.dataclass
class FolderIndex:
    folder: str
    captions_file: str
    records: list[FolderRecord]
    skipped: list[str]  # one message per skipped row

    def split_records(self, split: str) -> list[FolderRecord]:
        return [r for r in self.records if r.split == split]

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})


def find_captions_file(folder: str) -> str:
    """`captions.jsonl` or `captions.tsv` inside `folder` (exactly one of them)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory")
    found = [
        os.path.join(folder, n) for n in CAPTION_FILES if os.path.isfile(os.path.join(folder, n))
    ]
    if not found:
        raise FileNotFoundError(
            f"{folder}: no captions file; add captions.jsonl "
            '({"file": ..., "caption": ...} per line) or captions.tsv (file<TAB>caption)'
        )
    if len(found) > 1:
        raise FolderDataError(f"{folder}: both {found[0]} and {found[1]} exist; keep one")
    return found[0]


def hash_split(file: str, validation_fraction: float) -> str:
    """'validation' for a stable `validation_fraction` of file names, else 'train'."""
    digest = hashlib.sha256(file.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if position < validation_fraction else "train"


def resolve_inside(folder: str, file: str, *, root: str | None = None) -> str:
    """The real path of `file` inside `folder` (whose real path `root` is, when the caller
    knows it); ValueError if it would leave the folder."""
    if not file:
        raise ValueError("empty file name")
    if os.path.isabs(file) or file.startswith(("/", "\\")) or (len(file) > 1 and file[1] == ":"):
        raise ValueError(
            f"absolute path {file!r} is not allowed; give a path relative to the folder"
        )
    root = root or os.path.realpath(folder)
    resolved = os.path.realpath(os.path.join(root, file))
    if os.path.commonpath([root, resolved]) != root:
        raise ValueError(f"path {file!r} leaves the folder (via '..' or a symlink); refused")
    return resolved


def _first_key(row: Mapping, keys: Sequence[str]):
    for k in keys:
        if k in row:
            return row[k]
    raise ValueError(f'missing key "{keys[0]}" (or "{keys[1]}")')


def _split(value, what: str) -> str:
    """`value` when it is exactly one of SPLITS; ValueError naming `what` otherwise."""
    if value in SPLITS:
        return value
    near = str(value).strip().lower()
    hint = f" (did you mean {near!r}?)" if near in SPLITS else ""
    raise ValueError(f"{what} {value!r} is not a split: use one of {', '.join(SPLITS)}{hint}")


def _jsonl_row(text: str, line: int) -> tuple[str, str, str | None]:
    """(file, caption, split or None) of a captions.jsonl line; ValueError names the problem."""
    del line
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    file, caption = _first_key(row, FILE_KEYS), _first_key(row, CAPTION_KEYS)
    if not isinstance(file, str) or not isinstance(caption, str):
        raise ValueError('"file" and "caption" must be strings')
    for key, value in (("file", file), ("caption", caption)):
        if problem := text_problem(value):
            raise ValueError(f'"{key}" is {problem}')
    split = row.get("split")
    return file, caption, None if split is None else _split(split, '"split"')


def _tsv_row(text: str, line: int) -> tuple[str, str, str | None] | None:
    """(file, caption, split or None) of a captions.tsv line, None for a header row."""
    fields = text.split("\t")
    names = [f.strip().lower() for f in fields]
    header = len(names) in (2, 3) and names[0] in FILE_KEYS and names[1] in CAPTION_KEYS
    if line == 1 and header and names[2:] in ([], ["split"]):
        return None
    if len(fields) < 2:
        raise ValueError("missing caption column (expected file<TAB>caption)")
    if len(fields) > 3:
        raise ValueError(f"{len(fields)} columns; expected file<TAB>caption[<TAB>split]")
    split = None
    if len(fields) == 3:
        split = _split(fields[2].strip(), "third column (file<TAB>caption<TAB>split)")
    return fields[0].strip(), fields[1], split


def _rows(captions_file: str, parse_row):
    """(line, (file, caption, split), None) or (line, None, problem) per data row."""
    for line, text, problem in text_lines(captions_file):
        if problem is None and text.strip():
            try:
                row = parse_row(text, line)
            except ValueError as e:
                problem = str(e)
            else:
                if row is not None:
                    yield line, row, None
        if problem is not None:
            yield line, None, problem


def scan_folder(
    folder: str,
    *,
    validation_fraction: float = 0.0,
    skip_bad_examples: bool = False,
    verify_images: bool | Literal["auto"] = "auto",
) -> FolderIndex:
    """Reads and validates the captions file (and, for small folders, decodes every image).

    Args:
      folder: the folder holding the images and captions.jsonl / captions.tsv.
      validation_fraction: share of images hashed into 'validation' when rows
        carry no split.
      skip_bad_examples: count and skip bad rows instead of raising.
      verify_images: True: decode every image up front, so undecodable files are
        found (and counted) here rather than mid-training. False: a bad image
        fails (or is skipped and counted) when the pipeline reaches it, naming
        the captions file, line and image. 'auto': True for up to
        EAGER_VERIFY_LIMIT rows, else False (decoding a web-scale folder on every
        host at start-up takes minutes to hours).

    Raises:
      FolderDataError naming the captions file, the line and the fix.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    if verify_images not in (True, False, "auto"):
        raise ValueError(f"verify_images must be True, False or 'auto', got {verify_images!r}")
    captions_file = find_captions_file(folder)
    parse_row = _jsonl_row if captions_file.endswith(".jsonl") else _tsv_row
    rows = list(_rows(captions_file, parse_row))
    if verify_images == "auto":
        verify_images = len(rows) <= EAGER_VERIFY_LIMIT
        if not verify_images:
            logger.info(
                "%s: %d rows; images are checked as they are read (verify_images='auto' "
                "decodes them at registration up to %d rows; pass True to force it)",
                captions_file,
                len(rows),
                EAGER_VERIFY_LIMIT,
            )
    root = os.path.realpath(folder)
    records, skipped = [], []

    def bad(line: int, message: str) -> None:
        full = f"{captions_file}: line {line}: {message}"
        if not skip_bad_examples:
            raise FolderDataError(
                full + " (fix the row, or pass skip_bad_examples=True to skip it)"
            )
        skipped.append(full)

    for line, row, problem in rows:
        if problem is not None:
            bad(line, problem)
            continue
        file, caption, split = row
        if not caption.strip():
            bad(line, f"empty caption for {file!r}")
            continue
        try:
            path = resolve_inside(folder, file, root=root)
        except ValueError as e:
            bad(line, str(e))
            continue
        if not os.path.isfile(path):
            bad(line, f"image file {file!r} does not exist")
            continue
        if verify_images:
            try:
                read_image(path, file)
            except ImageDecodeError as e:
                bad(line, str(e))
                continue
        split = split or hash_split(file, validation_fraction)
        records.append(FolderRecord(file, path, caption, split, line))
    if skipped:
        logger.warning(
            "%s: skipped %d bad row(s) (skip_bad_examples=True); first: %s",
            captions_file,
            len(skipped),
            skipped[0],
        )
    if not records:
        raise FolderDataError(f"{captions_file}: no usable rows")
    return FolderIndex(folder, captions_file, records, skipped)


def read_image(path: str, file: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of the image at `path`; ImageDecodeError naming `file` when it
    cannot be read or decoded."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"{file}: cannot read the image file ({e.strerror or e})") from None
    return decode_image_rgb(data, source=file)


class FolderDataSource(features.HostShardedSource):
    """Yields {file, text, image uint8 [H, W, 3]} from a scanned folder.

    Shuffling permutes the (in-memory) file list with the seed; host sharding
    takes every num_shards-th row after a fixed order, so hosts read disjoint
    rows whatever the seed. An image that cannot be read or decoded when the
    pipeline reaches it fails with the one-line error naming the captions file,
    line and image, or, with `skip_bad_examples`, is left out, logged and
    counted in `skipped_at_read` ({line: reason}, the rows found bad while
    reading in this process).
    """

    def __init__(self, index: FolderIndex, *, skip_bad_examples: bool = False) -> None:
        self.index = index
        self.skip_bad_examples = skip_bad_examples
        self.skipped_at_read: dict[int, str] = {}
        self._records = {r.line: r for r in index.records}
        super().__init__(
            splits=index.splits,
            num_input_examples={s: len(index.split_records(s)) for s in index.splits},
            caching_permitted=False,
        )

    def list_shards(self, split: str) -> Sequence[str]:
        return [r.path for r in self.index.split_records(split)]

    def _load(self, line: np.int64) -> tuple[np.ndarray, bytes]:
        """(image, b"") of the row at `line`, or (placeholder, the one-line problem)."""
        record = self._records[int(line)]
        try:
            return read_image(record.path, record.file), b""
        except ImageDecodeError as e:
            problem = f"{self.index.captions_file}: line {record.line}: {e}"
        if not self.skip_bad_examples:
            problem += (
                " (replace or remove the image, or register the task with "
                "skip_bad_examples=True to skip such rows)"
            )
        elif record.line not in self.skipped_at_read:
            self.skipped_at_read[record.line] = problem
            logger.warning(
                "skipped while reading (skip_bad_examples=True, %d row(s) so far): %s",
                len(self.skipped_at_read),
                problem,
            )
        return np.zeros((1, 1, 3), np.uint8), problem.encode("utf-8")

    def read(
        self, split: str, *, shuffle: bool, seed: int | None, shard_index: int, num_shards: int
    ) -> tf.data.Dataset:
        records = self.index.split_records(split)[shard_index::num_shards]
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "file": [r.file for r in records],
                "text": [r.caption for r in records],
                "line": np.array([r.line for r in records], np.int64),
            }
        )
        if shuffle and records:
            ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)

        @tf.autograph.experimental.do_not_convert
        def load(row):
            # A bad image fails the pipeline through an assertion carrying the message
            # (one line), not an exception inside numpy_function (a logged traceback).
            image, problem = tf.numpy_function(
                self._load, [row["line"]], (tf.uint8, tf.string), stateful=False
            )
            image.set_shape([None, None, 3])
            example = {"file": row["file"], "text": row["text"], "image": image}
            return features.checked_example(example, problem, self.skip_bad_examples)

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        return features.drop_bad_examples(ds, self.skip_bad_examples)
