"""Launch builders for TPU VM pods, GKE, SLURM and local multi-process runs
(installed as `parti_jax.launch`)."""

from parti_jax.launch.common import (
    ENV_AUTO_DETECT,
    ENV_COORDINATOR,
    ENV_MESH,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_RESTART,
    LaunchError,
    LaunchSpec,
)
from parti_jax.launch.gke import GkeTarget, gke_plan, jobset_manifest, run_gke
from parti_jax.launch.local import LocalLauncher, LocalTarget, run_local
from parti_jax.launch.slurm import SlurmTarget, run_slurm, sbatch_script, slurm_plan
from parti_jax.launch.tpu import TpuSlice, TpuTarget, run_tpu, tpu_plan, tpu_script, tpu_slice

__all__ = [
    "ENV_AUTO_DETECT",
    "ENV_COORDINATOR",
    "ENV_MESH",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_RESTART",
    "GkeTarget",
    "LaunchError",
    "LaunchSpec",
    "LocalLauncher",
    "LocalTarget",
    "SlurmTarget",
    "TpuSlice",
    "TpuTarget",
    "gke_plan",
    "jobset_manifest",
    "run_gke",
    "run_local",
    "run_slurm",
    "run_tpu",
    "sbatch_script",
    "slurm_plan",
    "tpu_plan",
    "tpu_script",
    "tpu_slice",
]
