"""Multi-process start-up and the host -> data shard mapping.

`maybe_initialize_distributed` must run before anything touches a jax
backend: asking jax how many processes there are would start the backend,
after which `jax.distributed.initialize` fails. So the decision is taken from
flags and the launch environment only:

- explicit arguments, or PARTI_JAX_COORDINATOR / PARTI_JAX_NUM_PROCESSES /
  PARTI_JAX_PROCESS_ID (set by parti_jax's launchers), or JAX_COORDINATOR_ADDRESS
  with JAX_NUM_PROCESSES / JAX_PROCESS_ID;
- SLURM with more than one task, Open MPI (OMPI_MCA_orte_hnp_uri), multi-host
  Cloud TPU / GKE (TPU_WORKER_HOSTNAMES with several hosts, or
  MEGASCALE_COORDINATOR_ADDRESS): jax's own cluster detection fills in the
  arguments, so `initialize()` is called without them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from parti_jax import partitioning

log = logging.getLogger(__name__)


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError as e:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from e
    return None


def distributed_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict[str, Any] | None:
    """The arguments for `jax.distributed.initialize`, or None for a single process.

    Pure function of its arguments and `os.environ` (testable without jax).
    """
    env = os.environ
    coordinator_address = (
        coordinator_address
        or env.get("PARTI_JAX_COORDINATOR")
        or env.get("JAX_COORDINATOR_ADDRESS")
    )
    if num_processes is None:
        num_processes = _env_int("PARTI_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("PARTI_JAX_PROCESS_ID", "JAX_PROCESS_ID")
    if coordinator_address or num_processes is not None:
        if num_processes is not None and num_processes <= 1:
            return None
        missing = [
            n
            for n, v in (
                ("coordinator_address (PARTI_JAX_COORDINATOR)", coordinator_address),
                ("num_processes (PARTI_JAX_NUM_PROCESSES)", num_processes),
                ("process_id (PARTI_JAX_PROCESS_ID)", process_id),
            )
            if v is None
        ]
        if missing and not _auto_detectable():
            raise ValueError(
                "multi-process start-up needs coordinator address, process count and process "
                f"id; missing: {', '.join(missing)}"
            )
        return {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
        }
    return {} if _auto_detectable() else None


def _auto_detectable() -> bool:
    """Whether jax's own cluster detection applies to a multi-process launch."""
    env = os.environ
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return (
        # Set by `parti-jax launch tpu`: jax finds coordinator and process id in the TPU VM
        # metadata.
        env.get("PARTI_JAX_AUTO_DETECT") == "1"
        or ("SLURM_JOB_ID" in env and (_env_int("SLURM_NTASKS", "SLURM_NPROCS") or 1) > 1)
        or "OMPI_MCA_orte_hnp_uri" in env
        or len(hosts) > 1
        or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
    )


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when several processes are launched.

    Returns True when it initialised (or jax already was initialised). On CPU
    the cross-process collectives use gloo.
    """
    settings = distributed_settings(coordinator_address, num_processes, process_id)
    import jax

    if settings is not None and _client() is None:
        # Only affects the CPU backend (CPU runs and host-side collectives elsewhere).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {k: v for k, v in settings.items() if v is not None}
        log.info("jax.distributed.initialize(%s)", kwargs)
        jax.distributed.initialize(**kwargs)
        _watch_for_failures(_client())
    configure_for_backend()
    return settings is not None


def configure_for_backend() -> None:
    """Backend-specific jax settings, applied once the backend may start.

    On CPU, XLA compiles the partitionable threefry generator (jax's default)
    some 20x slower: the init of a tiny model took 81 s instead of 3.7 s. CPU
    runs (the demo, tests) therefore use the non-partitionable generator. On
    accelerators the default stays: it lets a sharded init of a large model
    generate each shard where it lives.
    """
    import jax

    if jax.default_backend() == "cpu":
        jax.config.update("jax_threefry_partitionable", False)


def barrier(name: str, timeout_s: float = 900.0) -> None:
    """Waits until every process reaches `name` (the coordination service, not a collective).

    Used after compiling a step in multi-process runs: CPU collectives (gloo)
    give up after 30 s when one process is still compiling while another
    already runs the step, which happens on loaded machines. A no-op when
    running as a single process.
    """
    if (client := _client()) is not None:
        client.wait_at_barrier(f"parti_jax/{name}", int(timeout_s * 1000))


# ------------------------------------------------------------- fail fast
# A process that fails in a multi-process run would otherwise wait in jax's
# shutdown for the others, while they wait in a collective for it: until a
# heartbeat or barrier timeout (minutes), or forever. Instead it writes its error
# under every other process's key in the coordination service's key-value store
# and exits; a watcher thread in each process, blocked reading its own key, ends
# that process too. All within seconds.
_STOP_KEY = "parti_jax/stop/{}"  # per process: the failure to stop for ("": a normal exit)
_STOP_BARRIER = "parti_jax/stop"
_STOP_WAIT_MS = 10_000  # how long the processes wait for each other before exiting
_stopping = threading.Lock()  # held by whichever path ends the process (or a normal exit)


def is_multiprocess() -> bool:
    """Whether this process is part of an initialised multi-process run."""
    return _client() is not None


def stop_all_processes(message: str, code: int) -> None:
    """Ends this failed process and every other process of the run, within seconds.

    Tells the others `message` (they print it and exit 1), then exits with
    `code` without jax's shutdown. Output is flushed first; no other cleanup
    runs (like a kill: checkpoints stay intact). Returns at once in a single
    process run.
    """
    client, state = _client(), _state()
    if client is None:
        return
    if not _stopping.acquire(blocking=False):  # the watcher is ending this process already
        threading.Event().wait()
    for i in range(state.num_processes):
        # A failure: raises for a process already told (another process failed too).
        with contextlib.suppress(Exception):
            if i != state.process_id:
                client.key_value_set(
                    _STOP_KEY.format(i), f"process {state.process_id} failed: {message}"
                )
    _exit_together(client, code)


def _watch_for_failures(client: Any) -> None:
    """Starts the thread that ends this process when another one reports a failure."""
    key = _STOP_KEY.format(_state().process_id)

    def watch() -> None:
        while True:
            try:
                message = client.blocking_key_value_get(key, 3_600_000)
            except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError
                if "DEADLINE_EXCEEDED" in str(e):
                    continue  # nothing reported within the hour
                message = f"lost the coordination service: {str(e).strip().splitlines()[0]}"
            if message and _stopping.acquire(blocking=False):  # not exiting already
                print(f"parti-jax: error: stopping: {message}", file=sys.stderr, flush=True)
                _exit_together(client, 1)
            return

    watcher = threading.Thread(target=watch, name="parti_jax_failure_watch", daemon=True)
    watcher.start()

    def normal_exit() -> None:
        # Before jax's shutdown (atexit runs last-registered first). The watcher must have
        # returned before Python finalizes: a thread coming back from jax's C++ then aborts
        # the process ("FATAL: exception not rethrown"). An empty message wakes it.
        _stopping.acquire()
        with contextlib.suppress(Exception):  # already woken by a failure, or no service
            client.key_value_set(key, "")
        watcher.join(timeout=30)

    atexit.register(normal_exit)


def _exit_together(client: Any, code: int) -> None:
    """Waits (bounded) until every process knows of the failure, then exits at once."""
    with contextlib.suppress(Exception):  # a process that cannot take part is ended anyway
        client.wait_at_barrier(_STOP_BARRIER, _STOP_WAIT_MS)
    if getattr(_state(), "service", None) is not None:
        time.sleep(0.5)  # this process hosts the coordination service: the others leave first
    from parti_jax import workdir  # a hard exit skips atexit: give the work dirs' locks up

    workdir.release_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _state() -> Any:
    """jax.distributed's state (None before jax is imported)."""
    return getattr(sys.modules.get("jax._src.distributed"), "global_state", None)


def _client() -> Any:
    """jax's coordination-service client (None before `jax.distributed.initialize`)."""
    return getattr(_state(), "client", None)


# ------------------------------------------------------------- data shards


def data_shard(mesh: Any) -> tuple[int, int, bool]:
    """(index, count, writer) of this process's data shard (`partitioning.host_data_shard`).

    `writer` marks the lowest-numbered process of the shard: it alone saves
    the shard's iterator position (processes that differ only along 'tensor'
    read the same shard and hold identical positions).
    """
    import jax

    processes = sorted({d.process_index for d in np.asarray(mesh.devices).flat})
    shards = {p: partitioning.host_data_shard(mesh, p) for p in processes}
    me = jax.process_index()
    index, count = shards[me]
    writer = me == min(p for p, s in shards.items() if s == (index, count))
    return index, count, writer
