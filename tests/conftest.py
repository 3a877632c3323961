"""Test set-up: an 8-device CPU platform (a 2x4 mesh), float32, a shared compile cache.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at
import time; pytest imports conftest.py before the test modules.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# TensorFlow must not grab every core's threads or any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

_CACHE = pathlib.Path(
    os.environ.get("PARTI_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "parti_jax_tests")
)
_CACHE.mkdir(parents=True, exist_ok=True)
# Subprocesses (CLI and multi-process tests) share the persistent compile cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# As parti_jax does on CPU (train.distributed.configure_for_backend): XLA:CPU
# compiles the partitionable threefry generator ~20x slower. Subprocesses
# inherit the variable.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_threefry_partitionable", False)


@pytest.fixture(scope="session")
def cpu_devices():
    devices = jax.devices()
    assert len(devices) == 8, f"tests expect 8 CPU devices, got {len(devices)}"
    return devices


@pytest.fixture(scope="session")
def gcs_emulator():
    """One GCS emulator for this test process (tests/gcs_testing.py); stopped at the end."""
    from parti_jax import workdir
    from tests.gcs_testing import start_emulator

    emulator, server = start_emulator()
    yield emulator
    workdir.release_all()  # a lock left held in the bucket would be retried at exit, for minutes
    server.stop()


@pytest.fixture
def gcs(gcs_emulator, request):
    """The emulator with a prefix of this test's own: `gcs.url("run")` is gs://bucket/<p>/run."""
    from tests.gcs_testing import unique_prefix

    return gcs_emulator.with_prefix(unique_prefix(request.node.name))
