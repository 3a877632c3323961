"""Image-text pairs streamed from shards: what WebDataset tar files
(`parti_jax.data.webdataset`) and Parquet files (`parti_jax.data.parquet`) share.

Web-scale data comes as many shards, e.g. what img2dataset writes:

    shards/00000.tar   000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    shards/00001.tar   (an example is the members sharing a key: the name up to the
    ...                 first '.' of its base name; .jpg/.jpeg/.png/.webp image,
                        caption from .txt, else the "caption" / "text" field of .json)

or Parquet files with a caption column and an image-bytes column (binary, or a struct
with a 'bytes' field as Hugging Face datasets store images). Shards are named by a
folder (its `*.tar` / `*.parquet` files), a glob in the file name (`shards/*.tar`), a
brace pattern (`shards/{00000..00099}.tar`, `{a,b}`) or a list of these; local paths
and URLs (gs://) alike, read through `parti_jax.storage` (TensorFlow never sees a URL).

- **Lazy.** Registration lists the shards (one folder listing per parent folder) and
  opens none of them; a shard is opened when the iterator reaches it (a Parquet task
  reads the first file's schema once, to check the column names early).
- **Host-sharded by shard.** Host i of n reads shards i, i + n, ...; more hosts than
  shards is an error. Shard order is shuffled by the seed and `cycle_length` shards
  are read at once (round robin); unshuffled, shards are read one after another.
- **Resumable.** tf.data asks for record `i` of a shard: the reader is a pure function
  of (shard, i), so the saved tf.data iterator (ExternalStatePolicy.IGNORE) restores
  exactly. Open readers are kept and reused when a request continues where one
  stopped, so a shard is read once, front to back (one stream per shard on GCS); a
  request elsewhere (after a restore) opens the shard again and skips to `i`.
- **Bad examples** (an undecodable image, no image, a missing, empty, non-UTF-8 or
  invalid-Unicode caption, a Parquet row with only a URL: nothing is downloaded, a
  corrupt or truncated shard) end the pipeline with one line naming the shard and the
  member (tar) or row (Parquet, 0-based), or with `skip_bad_examples=True` are logged,
  skipped and counted (`source.skipped_at_read`, `source.skipped_per_shard`, the
  iterator's `stats['skipped_at_read']`). A shard that cannot be read past some point
  counts one bad example there and ends.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from parti_jax import storage
from parti_jax.data import features
from parti_jax.data.preprocessors import ImageDecodeError, decode_image_rgb
from parti_jax.data.vocab import text_problem

SPLITS = ("train", "validation", "test")
MAX_OPEN_READERS = 64  # readers kept open per source (each holds a file handle)
_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB = re.compile(r"[*?\[]")
_END = 1 << 62  # tf.data asks for records 0, 1, ... until a shard says it has ended

logger = logging.getLogger(__name__)

ShardSpec = str | Sequence[str]


class ShardListError(ValueError):
    """A shard specification that names no usable shards (the message names it)."""


# ------------------------------------------------------------ listing shards
def expand_braces(pattern: str) -> list[str]:
    """`s/{00000..00002}.tar` -> s/00000.tar, s/00001.tar, s/00002.tar (zero-padded when a
    bound is); `{a,b}` lists; several groups multiply, the first varying slowest."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    if bounds := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        low, high = bounds.groups()
        width = max(len(low), len(high)) if low[0] == "0" or high[0] == "0" else 0
        step = 1 if int(high) >= int(low) else -1
        items = [f"{i:0{width}d}" for i in range(int(low), int(high) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ShardListError(
            f"{pattern}: {{{body}}} is neither a range like {{00000..00099}} nor a list {{a,b}}"
        )
    return [p for item in items for p in expand_braces(head + item + tail)]


def list_shards(spec: ShardSpec, *, suffix: str) -> list[str]:
    """The shard paths `spec` names, in order: a folder (its `*<suffix>` files, sorted), a
    glob in the file name, a brace pattern, a file, or a list of these.

    Reads folder listings only (one per parent folder), never a shard.

    Raises:
      ShardListError naming the pattern for a missing shard, an empty match, a shard
      named twice or a glob outside the file name.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ShardListError("no shards given")
    shards: list[str] = []
    listings: dict[str, set[str]] = {}

    def names_in(parent: str) -> set[str]:
        if parent not in listings:
            listings[parent] = set(storage.listdir(parent))
        return listings[parent]

    for item in specs:
        item = os.fspath(item)
        for pattern in expand_braces(item):
            parent, name = _split_path(pattern)
            if _GLOB.search(parent):
                raise ShardListError(
                    f"{item}: glob characters are allowed in the file name only, not in "
                    f"{parent!r}; list the folders or use a brace pattern"
                )
            if _GLOB.search(name):
                found = [p for p in storage.glob(parent, name) if not _hidden(p)]
                if not found:
                    raise ShardListError(f"{pattern}: matches no files")
                shards += found
            elif name.endswith(suffix):
                if name not in names_in(parent):
                    raise ShardListError(f"{item}: shard {pattern} does not exist")
                shards.append(storage.join(parent, name))
            elif storage.isdir(pattern):
                found = [p for p in storage.glob(pattern, f"*{suffix}") if not _hidden(p)]
                if not found:
                    raise ShardListError(f"{pattern}: folder holds no *{suffix} files")
                shards += found
            else:
                raise ShardListError(
                    f"{pattern}: neither a folder nor a *{suffix} file; name the shards by "
                    f"a folder, a glob (*{suffix}) or a brace pattern ({{00000..00099}}{suffix})"
                )
    seen: set[str] = set()
    for shard in shards:
        if shard in seen:
            raise ShardListError(f"{shard}: named twice in {spec!r}")
        if problem := text_problem(shard):
            raise ShardListError(f"{shard!r}: the path is {problem}; rename the shard")
        seen.add(shard)
    return shards


def _split_path(pattern: str) -> tuple[str, str]:
    """(parent, file name) of a local path or URL."""
    head, _, name = pattern.rstrip("/").rpartition("/")
    if storage.is_url(pattern) and head.endswith(":/"):  # gs://bucket itself
        return pattern, ""
    return head or ".", name


def _hidden(path: str) -> bool:
    return path.rpartition("/")[2].startswith(".")


def shards_by_split(
    shards: ShardSpec | Mapping[str, ShardSpec], *, suffix: str
) -> dict[str, list[str]]:
    """{split: shard paths}: a Mapping gives each split its own shards, else all is 'train'."""
    if not isinstance(shards, Mapping):
        shards = {"train": shards}
    out = {}
    for split, spec in shards.items():
        if split not in SPLITS:
            raise ValueError(f"split {split!r} of the shards is not one of {', '.join(SPLITS)}")
        out[split] = list_shards(spec, suffix=suffix)
    return out


# ------------------------------------------------------------ records
@dataclasses.dataclass
class Record:
    """One example of a shard as read (not yet decoded)."""

    member: str  # names the example in its shard: a tar member, "row 12" (Parquet)
    image: bytes = b""  # encoded image
    caption: str = ""
    problem: str = ""  # why the example is bad; "" when it is fine


def reason(error: BaseException) -> str:
    """An exception as one line: "OSError: what happened"."""
    text = " ".join(str(error).split()) or "no details"
    return f"{type(error).__name__}: {text}"


def caption_problem(caption: str) -> str:
    """Why `caption` cannot be used (invalid Unicode, empty), or ""."""
    if problem := text_problem(caption):
        return f"caption is {problem}"
    return "" if caption.strip() else "empty caption"


def decoded_caption(data: bytes) -> tuple[str, str]:
    """(caption, "") of UTF-8 bytes, or ("", problem)."""
    try:
        caption = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return "", f"caption is not valid UTF-8 ({e.reason} at byte {e.start})"
    return caption, caption_problem(caption)


# ------------------------------------------------------------ the base source
class ShardedSource(features.HostShardedSource):
    """A seqio source over shards read record by record: {file, text, image uint8 [H, W, 3]}.

    Subclasses open a reader (`_open(shard)`: an object with `position`, `next()` ->
    Record or None at the end, `skip()` -> False at the end, `close()`); this class
    keeps readers for reuse, builds the tf.data pipeline and handles bad examples.
    """

    kind = "shard"

    def __init__(
        self,
        shards: Mapping[str, Sequence[str]],
        *,
        skip_bad_examples: bool = False,
        cycle_length: int = 4,
    ) -> None:
        if cycle_length < 1:
            raise ValueError(f"cycle_length must be >= 1, got {cycle_length}")
        self.shards = {split: list(paths) for split, paths in shards.items()}
        self.skip_bad_examples = skip_bad_examples
        self.cycle_length = cycle_length
        self.skipped_at_read: dict[tuple[str, str], str] = {}  # (shard, member) -> problem
        self._readers: list[tuple[str, object]] = []  # idle readers, least recently used first
        self._lock = threading.Lock()
        super().__init__(splits=list(self.shards), caching_permitted=False)

    def list_shards(self, split: str) -> Sequence[str]:
        return list(self.shards[split])

    @property
    def skipped_per_shard(self) -> dict[str, int]:
        """{shard: bad examples skipped while reading in this process}."""
        return dict(collections.Counter(shard for shard, _ in self.skipped_at_read))

    def _open(self, shard: str):
        raise NotImplementedError

    # -------------------------------------------------------- the pure reader
    def record(self, shard: str, index: int) -> Record | None:
        """Record `index` of `shard` (None past its end): a function of the shard's bytes
        only; a kept reader that stopped at `index` (or before it) continues."""
        reader = self._take(shard, index)
        try:
            while reader.position < index:
                if not reader.skip():
                    reader.close()
                    return None
            record = reader.next()
        except BaseException:
            reader.close()
            raise
        if record is None:
            reader.close()
        else:
            self._keep(shard, reader)
        return record

    def _take(self, shard: str, index: int):
        with self._lock:
            best = None
            for i, (s, reader) in enumerate(self._readers):
                fits = s == shard and reader.position <= index
                if fits and (best is None or reader.position > self._readers[best][1].position):
                    best = i
            if best is not None:
                return self._readers.pop(best)[1]
        return self._open(shard)

    def _keep(self, shard: str, reader) -> None:
        with self._lock:
            self._readers.append((shard, reader))
            evicted = self._readers[:-MAX_OPEN_READERS]
            del self._readers[:-MAX_OPEN_READERS]
        for _, old in evicted:
            old.close()

    def close(self) -> None:
        """Closes the kept readers (they are opened again when needed)."""
        with self._lock:
            readers, self._readers = self._readers, []
        for _, reader in readers:
            reader.close()

    # -------------------------------------------------------- tf.data
    def _read_py(self, shard, index):
        record = self.record(_text(shard), int(index))
        if record is None:
            return b"", b"", b"", b"", np.bool_(True)
        return (
            _bytes(record.member),
            record.image,
            record.caption.encode("utf-8"),
            _bytes(record.problem),
            np.bool_(False),
        )

    def _decode_py(self, shard, member, image, problem):
        """(image, b"") or (placeholder, the one-line problem naming shard and member)."""
        shard, member, problem = _text(shard), _text(member), _text(problem)
        if not problem:
            try:
                return decode_image_rgb(_raw(image), source=f"{shard}: {member}"), b""
            except ImageDecodeError as e:
                problem = str(e)
        else:
            problem = f"{shard}: {member}: {problem}" if member else f"{shard}: {problem}"
        if not self.skip_bad_examples:
            problem += (
                " (fix or remove the example, or register the task with "
                "skip_bad_examples=True to skip such examples)"
            )
        else:
            with self._lock:
                new = (shard, member) not in self.skipped_at_read
                self.skipped_at_read.setdefault((shard, member), problem)
                count = len(self.skipped_at_read)
            if new and (count <= 10 or count % 1000 == 0):
                logger.warning(
                    "skipped while reading (skip_bad_examples=True, %d so far): %s",
                    count,
                    problem,
                )
        return np.zeros((1, 1, 3), np.uint8), _bytes(problem)

    def read(
        self, split: str, *, shuffle: bool, seed: int | None, shard_index: int, num_shards: int
    ) -> tf.data.Dataset:
        shards = self.shards[split][shard_index::num_shards]
        if not shards:
            raise ValueError(
                f"{split}: {len(self.shards[split])} {self.kind}(s) cannot feed {num_shards} "
                f"hosts (host {shard_index} would read nothing); write at least as many "
                f"{self.kind}s as hosts"
            )
        ds = tf.data.Dataset.from_tensor_slices(shards)
        if shuffle:
            ds = ds.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)

        @tf.autograph.experimental.do_not_convert
        def records(shard):
            def read_one(index):
                values = tf.numpy_function(
                    self._read_py,
                    [shard, index],
                    (tf.string, tf.string, tf.string, tf.string, tf.bool),
                    stateful=False,
                )
                for v in values:
                    v.set_shape([])
                member, image, caption, problem, end = values
                return {"shard": shard, "member": member, "image": image, "text": caption,
                        "problem": problem, "end": end}  # fmt: skip

            shard_records = tf.data.Dataset.range(_END).map(read_one)
            return shard_records.take_while(lambda r: tf.logical_not(r["end"]))

        cycle = min(self.cycle_length, len(shards)) if shuffle else 1
        ds = ds.interleave(
            records,
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

        @tf.autograph.experimental.do_not_convert
        def decode(r):
            # A bad example fails the pipeline through an assertion carrying the message
            # (one line), not an exception inside numpy_function (a logged traceback).
            image, problem = tf.numpy_function(
                self._decode_py,
                [r["shard"], r["member"], r["image"], r["problem"]],
                (tf.uint8, tf.string),
                stateful=False,
            )
            image.set_shape([None, None, 3])
            problem.set_shape([])
            file = tf.strings.join([r["shard"], r["member"]], separator="/")
            example = {"file": file, "text": r["text"], "image": image}
            return features.checked_example(example, problem, self.skip_bad_examples)

        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        return features.drop_bad_examples(ds, self.skip_bad_examples)


def _raw(value) -> bytes:
    """A tf.string as numpy_function hands it over (bytes, or a 0-d object array)."""
    return value.item() if isinstance(value, np.ndarray) else bytes(value)


def _text(value) -> str:
    return _raw(value).decode("utf-8", "replace")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")  # member names may hold surrogate escapes
