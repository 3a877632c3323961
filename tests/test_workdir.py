"""Work directories: the writability probe, one writer per folder (the lease), and kinds.

The lease runs on tensorstore's kvstore: the `file` driver for local folders and, for
object stores, the same code on the `memory` driver, which honours the generation
conditions that GCS's `if_generation_match` gives (the GCS emulator ignores them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from parti_jax import workdir as W
from parti_jax.cli import flags
from parti_jax.workdir import check_workdir

_LOOP = (
    "import sys\n"
    "from parti_jax.workdir import check_workdir\n"
    "for _ in range(300):\n"
    "    check_workdir(sys.argv[1])\n"
)


def test_processes_checking_one_workdir_at_once_do_not_collide(tmp_path):
    # Regression: a shared probe name let one process delete the other's probe
    # ("not writable (No such file or directory)") when a launcher restarted both.
    workdir = tmp_path / "run"
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOOP, str(workdir)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert list(workdir.iterdir()) == []  # no probe files left behind


def test_unwritable_workdir_names_the_folder_and_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=r"a_file/run is not writable"):
        check_workdir(blocker / "run")
    with pytest.raises(flags.UsageError, match=r"a_file/run is not writable.*pass --workdir"):
        flags.check_workdir(blocker / "run")


# ------------------------------------------------------------------ the lease


@pytest.fixture(params=["file", "memory"])
def folder(request, tmp_path):
    """A local folder, or a memory:// URL (the object-store code path)."""
    path = str(tmp_path / "run") if request.param == "file" else f"memory://b/{uuid.uuid4().hex}"
    yield path
    W.release_workdir(path)


def read_lock(folder: str) -> dict | None:
    read = W._store(W.location(folder)).read(W.LOCK_FILE).result()
    return json.loads(read.value) if read.state == "value" else None


def write_lock(folder: str, **fields) -> None:
    record = {
        "kind": "train", "host": "other-host", "pid": 4242, "start": None,
        "path": W.location(folder), "since": time.time(), "heartbeat": time.time(),
        "timeout_s": 60.0, **fields,
    }  # fmt: skip
    W._store(W.location(folder)).write(W.LOCK_FILE, json.dumps(record)).result()


def contend(leases: list[W.Lease]) -> tuple[list[W.Lease], list[str]]:
    """Each lease acquired by its own thread at once: (winners, refusals)."""
    start = threading.Barrier(len(leases))
    won, refused = [], []

    def go(lease: W.Lease) -> None:
        start.wait()
        try:
            won.append(lease.acquire())
        except W.WorkdirError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_of_threads_contending_for_a_folder_exactly_one_wins(folder):
    if "://" not in folder:
        os.makedirs(folder)
    for _ in range(3):
        won, refused = contend([W.Lease(W.location(folder), "train") for _ in range(6)])
        assert len(won) == 1 and len(refused) == 5
        assert f"pid {os.getpid()}" in refused[0] and W.HOST in refused[0]
        assert read_lock(folder)["since"] == won[0].since
        won[0].release()
        assert read_lock(folder) is None


_CONTENDER = """
import sys
from parti_jax import workdir as W
print("ready", flush=True)
sys.stdin.readline()  # go
try:
    W.claim_workdir(sys.argv[1], "train")
    print("won", flush=True)
except W.WorkdirError as e:
    print("refused:", e, flush=True)
sys.stdin.readline()  # the winner holds until every contender has tried
"""


def contender(folder) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONTENDER, str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "ready\n"
    return proc


def tell(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()


def test_of_processes_contending_for_a_folder_exactly_one_wins(tmp_path):
    folder = tmp_path / "run"
    procs = [contender(folder) for _ in range(4)]
    tell(procs)  # all at once
    lines = sorted(p.stdout.readline().strip() for p in procs)
    tell(procs)
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    assert lines[-1] == "won" and all(x.startswith("refused:") for x in lines[:-1]), lines
    assert all("is being written by another `parti-jax train` run" in x for x in lines[:-1])
    assert sorted(os.listdir(folder)) == [W.KIND_FILE]  # the winner removed its lock at exit


def test_a_killed_holders_lock_is_taken_over_at_once_on_its_host(tmp_path):
    folder = tmp_path / "run"
    holder = contender(folder)
    tell([holder])
    assert holder.stdout.readline() == "won\n"
    with pytest.raises(W.WorkdirError, match=rf"pid {holder.pid}, since"):
        W.Lease(W.location(folder), "train").acquire()
    holder.send_signal(signal.SIGKILL)  # no atexit: the lock stays behind
    holder.wait()
    assert read_lock(folder)["pid"] == holder.pid
    try:
        W.claim_workdir(folder, "train")
        assert read_lock(folder)["pid"] == os.getpid()
    finally:
        W.release_workdir(folder)


@pytest.mark.parametrize("url", [False, True])
def test_a_lock_whose_heartbeat_expired_is_taken_over(tmp_path, url):
    folder = f"memory://bucket/{uuid.uuid4().hex}" if url else str(tmp_path / "run")
    if not url:
        os.makedirs(folder)
    write_lock(folder, heartbeat=time.time() - 30)  # another host, beating 30 s ago
    with pytest.raises(W.WorkdirError, match=r"host other-host, pid 4242, .*heartbeat 30s ago"):
        W.Lease(W.location(folder), "train").acquire()
    write_lock(folder, heartbeat=time.time() - 61)
    # Two contenders for the stale lease: the takeover is conditional, one wins.
    won, refused = contend([W.Lease(W.location(folder), "train") for _ in range(4)])
    assert len(won) == 1 and len(refused) == 3
    assert read_lock(folder)["pid"] == os.getpid()
    won[0].release()


def test_a_dead_pid_and_a_copied_lock_on_this_host_are_stale(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    # The same host name on another machine (or before a reboot): its pids mean nothing here.
    write_lock(folder, host=W.HOST, boot="another-boot", pid=int(gone.stdout))
    with pytest.raises(W.WorkdirError, match=rf"pid {int(gone.stdout)}"):
        W.Lease(W.location(folder), "train").acquire()
    write_lock(folder, host=W.HOST, boot=W.BOOT, pid=int(gone.stdout))
    W.Lease(W.location(folder), "train").acquire().release()
    # A live holder (this process) whose lock was copied along with its folder.
    me = {"host": W.HOST, "boot": W.BOOT, "pid": os.getpid(), "start": W._start_time(os.getpid())}
    write_lock(folder, **me)
    with pytest.raises(W.WorkdirError, match=rf"pid {os.getpid()}"):
        W.Lease(W.location(folder), "train").acquire()
    shutil.copytree(folder, tmp_path / "copy")
    W.Lease(W.location(tmp_path / "copy"), "train").acquire().release()


def test_claims_are_reentrant_within_a_process_and_refused_to_others(folder):
    W.claim_workdir(folder, "train")
    held = read_lock(folder)
    assert W.claim_workdir(folder, "train")  # again: a resumed run, the next stage
    assert read_lock(folder)["since"] == held["since"]
    assert held["pid"] == os.getpid() and held["kind"] == "train"
    with pytest.raises(W.WorkdirError, match="being written by another `parti-jax train` run"):
        W.Lease(W.location(folder), "train").acquire()
    W.release_workdir(folder)
    assert read_lock(folder) is None
    assert W.workdir_kind(folder) == ("train", W.KIND_FILE)  # the kind stays


def test_the_heartbeat_keeps_a_lease_and_notices_a_lost_one(folder):
    W.claim_workdir(folder, "train", timeout_s=0.6)  # beats every 0.1 s
    first = read_lock(folder)["heartbeat"]
    time.sleep(1.0)
    assert read_lock(folder)["heartbeat"] > first
    with pytest.raises(W.WorkdirError):  # older than its timeout, were it not for the beats
        W.Lease(W.location(folder), "train").acquire()
    write_lock(folder, heartbeat=0.0)  # someone took the folder over: the lease is lost
    time.sleep(0.5)
    assert W.location(folder) not in W._HELD
    assert read_lock(folder)["host"] == "other-host"  # their lock is left alone


def test_a_moved_folder_is_not_created_again_by_the_heartbeat(tmp_path):
    folder = tmp_path / "run"
    W.claim_workdir(folder, "train", timeout_s=0.6)
    folder.rename(tmp_path / "moved")
    time.sleep(0.5)
    assert not folder.exists() and W.location(folder) not in W._HELD


# ------------------------------------------------------------------ kinds


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: (contents, mtime in ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("file", "kind"),
    [("vqgan_meta.json", "train-vqgan"), ("model_config.json", "train"),
     ("manifest.json", "sample"), ("bundle.json", "export"), ("demo.json", "demo")],
)  # fmt: skip
def test_a_folder_from_before_kinds_is_known_by_its_files(tmp_path, file, kind):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / file).write_text("{}")
    (folder / "config.gin").write_text("# that run's config\n")
    before = snapshot(folder)
    other = "eval"
    with pytest.raises(
        W.WorkdirError, match=rf"is a `parti-jax {kind}` work directory \({file}\); "
        rf"`parti-jax {other}` does not write into another kind's folder: pass a new or empty"
    ):  # fmt: skip
        W.claim_workdir(folder, other)
    assert snapshot(folder) == before  # nothing written, not even a lock
    W.claim_workdir(folder, kind)  # its own kind resumes it, and marks it
    W.release_workdir(folder)
    assert W.workdir_kind(folder) == (kind, W.KIND_FILE)


def test_a_marked_folder_refuses_another_kind_on_an_object_store():
    folder = f"memory://bucket/{uuid.uuid4().hex}"
    W.claim_workdir(folder, "train-vqgan")
    W.release_workdir(folder)
    with pytest.raises(W.WorkdirError, match=r"`parti-jax train-vqgan` work directory"):
        W.claim_workdir(folder, "train")
    assert read_lock(folder) is None


def test_an_unreadable_kind_file_names_itself(tmp_path):
    (tmp_path / W.KIND_FILE).write_text("{not json")
    with pytest.raises(W.WorkdirError, match=rf"{W.KIND_FILE}: unreadable .* write \{{\"kind\""):
        W.claim_workdir(tmp_path, "train")
