"""N processes on this machine with CPU devices: multi-host behaviour without a cluster.

Each process gets JAX_PLATFORMS=cpu, `--xla_force_host_platform_device_count`
devices, and the PARTI_JAX_* variables with a coordinator on 127.0.0.1 at a free
port. Their output goes to `<log_dir>/process_<i>.log` (and, prefixed with
`[i]`, to an optional echo stream). JAX cannot replace one lost process, so
when any process exits non-zero the launcher stops all of them (SIGTERM to each
process group, then SIGKILL after `term_timeout_s`) and starts all of them
again, up to `max_restarts` times; the run resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from parti_jax.launch import common
from parti_jax.launch.common import LaunchError

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclasses.dataclass(frozen=True)
class LocalTarget:
    """Local CPU processes (the `local` flags / `LocalTarget.*` gin bindings)."""

    num_processes: int = 2  # copies of the command, each one 'host'
    devices_per_process: int = 4  # CPU devices each process sees
    log_dir: str = "launch_logs"  # process_<i>.log and launcher.log
    max_restarts: int = 3  # restarts of all processes after one fails
    term_timeout_s: float = 30.0  # SIGTERM grace (checkpoint save) before SIGKILL

    def validate(self) -> None:
        if self.num_processes < 1 or self.devices_per_process < 1:
            raise LaunchError(
                f"LocalTarget.num_processes ({self.num_processes}) and devices_per_process "
                f"({self.devices_per_process}) must be >= 1 (--num_processes, --devices_per_process)"
            )
        if self.max_restarts < 0 or self.term_timeout_s < 0:
            raise LaunchError("LocalTarget.max_restarts and term_timeout_s must be >= 0")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags_with_devices(xla_flags: str, devices: int) -> str:
    """XLA_FLAGS with the host device count replaced (other flags kept)."""
    kept = _DEVICE_COUNT_FLAG.sub("", xla_flags).split()
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def local_process_env(
    base: Mapping[str, str],
    *,
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    coordinator: str,
    restart: int = 0,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one local process."""
    env = dict(base)
    env.update(extra or {})
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags_with_devices(env.get("XLA_FLAGS", ""), devices_per_process)
    env["PYTHONUNBUFFERED"] = "1"  # logs arrive as they are written
    env[common.ENV_COORDINATOR] = coordinator
    env[common.ENV_NUM_PROCESSES] = str(num_processes)
    env[common.ENV_PROCESS_ID] = str(process_id)
    env[common.ENV_RESTART] = str(restart)
    return env


class LocalLauncher:
    """Runs `num_processes` copies of `command`, restarting all of them when one fails.

    `run()` returns 0 when every process exited 0; otherwise the failing exit
    code (128 + signal for a signal) once `max_restarts` restarts are used up.
    Children's output goes to `<log_dir>/process_<i>.log` and, prefixed, to
    `echo`; the launcher's own messages to `launcher.log` and `status`
    (default sys.stderr; `quiet=True` for none).
    `restarts` counts the restarts done. `stop()` (thread-safe) ends the run:
    children get SIGTERM (time to save), then SIGKILL.
    """

    def __init__(
        self,
        command: Sequence[str],
        num_processes: int,
        devices_per_process: int = 1,
        log_dir: str | os.PathLike = "launch_logs",
        max_restarts: int = 0,
        env: Mapping[str, str] | None = None,
        *,
        term_timeout_s: float = 30.0,
        poll_interval_s: float = 0.05,
        echo: IO[str] | None = None,
        status: IO[str] | None = None,
        quiet: bool = False,
    ) -> None:
        if not command:
            raise LaunchError("run_local: empty command")
        if num_processes < 1 or devices_per_process < 1:
            raise LaunchError(
                f"run_local: num_processes ({num_processes}) and devices_per_process "
                f"({devices_per_process}) must be >= 1"
            )
        if max_restarts < 0:
            raise LaunchError(f"run_local: max_restarts must be >= 0, got {max_restarts}")
        self.command = [str(c) for c in command]
        self.num_processes = num_processes
        self.devices_per_process = devices_per_process
        self.log_dir = Path(log_dir)
        self.max_restarts = max_restarts
        self.env = dict(env or {})
        self.term_timeout_s = term_timeout_s
        self.poll_interval_s = poll_interval_s
        self.echo = echo
        self.status = status
        self.quiet = quiet
        self.restarts = 0
        self._procs: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stop_signal = signal.SIGTERM
        self._echo_lock = threading.Lock()

    # ------------------------------------------------------------- public
    def stop(self, signum: int = signal.SIGTERM) -> None:
        self._stop_signal = signum
        self._stop.set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        restore = self._install_signal_handlers()
        try:
            while True:
                self._start_all()
                failed = self._wait()
                if failed is None:
                    self._stop_all()
                    if self._stop.is_set():
                        self._say(f"stopped by signal {self._stop_signal}")
                        return 128 + int(self._stop_signal)
                    self._say(f"all {self.num_processes} processes exited 0")
                    return 0
                index, rc = failed
                how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                self._say(
                    f"process {index} failed ({how}); stopping all {self.num_processes} "
                    "processes (JAX cannot replace one)"
                )
                self._stop_all()
                if self.restarts >= self.max_restarts:
                    self._say(
                        f"giving up: process {index} failed ({how}) and max_restarts="
                        f"{self.max_restarts} restart(s) are used up; logs in {self.log_dir}"
                    )
                    return 128 - rc if rc < 0 else rc
                self.restarts += 1
                self._say(
                    f"restart {self.restarts} of {self.max_restarts}: starting all processes "
                    "again; the run resumes from its last checkpoint"
                )
        finally:
            self._stop_all()
            restore()

    # ------------------------------------------------------------ helpers
    def _say(self, message: str) -> None:
        line = f"parti-jax launch local: {message}"
        with open(self.log_dir / "launcher.log", "a") as f:
            f.write(line + "\n")
        if not self.quiet:
            print(line, file=self.status or sys.stderr, flush=True)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, lambda signum, frame: self.stop(signum))

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore

    def _start_all(self) -> None:
        coordinator = f"127.0.0.1:{free_port()}"
        self._procs, self._readers = [], []
        for i in range(self.num_processes):
            env = local_process_env(
                os.environ,
                process_id=i,
                num_processes=self.num_processes,
                devices_per_process=self.devices_per_process,
                coordinator=coordinator,
                restart=self.restarts,
                extra=self.env,
            )
            log_path = self.log_dir / f"process_{i}.log"
            with open(log_path, "ab") as f:
                f.write(
                    f"=== parti-jax launch local: attempt {self.restarts + 1}, process {i} of "
                    f"{self.num_processes}, coordinator {coordinator} ===\n".encode()
                )
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: we can stop its children too
            )
            reader = threading.Thread(
                target=self._copy_output, args=(i, proc, log_path), daemon=True
            )
            reader.start()
            self._procs.append(proc)
            self._readers.append(reader)
        self._say(
            f"started {self.num_processes} processes (pids {self.pids}), coordinator "
            f"{coordinator}, {self.devices_per_process} CPU device(s) each"
        )

    def _copy_output(self, index: int, proc: subprocess.Popen, log_path: Path) -> None:
        assert proc.stdout is not None
        with open(log_path, "ab") as log:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                if self.echo is not None:
                    with self._echo_lock:
                        self.echo.write(f"[{index}] {line.decode(errors='replace')}")
                        self.echo.flush()
        proc.stdout.close()

    def _wait(self) -> tuple[int, int] | None:
        """Polls until all exit 0 (None), one fails ((index, rc)) or stop() (None)."""
        while not self._stop.is_set():
            codes = [p.poll() for p in self._procs]
            for i, rc in enumerate(codes):
                if rc is not None and rc != 0:
                    return i, rc
            if all(rc == 0 for rc in codes):
                return None
            time.sleep(self.poll_interval_s)
        return None

    def _stop_all(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after term_timeout_s."""
        alive = [p for p in self._procs if p.poll() is None]
        for p in alive:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.term_timeout_s
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if p.poll() is None]
            time.sleep(self.poll_interval_s)
        for p in self._procs:
            # Also reaps stray children of processes that already exited.
            _signal_group(p, signal.SIGKILL)
        for p in self._procs:
            p.wait()
        for t in self._readers:
            t.join(timeout=5)
        self._procs, self._readers = [], []


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def run_local(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int = 1,
    log_dir: str | os.PathLike = "launch_logs",
    max_restarts: int = 0,
    env: Mapping[str, str] | None = None,
    *,
    term_timeout_s: float = 30.0,
    echo: IO[str] | None = None,
    status: IO[str] | None = None,
    quiet: bool = False,
) -> int:
    """Runs `command` as `num_processes` local CPU processes; see `LocalLauncher`."""
    return LocalLauncher(
        command,
        num_processes,
        devices_per_process,
        log_dir,
        max_restarts,
        env,
        term_timeout_s=term_timeout_s,
        echo=echo,
        status=status,
        quiet=quiet,
    ).run()


def describe(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int,
    log_dir: str | os.PathLike,
    max_restarts: int,
    env: Mapping[str, str] | None = None,
) -> str:
    """What `--dry_run` prints: the env and command of each process."""
    coordinator = "127.0.0.1:<free port, new on each restart>"
    lines = [
        f"# {num_processes} local processes, {devices_per_process} CPU device(s) each; logs in "
        f"{log_dir}/process_<i>.log; all restarted together after a failure "
        f"(max_restarts={max_restarts})"
    ]
    for i in range(num_processes):
        proc_env = local_process_env(
            {},
            process_id=i,
            num_processes=num_processes,
            devices_per_process=devices_per_process,
            coordinator=coordinator,
            extra=env,
        )
        lines.append(f"env {common.env_assignments(proc_env)} {shlex.join(command)}")
    return "\n".join(lines) + "\n"
