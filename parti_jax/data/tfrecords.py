"""TFRecord files read through parti_jax/storage.py: the framing split in Python.

TensorFlow's file system is never given a URL (parti_jax/storage.py), so a TFRecord
file at `gs://...` is read into memory through storage and split here:

    uint64 length, uint32 masked crc32c(length), data[length], uint32 masked crc32c(data)

(little-endian), checking both crcs as TensorFlow's reader does when google-crc32c's C
implementation is importable (it is installed with gcsfs; else a one-time warning).
`SHARDS` keeps the last files read, for the record-by-record reads of a tf.data
pipeline (parti_jax.data.codes). No TensorFlow.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from collections.abc import Sequence

import numpy as np

from parti_jax import storage

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<QI")
_FOOTER = 4
_MASK_DELTA = 0xA282EAD8
_crc_warned = False


def _crc32c_fn():
    """google-crc32c's C implementation (installed with gcsfs), else None (crcs unchecked:
    the pure-Python fallback would take seconds a shard)."""
    global _crc_warned
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    if google_crc32c is not None and google_crc32c.implementation == "c":
        return google_crc32c.value
    if not _crc_warned:
        _crc_warned = True
        log.warning(
            "google-crc32c (C) is not available: TFRecord crcs of shards read from URLs are "
            "not checked (pip install google-crc32c)"
        )
    return None


def masked_crc32c(data: bytes | memoryview, crc32c=None) -> int:
    """The TFRecord checksum of `data`: crc32c rotated right by 15 bits plus a constant."""
    crc32c = crc32c or _crc32c_fn()
    if crc32c is None:
        raise RuntimeError("masked_crc32c needs google-crc32c's C implementation")
    crc = crc32c(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def record_offsets(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) int64 of the records' payloads in a TFRecord file's bytes.

    A record cut short raises a one-line ValueError naming `where` (the shard) and
    the record; with google-crc32c a flipped bit (a crc that does not match) too.
    """
    crc32c = _crc32c_fn()
    view = memoryview(data)
    starts, lengths = [], []
    pos, index, size = 0, 0, len(data)
    while pos < size:
        if pos + _HEADER.size > size:
            raise ValueError(
                f"{where}: record {index} is truncated (the file ends inside its header, at "
                f"byte {size}); the shard is damaged: write it again (precompute-codes)"
            )
        length, length_crc = _HEADER.unpack_from(view, pos)
        if crc32c is not None and masked_crc32c(view[pos : pos + 8], crc32c) != length_crc:
            raise ValueError(
                f"{where}: record {index} at byte {pos}: corrupt length (crc mismatch); the "
                "shard is damaged: write it again (precompute-codes)"
            )
        begin = pos + _HEADER.size
        end = begin + length
        if end + _FOOTER > size:
            raise ValueError(
                f"{where}: record {index} is truncated ({length} bytes from byte {begin}, the "
                f"file ends at byte {size}); the shard is damaged: write it again "
                "(precompute-codes)"
            )
        if crc32c is not None:
            (data_crc,) = struct.unpack_from("<I", view, end)
            if masked_crc32c(view[begin:end], crc32c) != data_crc:
                raise ValueError(
                    f"{where}: record {index} at byte {pos}: corrupt data (crc mismatch); the "
                    "shard is damaged: write it again (precompute-codes)"
                )
        starts.append(begin)
        lengths.append(length)
        pos, index = end + _FOOTER, index + 1
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


def read_records(path: str) -> list[bytes]:
    """Every record of a TFRecord file at a URL or local path, read through storage."""
    data = storage.read_bytes(path)
    starts, lengths = record_offsets(data, path)
    return [data[b : b + n] for b, n in zip(starts.tolist(), lengths.tolist())]


class ShardCache:
    """The last few shards read from URLs (bytes and record offsets), shared by the
    tf.data threads; a shard evicted is read again (slower, never wrong)."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._shards: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, path: str) -> tuple[bytes, np.ndarray, np.ndarray]:
        with self._lock:
            if path in self._shards:
                self._shards.move_to_end(path)
                return self._shards[path]
            loading = self._loading.setdefault(path, threading.Lock())
        with loading:  # one download per shard, whatever the number of threads asking
            with self._lock:
                if path in self._shards:
                    return self._shards[path]
            data = storage.read_bytes(path)
            entry = (data, *record_offsets(data, path))
            with self._lock:
                self._shards[path] = entry
                while len(self._shards) > self.capacity:
                    self._shards.popitem(last=False)
                self._loading.pop(path, None)
        return entry

    def forget(self, paths: Sequence[str]) -> None:
        """Drops these shards (a new dataset reads them afresh: they may have been rewritten)."""
        with self._lock:
            for path in paths:
                self._shards.pop(path, None)


SHARDS = ShardCache()  # the process's, shared by every codes dataset
