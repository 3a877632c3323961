"""Helpers for tests that run `parti-jax train` in subprocesses."""

import json
import os
import socket
import subprocess
import sys

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


def run(args: list[str], *, environ: dict | None = None, timeout: int = 300):
    """Runs to completion; fails the test with the tail of the output on error."""
    proc = subprocess.run(
        args, env=environ or env(), capture_output=True, text=True, timeout=timeout
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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(path) if "loss" in m}
