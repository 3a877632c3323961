"""Precomputed image codes: TFRecord shards of `tf.train.Example` records plus `codes_meta.json`.

    id           bytes   the example's id (str ids are stored UTF-8)
    text         bytes   the caption, UTF-8
    image_codes  bytes   h * w raw codebook indices in raster order, little-endian
                         uint16 when the codebook has <= 65536 entries (2 bytes a
                         code: a 32x32 grid is 2 KiB), else int32 ("codes_dtype")

The meta holds the fields of docs/DESIGN.md §3 "Compatibility records" (shard
paths relative to the folder) plus codes_dtype and format_version. Writing is
crash-safe: `CodesShardWriter` renames `<shard>.incomplete` to `<shard>` only
when closed, so a complete-looking shard is complete, and `finalize_codes_meta`
writes the meta last (atomically), after every shard is complete.

Folders may be URLs (`gs://...`, parti_jax/storage.py). TensorFlow's file system
never sees one (its GCS client cannot be pointed at an emulator, so it would be
an untested path): a shard for a URL is written to a local file and uploaded as
one object when closed (on object stores that upload is the atomic commit: there
is no rename there), and training reads a URL's shards through storage into
memory, record by record in a stateless numpy function over the record's index,
splitting the TFRecord framing in `parti_jax.data.tfrecords` (crc32c-checked), so the
tf.data iterator's saved position stays exact. Local folders keep TensorFlow's
TFRecord reader and writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from parti_jax import storage
from parti_jax.data import features, tfrecords

META_FILE = "codes_meta.json"
RECORD_FEATURES = ("id", "text", "image_codes")  # each a bytes feature of a record
INCOMPLETE_SUFFIX = ".incomplete"
FORMAT_VERSION = 1
REQUIRED_META_KEYS = (
    "codebook_size",
    "grid",
    "codebook_hash",
    "image_size",
    "vqgan_checkpoint",
    "vqgan_step",
    "source_task",
    "split",
    "num_examples",
    "shards",
)


def codes_dtype_for(codebook_size: int) -> str:
    """Storage dtype: uint16 when every index fits (K <= 65536), else int32."""
    return "uint16" if codebook_size <= 65536 else "int32"


def _check_codes(
    codes: np.ndarray, *, codebook_size: int, num_codes: int, where: str
) -> np.ndarray:
    """Flattened int64 codes, or a ValueError naming `where` and the problem."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise ValueError(f"{where}: image codes must be integers, got dtype {codes.dtype}")
    codes = codes.reshape(-1).astype(np.int64)
    if codes.size != num_codes:
        raise ValueError(
            f"{where}: {codes.size} image codes, expected {num_codes} (the grid's h * w)"
        )
    bad = (codes < 0) | (codes >= codebook_size)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"{where}: image code {int(codes[first])} at position {first} is outside "
            f"[0, {codebook_size}) (codebook_size {codebook_size}); these codes come from "
            "another VQGAN or the shard is corrupt"
        )
    return codes


def _url_record(path: bytes, index: np.int64, expected: np.int64) -> bytes:
    """Record `index` of the shard at URL `path` (a stateless function of its arguments:
    tf.data saves only the index); a shard holding other than `expected` records (the
    count in its meta) is an error naming it."""
    where = path.decode("utf-8")
    data, starts, lengths = tfrecords.SHARDS.get(where)
    if len(starts) != int(expected):
        raise ValueError(
            f"{where}: holds {len(starts)} records, its codes_meta.json says {int(expected)}; "
            "the shard was replaced after the meta was written: run precompute-codes again"
        )
    begin = int(starts[index])
    return data[begin : begin + int(lengths[index])]


# ------------------------------------------------------------------ writing
class CodesShardWriter:
    """Writes one shard atomically: `.write(...)` records, `.close()` publishes it.

    Use as a context manager: on an exception the partial file is removed and the
    shard name never appears. Locally the records go to `<shard>.incomplete`,
    renamed at close; for a URL to a local temporary file uploaded at close as one
    object (no `.incomplete` object ever exists).
    """

    def __init__(
        self, codes_dir: str, shard_name: str, *, codebook_size: int, grid: Sequence[int]
    ) -> None:
        if os.path.basename(shard_name) != shard_name or shard_name in ("", ".", ".."):
            raise ValueError(f"shard_name must be a plain file name, got {shard_name!r}")
        if shard_name == META_FILE or shard_name.endswith(INCOMPLETE_SUFFIX):
            raise ValueError(f"shard_name {shard_name!r} is reserved")
        self.codebook_size = int(codebook_size)
        self.grid = tuple(int(g) for g in grid)
        self.num_codes = self.grid[0] * self.grid[1]
        self.dtype = codes_dtype_for(self.codebook_size)
        self.path = storage.join(codes_dir, shard_name)
        if storage.exists(self.path):
            raise FileExistsError(
                f"{self.path}: a complete shard already exists; skip it when resuming "
                "(codes.shard_is_complete) or delete it to rewrite it"
            )
        self._staging = None
        if storage.is_url(self.path):  # a local file, uploaded by close()
            self._staging = tempfile.TemporaryDirectory(prefix="parti_jax_shard_")
            self.tmp_path = os.path.join(self._staging.name, shard_name)
        else:
            storage.makedirs(codes_dir)
            self.tmp_path = self.path + INCOMPLETE_SUFFIX
        self._writer = tf.io.TFRecordWriter(self.tmp_path)
        self.count = 0
        self._closed = False

    def write(self, example_id: str | bytes, text: str, image_codes: np.ndarray) -> None:
        """Appends one record; codes are validated against the codebook and grid."""
        if self._closed:
            raise ValueError(f"{self.path}: write after close")
        codes = _check_codes(
            image_codes,
            codebook_size=self.codebook_size,
            num_codes=self.num_codes,
            where=f"{self.path}: record {self.count} (id {example_id!r})",
        )
        example_id = example_id.encode("utf-8") if isinstance(example_id, str) else example_id
        raw = codes.astype("<u2" if self.dtype == "uint16" else "<i4").tobytes()
        values = (bytes(example_id), text.encode("utf-8"), raw)
        features = {
            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
            for k, v in zip(RECORD_FEATURES, values)
        }
        record = tf.train.Example(features=tf.train.Features(feature=features))
        self._writer.write(record.SerializeToString())
        self.count += 1

    def close(self) -> int:
        """Flushes and publishes the shard (rename, or upload for a URL); returns the count."""
        if not self._closed:
            self._writer.close()
            if self._staging is not None:
                try:
                    with open(self.tmp_path, "rb") as f:
                        # One object, one request (storage.write_bytes). Not storage.copy: its
                        # gcsfs put_file loses a last b"\r" on the emulator.
                        storage.write_bytes(self.path, f.read())
                finally:
                    self._staging.cleanup()
            else:
                tf.io.gfile.rename(self.tmp_path, self.path, overwrite=False)
            self._closed = True
        return self.count

    def abort(self) -> None:
        """Drops the partial shard (the final name is never created)."""
        if not self._closed:
            self._writer.close()
            if self._staging is not None:
                self._staging.cleanup()  # nothing was uploaded
            elif tf.io.gfile.exists(self.tmp_path):
                tf.io.gfile.remove(self.tmp_path)
            self._closed = True

    def __enter__(self) -> CodesShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_is_complete(codes_dir: str, shard_name: str) -> bool:
    """True when `shard_name` was closed by a writer (resume skips it)."""
    return storage.exists(storage.join(codes_dir, shard_name))


def count_records(path: str) -> int:
    """Number of records in a TFRecord file (locally in C++; a URL's through storage)."""
    if storage.is_url(path):
        return len(tfrecords.record_offsets(storage.read_bytes(path), path)[0])
    ds = tf.data.TFRecordDataset(path)
    count = tf.autograph.experimental.do_not_convert(lambda n, _: n + 1)
    return int(ds.reduce(np.int64(0), count).numpy())


def finalize_codes_meta(
    codes_dir: str,
    *,
    codebook_size: int,
    grid: Sequence[int],
    codebook_hash: str,
    image_size: int,
    vqgan_checkpoint: str,
    vqgan_step: int,
    source_task: str,
    split: str,
    shard_pattern: str = "*.tfrecord",
) -> dict:
    """Gathers the complete shards of `codes_dir` and writes `codes_meta.json` last.

    Refuses while `.incomplete` files remain (an interrupted writer: resume it
    first), so a meta never describes a partial set.
    """
    leftovers = storage.glob(codes_dir, "*" + INCOMPLETE_SUFFIX)
    if leftovers:
        raise ValueError(
            f"{codes_dir}: {len(leftovers)} unfinished shard(s), e.g. {leftovers[0]}; "
            "resume precompute-codes to finish them (or delete them) before writing the meta"
        )
    paths = storage.glob(codes_dir, shard_pattern)
    if not paths:
        raise ValueError(f"{codes_dir}: no shards matching {shard_pattern!r}")
    shards = [{"path": storage.path(p).name, "count": count_records(p)} for p in paths]
    meta = {
        "format_version": FORMAT_VERSION,
        "codebook_size": int(codebook_size),
        "grid": [int(g) for g in grid],
        "codebook_hash": str(codebook_hash),
        "codes_dtype": codes_dtype_for(int(codebook_size)),
        "image_size": int(image_size),
        "vqgan_checkpoint": str(vqgan_checkpoint),
        "vqgan_step": int(vqgan_step),
        "source_task": str(source_task),
        "split": str(split),
        "num_examples": sum(s["count"] for s in shards),
        "shards": shards,
    }
    storage.write_json(storage.join(codes_dir, META_FILE), meta)
    return meta


# ------------------------------------------------------------------ meta
def load_codes_meta(codes_dir: str) -> dict:
    """Reads and checks `<codes_dir>/codes_meta.json` (or a meta file's path);
    `meta["_path"]` records where from."""
    path = codes_dir if codes_dir.endswith(".json") else storage.join(codes_dir, META_FILE)
    path = os.fspath(storage.path(path))
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path}: not found; the meta is written when precompute-codes finishes, so "
            "this folder is unfinished or not a codes folder"
        )
    try:
        meta = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; rerun precompute-codes")
    if len(meta["grid"]) != 2:
        raise ValueError(f"{path}: grid must be [h, w], got {meta['grid']}")
    for i, shard in enumerate(meta["shards"]):
        if not isinstance(shard, Mapping) or "path" not in shard or "count" not in shard:
            raise ValueError(f"{path}: shards[{i}] must be {{path, count}}, got {shard!r}")
    meta.setdefault("codes_dtype", codes_dtype_for(meta["codebook_size"]))
    meta["_path"] = path
    return meta


def validate_codes_meta(
    meta: Mapping,
    *,
    codebook_size: int | None = None,
    grid: Sequence[int] | None = None,
    codebook_hash: str | None = None,
) -> None:
    """Checks a codes meta against what a model / VQGAN expects; None skips a field.

    Raises:
      ValueError naming the meta file and, for each mismatch, both values.
    """
    where = meta.get("_path", META_FILE)
    problems = []
    if codebook_size is not None and int(meta["codebook_size"]) != int(codebook_size):
        problems.append(f"codebook_size {meta['codebook_size']} != expected {codebook_size}")
    if grid is not None and [int(g) for g in meta["grid"]] != [int(g) for g in grid]:
        problems.append(f"grid {list(meta['grid'])} != expected {list(grid)}")
    if codebook_hash is not None and str(meta["codebook_hash"]) != str(codebook_hash):
        problems.append(f"codebook_hash {meta['codebook_hash']} != expected {codebook_hash}")
    if problems:
        raise ValueError(
            f"{where}: codes do not match: {'; '.join(problems)}; recompute the codes with "
            "the VQGAN the model uses (parti-jax precompute-codes) or pick the matching codes"
        )


def shard_paths(meta: Mapping) -> list[str]:
    """Absolute shard paths listed in a loaded meta, in meta order."""
    base = os.fspath(storage.path(meta["_path"]).parent)
    return [storage.join(base, s["path"]) for s in meta["shards"]]


# ------------------------------------------------------------------ reading
@dataclasses.dataclass(frozen=True)
class CodesRecord:
    id: bytes
    text: str
    image_codes: np.ndarray  # int32 [h * w]


def read_codes(
    codes_dir: str,
    *,
    codebook_size: int | None = None,
    grid: Sequence[int] | None = None,
    codebook_hash: str | None = None,
) -> Iterator[CodesRecord]:
    """Python-side reader: every record, validated, with errors naming file and record."""
    meta = load_codes_meta(codes_dir)
    validate_codes_meta(meta, codebook_size=codebook_size, grid=grid, codebook_hash=codebook_hash)
    dtype = "<u2" if meta["codes_dtype"] == "uint16" else "<i4"
    num_codes = int(meta["grid"][0]) * int(meta["grid"][1])
    for path in shard_paths(meta):
        if not storage.exists(path):
            raise FileNotFoundError(f"{meta['_path']}: lists shard {path}, which is missing")
        if storage.is_url(path):
            raws = tfrecords.read_records(path)
        else:
            raws = tf.data.TFRecordDataset(path).as_numpy_iterator()
        for index, raw in enumerate(raws):
            where = f"{path}: record {index}"
            feature = tf.train.Example.FromString(raw).features.feature
            for key in RECORD_FEATURES:
                if key not in feature:
                    raise ValueError(f"{where}: missing feature {key!r}")
            value = {k: feature[k].bytes_list.value[0] for k in RECORD_FEATURES}
            codes = _check_codes(
                np.frombuffer(value["image_codes"], dtype=dtype),
                codebook_size=int(meta["codebook_size"]),
                num_codes=num_codes,
                where=where,
            )
            yield CodesRecord(value["id"], value["text"].decode("utf-8"), codes.astype(np.int32))


class CodesDataSource(features.HostShardedSource):
    """A seqio data source over codes folders: {id, text, image_codes int32 [h*w]}.

    `split_dirs` maps split names to codes folders that must agree on codebook
    size, grid and hash. Each record's codes are checked in the pipeline; a bad
    record fails with "<shard>: record <i>: image code c outside [0, K)".
    Host sharding: whole files when there are at least as many files as
    shards, else every num_shards-th example (so every host reads all files).
    Shards at URLs are read through storage, record by record (`_url_record`).
    """

    def __init__(
        self,
        split_dirs: Mapping[str, str],
        *,
        codebook_size: int | None = None,
        grid: Sequence[int] | None = None,
        codebook_hash: str | None = None,
        cycle_length: int = 4,
    ) -> None:
        self.metas = {split: load_codes_meta(d) for split, d in split_dirs.items()}
        first = next(iter(self.metas.values()))
        expected = dict(codebook_size=codebook_size, grid=grid, codebook_hash=codebook_hash)
        expected = {k: first[k] if v is None else v for k, v in expected.items()}
        for meta in self.metas.values():
            validate_codes_meta(meta, **expected)
        self.codebook_size = int(expected["codebook_size"])
        self.grid = [int(g) for g in expected["grid"]]
        self.codebook_hash = str(expected["codebook_hash"])
        self._cycle_length = cycle_length
        super().__init__(
            splits=list(self.metas),
            num_input_examples={s: int(m["num_examples"]) for s, m in self.metas.items()},
            caching_permitted=False,
        )

    def list_shards(self, split: str) -> Sequence[str]:
        return shard_paths(self.metas[split])

    def read(
        self, split: str, *, shuffle: bool, seed: int | None, shard_index: int, num_shards: int
    ) -> tf.data.Dataset:
        meta = self.metas[split]
        files = self.list_shards(split)
        counts = [int(s["count"]) for s in meta["shards"]]
        missing = _missing(files)
        if missing:
            raise FileNotFoundError(
                f"{meta['_path']}: lists {len(missing)} missing shard(s), e.g. {missing[0]}"
            )
        shard_examples = len(files) < num_shards  # else whole files
        if not shard_examples:
            files, counts = files[shard_index::num_shards], counts[shard_index::num_shards]
        ds = tf.data.Dataset.from_tensor_slices((files, np.asarray(counts, np.int64)))
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        parse = _make_parser(self.codebook_size, self.grid, meta["codes_dtype"])
        url = storage.is_url(meta["_path"])
        if url:
            tfrecords.SHARDS.forget(files)

        @tf.autograph.experimental.do_not_convert
        def read_file(path, count):
            if url:  # never a URL for TensorFlow: storage reads it, tf.data keeps the index

                def record(i):
                    raw = tf.numpy_function(_url_record, [path, i, count], tf.string)
                    return i, tf.reshape(raw, [])

                records = tf.data.Dataset.range(count).map(record)
            else:
                records = tf.data.TFRecordDataset(path).enumerate()
            return records.map(lambda i, raw: parse(path, i, raw))

        ds = ds.interleave(
            read_file,
            cycle_length=min(self._cycle_length, len(files)),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.shard(num_shards, shard_index) if shard_examples else ds


def _missing(files: Sequence[str]) -> list[str]:
    """The files that do not exist, found with one listing per folder (not one request
    per shard: an object store holds thousands)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for file in files:
        p = storage.path(file)
        folder = os.fspath(p.parent)
        if folder not in listings:
            listings[folder] = set(storage.listdir(folder))
        if p.name not in listings[folder]:
            missing.append(file)
    return missing


def _make_parser(codebook_size: int, grid: Sequence[int], codes_dtype: str):
    num_codes = int(grid[0]) * int(grid[1])
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in RECORD_FEATURES}
    out_type = tf.uint16 if codes_dtype == "uint16" else tf.int32

    @tf.autograph.experimental.do_not_convert
    def parse(path, index, raw):
        example = tf.io.parse_single_example(raw, spec)
        codes = tf.cast(tf.io.decode_raw(example["image_codes"], out_type), tf.int32)
        num = tf.size(codes)
        low = tf.reduce_min(tf.concat([codes, [0]], 0))
        high = tf.reduce_max(tf.concat([codes, [0]], 0))
        # format() would quote the path: join it as written
        where = tf.strings.join([path, ": record ", tf.strings.as_string(index), ": "])
        count_error = tf.strings.format("{} image codes, expected {}", [num, num_codes])
        range_error = tf.strings.format(
            "image code outside [0, {}) (min {}, max {}); these codes come from another VQGAN "
            "or the shard is corrupt",
            [codebook_size, low, high],
        )
        checks = [
            tf.debugging.Assert(tf.equal(num, num_codes), [where + count_error]),
            tf.debugging.Assert(
                tf.logical_and(low >= 0, high < codebook_size), [where + range_error]
            ),
        ]
        with tf.control_dependencies(checks):
            codes = tf.reshape(codes, [num_codes])
        return {"id": example["id"], "text": example["text"], "image_codes": codes}

    return parse


def check_codes_task(
    task: Any,
    *,
    codebook_size: int,
    grid: Sequence[int],
    codebook_hash: str | None,
    eval_split: str | None,
    vocab_sha256: str | None = None,
    vocab_where: str = "the model",
    vocab_fix: str = "train it with the codes task's vocabulary",
) -> dict:
    """Checks every codes_meta of a codes task or mixture (name or object) against a model.

    Also checks that each task has `eval_split` (None: not evaluated) and, with
    `vocab_sha256`, that its captions are tokenized by that SentencePiece model
    (`vocab_where` names whose it is in the error, `vocab_fix` the fix). Returns the first meta (empty
    when the sources carry none).
    """

    provider = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
    tasks = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
    first: dict = {}
    for t in tasks:
        for meta in getattr(t.source, "metas", {}).values():
            validate_codes_meta(
                meta, codebook_size=codebook_size, grid=grid, codebook_hash=codebook_hash
            )
            first = first or dict(meta)
        if eval_split is not None and eval_split not in t.splits:
            raise ValueError(
                f"task {t.name} has no {eval_split!r} split for evaluation (it has "
                f"{sorted(t.splits)}); set train.eval_split to one of them or train/LoopConfig.eval_every=None"
            )
        vocabulary = t.output_features["inputs"].vocabulary
        model = getattr(vocabulary, "sp_model", None)
        if vocab_sha256 and model is not None:
            found = hashlib.sha256(model).hexdigest()
            if found != vocab_sha256:
                raise ValueError(
                    f"{vocab_where} was trained with the vocabulary {vocab_sha256[:12]}…, but "
                    f"task {t.name} tokenizes captions with "
                    f"{getattr(vocabulary, 'sentencepiece_model_file', '?')} ({found[:12]}…); "
                    f"{vocab_fix}"
                )
    return first
