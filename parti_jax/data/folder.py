"""A folder of images plus a captions file, as a seqio data source.

Layout:

    my_photos/
      captions.jsonl   {"file": "cats/1.jpg", "caption": "a cat on a mat"} per line
                       ("image" / "text" are accepted for "file" / "caption";
                       an optional "split" key assigns the example's split)
      (or captions.tsv file<TAB>caption[<TAB>split], with an optional header row)
      cats/1.jpg ...

Paths are resolved inside the folder only: absolute paths, `..` escapes and
symlinks that lead outside are refused. Every bad row — malformed JSON, a
missing key or column, an empty or non-UTF-8 caption, a missing file, an
unsafe path, an empty, truncated or undecodable image — is an error naming the
captions file and its line, or, with `skip_bad_examples=True`, is counted,
logged and skipped (`FolderIndex.skipped` holds the reasons).

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

import tensorflow as tf

from parti_jax.data import features
from parti_jax.data.preprocessors import ImageDecodeError, decode_image_rgb, decode_image_tf
from parti_jax.data.vocab import CAPTION_KEYS

CAPTION_FILES = ("captions.jsonl", "captions.tsv")
FILE_KEYS = ("file", "image")

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


def resolve_inside(folder: str, file: str) -> str:
    """The real path of `file` inside `folder`; ValueError if it would leave the folder."""
    if not file:
        raise ValueError("empty file name")
    if os.path.isabs(file) or file.startswith(("/", "\\")) or (len(file) > 1 and file[1] == ":"):
        raise ValueError(
            f"absolute path {file!r} is not allowed; give a path relative to the folder"
        )
    root = os.path.realpath(folder)
    resolved = os.path.realpath(os.path.join(root, file))
    if os.path.commonpath([root, resolved]) != root:
        raise ValueError(f"path {file!r} leaves the folder (via '..' or a symlink); refused")
    return resolved


def _first_key(row: Mapping, keys: Sequence[str]):
    for k in keys:
        if k in row:
            return row[k]
    raise ValueError(f'missing key "{keys[0]}" (or "{keys[1]}")')


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
    return file, caption, row.get("split")


def _tsv_row(text: str, line: int) -> tuple[str, str, str | None] | None:
    """(file, caption, split or None) of a captions.tsv line, None for a header row."""
    fields = text.split("\t")
    lowered = [f.strip().lower() for f in fields[:2]]
    if line == 1 and len(lowered) == 2 and lowered[0] in FILE_KEYS and lowered[1] in CAPTION_KEYS:
        return None
    if len(fields) < 2:
        raise ValueError("missing caption column (expected file<TAB>caption)")
    if len(fields) > 3:
        raise ValueError(f"{len(fields)} columns; expected file<TAB>caption[<TAB>split]")
    return fields[0].strip(), fields[1], fields[2].strip() if len(fields) == 3 else None


def _rows(captions_file: str, parse_row):
    """(line, (file, caption, split), None) or (line, None, problem) per data row."""
    with open(captions_file, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
                row = parse_row(text, line) if text.strip() else None
            except UnicodeDecodeError as e:
                yield line, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
            except ValueError as e:
                yield line, None, str(e)
            else:
                if row is not None:
                    yield line, row, None


def scan_folder(
    folder: str,
    *,
    validation_fraction: float = 0.0,
    skip_bad_examples: bool = False,
    verify_images: bool = True,
) -> FolderIndex:
    """Reads and validates the captions file (and, by default, decodes every image once).

    Args:
      folder: the folder holding the images and captions.jsonl / captions.tsv.
      validation_fraction: share of images hashed into 'validation' when rows
        carry no split.
      skip_bad_examples: count and skip bad rows instead of raising.
      verify_images: decode every image up front, so undecodable files are
        found (and counted) here rather than mid-training. Without it a bad
        image fails when the pipeline reaches it, naming the file.

    Raises:
      FolderDataError naming the captions file, the line and the fix.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    captions_file = find_captions_file(folder)
    parse_row = _jsonl_row if captions_file.endswith(".jsonl") else _tsv_row
    records, skipped = [], []

    def bad(line: int, message: str) -> None:
        full = f"{captions_file}: line {line}: {message}"
        if not skip_bad_examples:
            raise FolderDataError(
                full + " (fix the row, or pass skip_bad_examples=True to skip it)"
            )
        skipped.append(full)

    for line, row, problem in _rows(captions_file, parse_row):
        if problem is not None:
            bad(line, problem)
            continue
        file, caption, split = row
        if not caption.strip():
            bad(line, f"empty caption for {file!r}")
            continue
        try:
            path = resolve_inside(folder, file)
        except ValueError as e:
            bad(line, str(e))
            continue
        if not os.path.isfile(path):
            bad(line, f"image file {file!r} does not exist")
            continue
        if verify_images:
            try:
                with open(path, "rb") as f:
                    decode_image_rgb(f.read(), source=file)
            except ImageDecodeError as e:
                bad(line, str(e))
                continue
        if split is not None and (not isinstance(split, str) or not split.strip()):
            bad(line, f"split must be a non-empty string, got {split!r}")
            continue
        split = split.strip() if split else hash_split(file, validation_fraction)
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


class FolderDataSource(features.HostShardedSource):
    """Yields {file, text, image uint8 [H, W, 3]} from a scanned folder.

    Shuffling permutes the (in-memory) file list with the seed; host sharding
    takes every num_shards-th row after a fixed order, so hosts read disjoint
    rows whatever the seed.
    """

    def __init__(self, index: FolderIndex) -> None:
        self.index = index
        super().__init__(
            splits=index.splits,
            num_input_examples={s: len(index.split_records(s)) for s in index.splits},
            caching_permitted=False,
        )

    def list_shards(self, split: str) -> Sequence[str]:
        return [r.path for r in self.index.split_records(split)]

    def read(
        self, split: str, *, shuffle: bool, seed: int | None, shard_index: int, num_shards: int
    ) -> tf.data.Dataset:
        records = self.index.split_records(split)[shard_index::num_shards]
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "file": [r.file for r in records],
                "path": [r.path for r in records],
                "text": [r.caption for r in records],
            }
        )
        if shuffle and records:
            ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)

        @tf.autograph.experimental.do_not_convert
        def load(row):
            image = decode_image_tf(tf.io.read_file(row["path"]), row["file"])
            return {"file": row["file"], "text": row["text"], "image": image}

        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
