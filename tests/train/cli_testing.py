"""Helpers for tests that run `parti-jax train` in subprocesses; a work dir may be a local
folder or a URL (gs://..., read through parti_jax/storage.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from parti_jax import storage

TRAIN = [sys.executable, "-m", "parti_jax", "train", "--gin_file=runs/tiny_train.gin"]


def env(devices: int = 8, **extra: str) -> dict:
    """The test environment (compile cache, CPU) with `devices` host devices."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e.update(extra)
    return e


def train_args(workdir, *bindings: str) -> list[str]:
    return [*TRAIN, f"--workdir={workdir}", *(f"--gin.{b}" for b in bindings)]


def run(args: list[str], *, environ: dict | None = None, timeout: int = 300, cwd=None):
    """Runs to completion; fails the test with the tail of the output on error."""
    proc = subprocess.run(
        args, env=environ or env(), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(args: list[str], *, num_processes=2, devices=4) -> list[subprocess.Popen]:
    """`args` as `num_processes` processes of one jax.distributed run on 127.0.0.1, each
    with `devices` CPUs; stdout and stderr together, as text."""
    port = free_port()
    procs = []
    for i in range(num_processes):
        e = env(
            devices,
            PARTI_JAX_COORDINATOR=f"127.0.0.1:{port}",
            PARTI_JAX_NUM_PROCESSES=str(num_processes),
            PARTI_JAX_PROCESS_ID=str(i),
        )
        procs.append(
            subprocess.Popen(
                args, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def finish_processes(procs: list[subprocess.Popen], *, timeout=400) -> list[str]:
    """The outputs of `procs` once all have exited (each waited for `timeout` s, then killed)."""
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outputs


def run_processes(workdir, bindings: list[str], *, num_processes=2, devices=4, timeout=400):
    """`parti-jax train` as `num_processes` processes on 127.0.0.1, each with `devices` CPUs."""
    procs = start_processes(
        train_args(workdir, *bindings), num_processes=num_processes, devices=devices
    )
    outputs = finish_processes(procs, timeout=timeout)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise AssertionError(f"process {i} exited {p.returncode}:\n{out[-4000:]}")
    return outputs


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def losses(path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(path) if "loss" in m}


def checkpoint_folders(workdir) -> list[str]:
    """The names in `<workdir>/checkpoints`, [] before it exists (on GCS a folder exists only
    once an object is in it, so a run killed before its first save leaves none)."""
    try:
        return storage.listdir(storage.join(workdir, "checkpoints"))
    except FileNotFoundError:
        return []


def committed_steps(workdir) -> list[int]:
    """The finished checkpoints' steps: `<step>` folders (orbax renames a finished save's
    temporary folder there), on GCS those holding orbax's commit_success.txt."""
    root = storage.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in checkpoint_folders(workdir) if n.isdigit())
    if storage.is_url(root):
        steps = [s for s in steps if storage.exists(f"{root}/{s}/commit_success.txt")]
    return steps


def kill_after_checkpoint(
    args: list[str], workdir, *, step: int, environ: dict | None = None, cwd=None, poll=0.05
) -> int:
    """Starts `args`, SIGKILLs it once a checkpoint of `step` or later is committed, and
    returns the newest committed step (what the next run resumes from)."""
    with tempfile.TemporaryFile() as log:  # the test's own temporary folder, not the run's
        proc = subprocess.Popen(
            args, env=environ or env(), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 300
            while not any(s >= step for s in committed_steps(workdir)):
                if proc.poll() is not None:
                    log.seek(0)
                    out = log.read().decode()[-3000:]
                    raise AssertionError(f"the run ended (exit {proc.returncode}):\n{out}")
                assert time.time() < deadline, "no checkpoint after 300 s"
                time.sleep(poll)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return committed_steps(workdir)[-1]
