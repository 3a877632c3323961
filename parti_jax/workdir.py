"""Work directories: the writability check, which kind of run a folder belongs to, and one
writer per folder (no jax import).

`claim_workdir(workdir, kind)` is how a run starts writing into a folder:

- **Its kind.** `parti_jax_workdir.json` ({"kind": "train", "created": ...}) names the
  subcommand that owns the folder; a folder from before that file is recognised by the
  files its kind writes (`LEGACY_FILES`). Another kind's folder is refused, naming both
  kinds, before anything is written.
- **One writer.** `parti_jax.lock` holds a lease (kind, host, pid, since, heartbeat). It is
  created only if absent, refreshed by a daemon thread every `timeout_s / 6` seconds and
  removed at exit, each a conditional write on the storage generation this process holds:
  tensorstore's kvstore, with the `file` driver on local disks (it honours the condition
  between processes) and `gcs` / `s3` / `memory` for URLs (on GCS an
  `if_generation_match` precondition). A second writer is refused, naming the holder.
  A lease is stale when its holder ran on this machine (host name and boot) and is gone
  or held another folder (a copy), or when its heartbeat is older than its timeout
  (`PARTI_JAX_LEASE_TIMEOUT_S`, default 60 s). A stale lease is replaced by a write
  conditional on the generation that was read, so of several contenders exactly one wins.
- **Re-entrant.** A process claiming a folder it holds gets it again (tests and the demo
  run several trainers in one process). In a multi-process run only process 0 claims
  (`primary`); the others check the kind.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from parti_jax import storage

log = logging.getLogger(__name__)

LOCK_FILE = "parti_jax.lock"
KIND_FILE = "parti_jax_workdir.json"
# The files each kind writes, which name the kind of a folder without KIND_FILE (first match).
LEGACY_FILES = (
    ("bundle.json", "export"),  # a bundle also holds model_config.json
    ("demo.json", "demo"),
    ("vqgan_meta.json", "train-vqgan"),
    ("upsampler_meta.json", "train-upsampler"),
    ("contrastive_meta.json", "train-contrastive"),
    ("model_config.json", "train"),
    ("manifest.json", "sample"),
    ("codes_meta.json", "precompute-codes"),
    ("precompute.json", "precompute-codes"),
    ("metrics.json", "eval"),
)
DEFAULT_TIMEOUT_S = 60.0
HOST = socket.gethostname()
try:  # with the host name, tells this machine since its boot (a pid means nothing elsewhere)
    BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
except OSError:
    BOOT = None


class WorkdirError(PermissionError):
    """A folder of another kind, or one another run writes (the message names the fix)."""


def check_workdir(
    workdir: str | os.PathLike, *, fix: str = "pass a folder you can write to"
) -> storage.Path:
    """Creates `workdir` and fails at start (not after hours) if it is not writable.

    A URL (gs://bucket/run) stays a URL: nothing local is created; the probe is an object
    written and removed through the kvstore that holds the lock (TensorStore). A URL that
    only TensorStore reaches (memory://, the lease's tests) comes back as its string.
    `fix` ends the error message (the CLI names its flag). Every process of a
    multi-process run calls this at once on the same folder, so each writes and removes
    its own probe file (host name and pid in its name).
    """
    probe = f".write_probe_{HOST}_{os.getpid()}"
    if _is_url(workdir):
        where = location(workdir)
        try:
            store = _store(where)
            store.write(probe, b"ok").result()
            store.write(probe, None).result()
        except Exception as e:  # noqa: BLE001 - the store's client: credentials, bucket
            raise PermissionError(
                f"work directory {where} is not writable ({_first_line(e)}); {fix}"
            ) from e
        return storage.path(where) if storage.reaches(where) else where
    path = storage.path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / probe).write_text("ok")
        (path / probe).unlink()
    except OSError as e:
        raise PermissionError(
            f"work directory {path} is not writable ({e.strerror or e}); {fix}"
        ) from e
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_primary() -> bool:
    """Whether this is process 0; jax is consulted only if loaded (not ready: one process)."""
    try:
        return sys.modules["jax"].process_index() == 0
    except Exception:  # no jax, or a backend that does not start
        return True


def claim_workdir(
    workdir: str | os.PathLike,
    kind: str,
    *,
    primary: bool | None = None,
    timeout_s: float | None = None,
    fix: str = "pass a folder you can write to",
) -> storage.Path:
    """`check_workdir`, after refusing another kind's folder; then, on process 0 (`primary`,
    default `is_primary()`), the lock and the kind marker. Raises `WorkdirError`."""
    where = location(workdir)
    _check_kind(where, kind)  # read-only: before anything is written
    path = check_workdir(workdir, fix=fix)
    if not (is_primary() if primary is None else primary):
        return path
    with _GUARD:
        if where in _HELD:
            return path
        lease = Lease(where, kind, lease_timeout() if timeout_s is None else timeout_s).acquire()
        try:
            if _check_kind(where, kind) != KIND_FILE:  # another kind may have come and gone
                created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                record = {"kind": kind, "created": created, "host": HOST}
                _store(where).write(KIND_FILE, json.dumps(record, indent=2) + "\n").result()
        except BaseException:
            lease.release()
            raise
        _HELD[where] = lease
        _WAKE.set()  # the heartbeat's period follows the shortest timeout held
        if not _HEARTBEAT:  # one thread beats for every lease; the leases go at exit
            _HEARTBEAT.append(threading.Thread(target=_heartbeat, name="lease", daemon=True))
            _HEARTBEAT[0].start()
            atexit.register(release_all)
    return path


def release_workdir(workdir: str | os.PathLike) -> None:
    """Gives up this process's lock on `workdir` (if held); the kind marker stays."""
    with _GUARD:
        lease = _HELD.pop(location(workdir), None)
        if lease is not None:
            lease.release()


def release_all() -> None:
    """Gives up every lock this process holds (at exit)."""
    with _GUARD:
        for lease in _HELD.values():
            try:
                lease.release()
            except Exception as e:  # exiting anyway: a lease left behind goes stale
                log.warning("could not remove the lock %s/%s: %s", lease.location, LOCK_FILE, e)
        _HELD.clear()


def workdir_kind(workdir: str | os.PathLike) -> tuple[str | None, str]:
    """(kind, the file that says so) of a folder; (None, '') for a new or unknown one."""
    where = location(workdir)
    store = _store(where)
    files = [KIND_FILE, *(f for f, _ in LEGACY_FILES)]
    found = [r.result() for r in [store.read(f) for f in files]]  # the reads run at once
    if found[0].state == "value":
        try:
            kind = json.loads(found[0].value)["kind"]
            if not isinstance(kind, str):
                raise TypeError(kind)
        except (ValueError, KeyError, TypeError) as e:
            raise WorkdirError(
                f"{where}/{KIND_FILE}: unreadable ({type(e).__name__}: {e}); write "
                '{"kind": "<the subcommand that made this folder>"} into it'
            ) from None
        return kind, KIND_FILE
    return next(
        ((kind, file) for (file, kind), r in zip(LEGACY_FILES, found[1:]) if r.state == "value"),
        (None, ""),
    )


def _check_kind(where: str, kind: str) -> str:
    """The file naming the folder's kind ('' for a new folder); another kind: WorkdirError."""
    found, file = workdir_kind(where)
    if found not in (None, kind):
        raise WorkdirError(
            f"{where} is a `parti-jax {found}` work directory ({file}); `parti-jax {kind}` "
            "does not write into another kind's folder: pass a new or empty one"
        )
    return file


def lease_timeout() -> float:
    """Seconds after its last heartbeat that a lease goes stale (PARTI_JAX_LEASE_TIMEOUT_S)."""
    value = os.environ.get("PARTI_JAX_LEASE_TIMEOUT_S", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"PARTI_JAX_LEASE_TIMEOUT_S={value!r}: not a number of seconds") from None


def location(workdir: str | os.PathLike) -> str:
    """A lock's identity: the folder's real absolute path, or its URL without a final '/'."""
    text = os.fspath(workdir)
    return text.rstrip("/") if _is_url(text) else os.path.realpath(os.path.expanduser(text))


def _is_url(workdir: str | os.PathLike) -> bool:
    return storage.is_url(workdir)


@functools.cache
def _context() -> Any:
    import tensorstore as ts

    return ts.Context()  # one per process: memory:// stores are shared within it


def _store(where: str) -> Any:
    import tensorstore as ts

    spec = where + "/" if _is_url(where) else {"driver": "file", "path": where + "/"}
    return ts.KvStore.open(spec, context=_context()).result()


# ------------------------------------------------------------------ the lease


def _start_time(pid: int) -> str | None:
    """A process's start time from /proc (None: gone, a zombie, or no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: Any, start: Any) -> bool:
    """Whether process `pid` of this host, started at `start`, still runs (pids are reused)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.path.isdir("/proc/self"):
        now = _start_time(pid)
        return now is not None and start in (None, now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


@dataclasses.dataclass
class Lease:
    """A lease on a folder's LOCK_FILE; `acquire` it, then `refresh` and `release` it."""

    location: str
    kind: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    generation: bytes = b""  # the storage generation of the record this process wrote
    since: float = 0.0

    def record(self) -> bytes:
        return json.dumps({
            "kind": self.kind, "host": HOST, "boot": BOOT, "pid": os.getpid(),
            "start": _start_time(os.getpid()), "path": self.location, "since": self.since,
            "heartbeat": time.time(), "timeout_s": self.timeout_s,
        }).encode()  # fmt: skip

    def acquire(self) -> Lease:
        """Creates the lease, or takes over a stale one; a live holder: WorkdirError."""
        store = _store(self.location)
        for _ in range(5):  # a read, then a write on what was read; a loser reads the winner
            read = store.read(LOCK_FILE).result()
            if read.state == "value" and not self._stale(holder := _parse(read.value)):
                raise WorkdirError(self._refusal(holder))
            if read.state == "value":
                log.warning("%s: taking over the stale lock of %s", self.location, holder)
            self.since = time.time()
            written = store.write(LOCK_FILE, self.record(), if_equal=read.stamp.generation)
            if generation := written.result().generation:
                self.generation = generation
                return self
        raise WorkdirError(f"{self.location}: the lock keeps changing hands; try again")

    def refresh(self) -> bool:
        """Writes a new heartbeat if the lease is still this process's (False: it is lost)."""
        written = _store(self.location).write(LOCK_FILE, self.record(), if_equal=self.generation)
        self.generation = written.result().generation
        return bool(self.generation)

    def release(self) -> None:
        """Removes the lease if it is still this process's."""
        if self.generation and self.folder_exists():
            _store(self.location).write(LOCK_FILE, None, if_equal=self.generation).result()
        self.generation = b""

    def folder_exists(self) -> bool:  # a write would create a removed folder again
        return _is_url(self.location) or os.path.isdir(self.location)

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: it names no one
            return True
        if (holder.get("host"), holder.get("boot")) == (HOST, BOOT) and (
            holder.get("path") != self.location
            or not _alive(holder.get("pid"), holder.get("start"))
        ):
            return True
        age = time.time() - _number(holder.get("heartbeat"))
        return age > _number(holder.get("timeout_s"), self.timeout_s)

    def _refusal(self, holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_number(holder.get("since"))))
        age = time.time() - _number(holder.get("heartbeat"))
        timeout = _number(holder.get("timeout_s"), self.timeout_s)
        return (
            f"{self.location} is being written by another `parti-jax {holder.get('kind')}` "
            f"run (host {holder.get('host')}, pid {holder.get('pid')}, since {since}, last "
            f"heartbeat {age:.0f}s ago; lock {LOCK_FILE}): wait for it to end or stop it, or "
            f"pass another folder (a dead run's lock is taken over at once on its host, "
            f"else {timeout:.0f}s after its last heartbeat)"
        )


def _parse(value: bytes) -> dict | None:
    try:
        holder = json.loads(value)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _number(value: Any, default: float = 0.0) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else default


_GUARD = threading.RLock()
_HELD: dict[str, Lease] = {}  # location -> this process's lease on it
_HEARTBEAT: list[threading.Thread] = []
_WAKE = threading.Event()


def _heartbeat() -> None:
    """Refreshes every held lease; a lost one is dropped with a warning."""
    while True:
        with _GUARD:
            timeouts = [lease.timeout_s for lease in _HELD.values()]
        _WAKE.wait(max(0.05, min(timeouts, default=DEFAULT_TIMEOUT_S) / 6))
        _WAKE.clear()
        with _GUARD:
            for where, lease in list(_HELD.items()):
                try:
                    if not lease.folder_exists():  # removed: never create it again
                        del _HELD[where]
                    elif not lease.refresh():
                        del _HELD[where]
                        log.warning("%s: this process lost its lock %s", where, LOCK_FILE)
                except Exception as e:  # e.g. the network: try again at the next beat
                    log.warning("%s: could not refresh the lock %s: %s", where, LOCK_FILE, e)
