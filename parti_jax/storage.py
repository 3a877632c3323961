"""The one storage layer: every file parti_jax writes or reads goes through here.

A location is a local path (`~` expanded, made absolute) or a URL of a scheme epath
reaches through fsspec (`gs://bucket/run`; `s3://`, `az://`, `hf://` with their fsspec
packages). Both are `etils.epath.Path`s; URLs keep their scheme (`pathlib.Path` would
collapse `gs://b/x` to `gs:/b/x`). Another scheme is a one-line error.

- **One client per scheme.** epath would use TensorFlow's GCS client when TensorFlow is
  importable; that client cannot be pointed at an emulator, so the tested path and the
  production path would differ. parti_jax (its `__init__`) sets `EPATH_USE_TF=false` before epath picks
  a backend: `gs://` always goes through fsspec/gcsfs, which honours
  `STORAGE_EMULATOR_HOST`. Arrays go through orbax/TensorStore, which reads
  `TENSORSTORE_GCS_HTTP_URL`. TensorFlow's own file system is used for local paths only.
- **Atomic writes** (`write_bytes`, `write_text`, `write_json`): on a local disk a
  temporary file in the same folder, then `os.replace`; on an object store one object
  written in one request (never a rename there: that is a copy plus a delete, and a
  reader could see neither or both).
- **No appends on object stores.** `Appender` keeps a log (metrics.jsonl) appended line by
  line on a local disk; on an object store it rewrites the whole object on `flush()`.
- **Writers that only know local files** (tf.train.Checkpoint, TFRecordWriter,
  TensorBoard) write into `staged(dst)`, a local temporary folder uploaded to `dst` when
  the block ends; `fetched(src)` is the reverse for readers. `kind="prefix"` stages the
  files `<dst>` and `<dst>.*` that a writer names by a prefix (tf.train.Checkpoint's `write(prefix)`).
- **No stale listings.** gcsfs caches folder listings per process; TensorStore (orbax's
  arrays) and other processes write behind its back, so that cache is off
  (`use_listings_cache=False`, unless the fsspec config says otherwise).
- **Copies stream**: within one store the store copies (`rewriteTo` on GCS), between
  stores a file is uploaded or downloaded in chunks, never held whole in memory.

No jax, no TensorFlow: this is the bottom layer, importable from `data/`.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

# EPATH_USE_TF=false and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false are set by parti_jax/__init__.py,
# which runs before this module and before anything else of parti_jax can reach epath.
import fsspec.config
import fsspec.core
from etils import epath

fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

Path = epath.Path
PathLike = str | os.PathLike


def is_url(location: PathLike) -> bool:
    """Whether `location` names an object in a store (has a scheme) rather than a local path."""
    return "://" in os.fspath(location)


SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes epath reaches


def reaches(location: PathLike) -> bool:
    """Whether this module reaches `location` (a local path or a URL of SCHEMES)."""
    text = os.fspath(location)
    return not is_url(text) or text.partition("://")[0] in SCHEMES


def path(location: PathLike) -> epath.Path:
    """The `epath.Path` of a location: URLs as given (without a final '/'), local paths
    with `~` expanded and made absolute."""
    text = os.fspath(location)
    if not reaches(text):
        schemes = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"{text}: not a local path or a URL of {schemes}")
    if is_url(text):
        return epath.Path(text.rstrip("/") if not text.endswith("://") else text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(location: PathLike, *parts: str) -> str:
    """`location/part/...` as a string (URLs keep their scheme)."""
    return os.fspath(path(location).joinpath(*parts))


def exists(location: PathLike) -> bool:
    return path(location).exists()


def isdir(location: PathLike) -> bool:
    return path(location).is_dir()


def makedirs(location: PathLike) -> str:
    """Creates a folder and its parents (on object stores folders are implicit: no-op)."""
    p = path(location)
    if not is_url(location):
        p.mkdir(parents=True, exist_ok=True)
    return os.fspath(p)


def listdir(location: PathLike) -> list[str]:
    """Sorted names in a folder ([] when it does not exist)."""
    p = path(location)
    if not p.exists():
        return []
    return sorted(c.name for c in p.iterdir())


def glob(location: PathLike, pattern: str) -> list[str]:
    """Sorted full paths of the entries of `location` whose names match `pattern` (one level)."""
    return [join(location, n) for n in listdir(location) if fnmatch.fnmatchcase(n, pattern)]


def remove(location: PathLike, *, missing_ok: bool = True) -> None:
    """Removes one file."""
    p = path(location)
    if missing_ok and not p.exists():
        return
    if is_url(location):
        fs, remote = _fs(location)
        fs.rm_file(remote)  # fs.rm would read '[' or '*' in a name as a pattern
    else:
        p.unlink()


def rmtree(location: PathLike) -> None:
    """Removes a folder and everything in it (nothing when it does not exist)."""
    p = path(location)
    if not p.exists():
        return
    if is_url(location):
        fs, remote = _fs(location)
        for file in fs.find(remote):  # one by one: fs.rm would expand patterns in the names
            fs.rm_file(file)
    else:
        p.rmtree()


def open(location: PathLike, mode: str = "r", **kwargs: Any):  # noqa: A001
    """A file object; on object stores a written file becomes one object at `close()`."""
    p = path(location)
    if "w" in mode or "a" in mode or "x" in mode:
        if "a" in mode and is_url(location):
            raise ValueError(f"{location}: object stores cannot append; use storage.Appender")
        makedirs(p.parent)
    return p.open(mode, **kwargs)


def read_bytes(location: PathLike) -> bytes:
    return path(location).read_bytes()


def read_text(location: PathLike, encoding: str = "utf-8") -> str:
    return path(location).read_text(encoding=encoding)


def read_json(location: PathLike) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: PathLike, data: bytes) -> str:
    """Writes `data` so that a reader sees the old content or the new, never a part."""
    p = path(location)
    if is_url(location):
        p.write_bytes(data)  # one object, one request
        return os.fspath(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(p.parent), prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return os.fspath(p)


def write_text(location: PathLike, text: str, encoding: str = "utf-8") -> str:
    return write_bytes(location, text.encode(encoding))


def write_json(location: PathLike, obj: Any, **kwargs: Any) -> str:
    kwargs.setdefault("indent", 2)
    return write_text(location, json.dumps(obj, **kwargs) + "\n")


def _fs(location: PathLike) -> tuple[Any, str]:
    """(fsspec file system, path inside it) of a URL."""
    return fsspec.core.url_to_fs(os.fspath(path(location)))


def copy(src: PathLike, dst: PathLike) -> None:
    """Copies one file between any two locations (streamed; the store copies within one
    store); a reader of `dst` sees the old content or the new."""
    if not is_url(dst):
        target = path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.")
        os.close(fd)
        try:
            if is_url(src):
                fs, remote = _fs(src)
                fs.get_file(remote, tmp)
            else:
                shutil.copyfile(os.fspath(path(src)), tmp)
            os.replace(tmp, os.fspath(target))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, remote = _fs(dst)
    if not is_url(src):
        fs.put_file(os.fspath(path(src)), remote)  # one object, when the upload completes
        return
    src_fs, src_remote = _fs(src)
    if type(src_fs) is type(fs):
        fs.cp_file(src_remote, remote)  # the store copies; fs.copy would expand patterns
        return
    with tempfile.TemporaryDirectory(prefix="parti_jax_copy_") as tmp:
        local = os.path.join(tmp, path(src).name)
        src_fs.get_file(src_remote, local)
        fs.put_file(local, remote)


def copytree(src: PathLike, dst: PathLike) -> None:
    """Copies a folder's files, recursively, between any two locations."""
    s = path(src)
    for child in s.iterdir():
        target = join(dst, child.name)
        if child.is_dir():
            copytree(child, target)
        else:
            copy(child, target)


def move(src: PathLike, dst: PathLike) -> None:
    """Moves a file or folder: a rename on a local disk; on object stores (no rename there)
    a copy of every file, then the originals removed, so `src` or `dst` is whole at
    any moment (both for a while)."""
    if not is_url(src) and not is_url(dst):
        makedirs(path(dst).parent)
        os.rename(os.fspath(path(src)), os.fspath(path(dst)))
        return
    if isdir(src):
        copytree(src, dst)
        rmtree(src)
    else:
        copy(src, dst)
        remove(src)


class Appender:
    """A text log appended line by line: a line-buffered file on a local disk; on an object
    store the lines are kept and the whole object is rewritten on `flush()` / `close()`."""

    def __init__(self, location: PathLike) -> None:
        self.location = os.fspath(path(location))
        self._url = is_url(location)
        self._lines: list[str] = []
        self._dirty = False
        if self._url:
            if exists(self.location):
                self._lines = [read_text(self.location)]
            self._file = None
        else:
            makedirs(os.path.dirname(self.location))
            self._file = builtins.open(self.location, "a", buffering=1)  # noqa: SIM115

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
        else:
            self._lines.append(text)
            self._dirty = True

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            content = "".join(self._lines)
            self._lines = [content]
            write_text(self.location, content)
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


Kind = Literal["dir", "file", "prefix"]


@contextlib.contextmanager
def staged(dst: PathLike, kind: Kind = "dir") -> Iterator[str]:
    """A local path to write `dst` through: `dst` itself on a local disk; for a URL a
    temporary folder (or a file in one) uploaded to `dst` when the block ends without error.

    `kind="prefix"`: the writer names its files `<path>` and `<path>.*` (tf.train.Checkpoint's
    `write(prefix)`); every file it writes goes next to `dst`, by its name.
    """
    if not is_url(dst):
        makedirs(dst if kind == "dir" else path(dst).parent)
        yield os.fspath(path(dst))
        return
    with tempfile.TemporaryDirectory(prefix="parti_jax_stage_") as tmp:
        local = tmp if kind == "dir" else os.path.join(tmp, path(dst).name)
        yield local
        if kind == "dir":
            copytree(local, dst)
        elif kind == "file":
            copy(local, dst)
        else:
            copytree(tmp, path(dst).parent)


@contextlib.contextmanager
def fetched(src: PathLike, kind: Kind = "dir") -> Iterator[str]:
    """A local path to read `src` from: `src` itself on a local disk; for a URL a temporary
    copy, removed when the block ends (`kind="prefix"`: the files `<src>` and `<src>.*`)."""
    if not is_url(src):
        yield os.fspath(path(src))
        return
    with tempfile.TemporaryDirectory(prefix="parti_jax_fetch_") as tmp:
        local = os.path.join(tmp, path(src).name)
        if kind == "dir":
            copytree(src, local)
        elif kind == "file":
            copy(src, local)
        else:
            parent, name = path(src).parent, path(src).name
            for entry in parent.iterdir() if parent.exists() else ():
                if (entry.name == name or entry.name.startswith(f"{name}.")) and not entry.is_dir():
                    copy(entry, os.path.join(tmp, entry.name))
        yield local


def local_only(location: PathLike, what: str) -> str:
    """`location` as a local path, or a one-line error naming `what` for a URL."""
    if is_url(location):
        raise ValueError(f"{what}={os.fspath(location)!r}: must be a local path here")
    return os.fspath(path(location))


__all__ = [
    "Appender", "Path", "copy", "copytree", "exists", "fetched", "glob", "is_url", "isdir",
    "join", "listdir", "makedirs", "move", "open", "path", "reaches", "read_bytes", "read_json",
    "read_text", "remove", "rmtree", "staged", "write_bytes", "write_json", "write_text",
]  # fmt: skip
