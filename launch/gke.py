"""GKE: a JobSet that runs the same command in one pod per host, on TPU or GPU node pools.

A JobSet (jobset.x-k8s.io) holds one Indexed Job per slice; JobSet gives every
pod a stable DNS name `<jobset>-slice-<slice>-<index>.<jobset>` through a
headless service, so pod 0 of slice 0 is the coordinator. Each pod gets
PARTI_JAX_COORDINATOR, PARTI_JAX_NUM_PROCESSES and PARTI_JAX_PROCESS_ID =
slice index x hosts per slice + the Job completion index. (On TPU node pools
GKE also injects TPU_WORKER_ID / TPU_WORKER_HOSTNAMES and, for multi-slice,
MEGASCALE_*, so JAX's own detection would agree.) When any pod fails, JobSet
restarts all of them (`failurePolicy.maxRestarts`), because JAX cannot replace
one lost process; the trainer resumes from its checkpoint.

The image: the repository's Dockerfile installs the wheel from
`scripts/build_wheel.sh` with constraints.txt and the accelerator's jax. With
`--registry=REGISTRY` (and no --image) the pods run `REGISTRY/parti-jax:<version>-tpu`
(or `-cuda` on GPU node pools), and `--dry_run` prints the docker commands that
build and push it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parti_jax.launch import common, install, tpu
from parti_jax.launch.common import LaunchError, LaunchSpec

REPLICATED_JOB = "slice"
IMAGE_REPOSITORY = "parti-jax"  # REGISTRY/parti-jax:<version>-<tpu|cuda>
JOB_INDEX_ANNOTATION = "jobset.sigs.k8s.io/job-index"
ENV_SLICE_INDEX = "PARTI_JAX_SLICE_INDEX"

# TPU generation -> GKE node label value (cloud.google.com/gke-tpu-accelerator).
GKE_TPU_ACCELERATORS = {
    "v4": "tpu-v4-podslice",
    "v5litepod": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}
_TOPOLOGY_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


def gke_tpu_topology(s: tpu.TpuSlice) -> str:
    """The default GKE topology label of a slice: 2D for v5e/v6e, 3D for v4/v5p."""
    if s.generation in ("v5litepod", "v6e"):
        return _TOPOLOGY_2D[s.chips]
    if s.chips < 4 or s.chips & (s.chips - 1):
        raise LaunchError(
            f"{s.accelerator_type}: no default topology for {s.chips} chips; pass --topology "
            "(e.g. 2x2x4) as in your node pool"
        )
    dims = [2, 2, 1]
    while dims[0] * dims[1] * dims[2] < s.chips:
        # Double the last of the smallest dimensions: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
        low = min(dims)
        i = max(j for j, d in enumerate(dims) if d == low)
        dims[i] *= 2
    return "x".join(map(str, dims))


@dataclasses.dataclass(frozen=True)
class GkeTarget:
    """A GKE cluster with a TPU or GPU node pool (the `gke` flags / `GkeTarget.*` gin bindings)."""

    image: str = ""  # container image with parti_jax installed; empty: the registry's default
    registry: str = ""  # e.g. 'us-docker.pkg.dev/PROJECT/REPO': image REGISTRY/parti-jax:<ver>-tpu
    accelerator: str = ""  # TPU type ('v5litepod-16') or GKE GPU type ('nvidia-h100-80gb')
    topology: str = ""  # TPU only: node pool topology; empty: the default for the type
    namespace: str = ""  # empty: kubectl's current namespace
    spot: bool = False  # schedule on spot nodes
    max_restarts: int = 3  # JobSet restarts of ALL pods after any failure
    coordinator_port: int = common.DEFAULT_COORDINATOR_PORT
    termination_grace_seconds: int = 120  # time for the trainer's SIGTERM checkpoint
    host_network: bool = False  # TPU multi-slice: faster DCN with the node's network
    service_account: str = ""  # Kubernetes service account (e.g. for GCS access)
    manifest: str = ""  # where to write the manifest; empty: <name>.jobset.yaml

    @property
    def is_tpu(self) -> bool:
        return not self.accelerator.startswith("nvidia-")

    @property
    def variant(self) -> str:
        """The Dockerfile's ACCELERATOR build argument for this node pool."""
        return "tpu" if self.is_tpu else "cuda"

    @property
    def image_name(self) -> str:
        """--image, else the image the Dockerfile builds, in --registry."""
        if self.image:
            return self.image
        return f"{self.registry.rstrip('/')}/{IMAGE_REPOSITORY}:{install.VERSION}-{self.variant}"

    def validate(self, spec: LaunchSpec) -> tpu.TpuSlice | None:
        if not self.image and not self.registry:
            raise LaunchError(
                "the gke target needs an image: pass --registry=REGISTRY to run "
                f"REGISTRY/{IMAGE_REPOSITORY}:{install.VERSION}-<tpu|cuda> built from the "
                "repository's Dockerfile (docs/LAUNCH.md), or --image=IMAGE"
            )
        if not self.accelerator:
            raise LaunchError(
                "the gke target needs --accelerator: a TPU type (v5litepod-16, v4-32, v6e-8, ...) "
                "or a GKE GPU type (nvidia-h100-80gb, nvidia-a100-80gb, nvidia-l4, ...)"
            )
        if self.max_restarts < 0:
            raise LaunchError(f"GkeTarget.max_restarts must be >= 0, got {self.max_restarts}")
        if spec.processes_per_host != 1:
            raise LaunchError(
                f"GKE runs one process per pod (host), but LaunchSpec.processes_per_host is "
                f"{spec.processes_per_host}; set it to 1"
            )
        s = None
        if self.is_tpu:
            s = tpu.check_spec_matches_slice(spec, self.accelerator)
            if s.generation not in GKE_TPU_ACCELERATORS:
                raise LaunchError(
                    f"{self.accelerator}: GKE has no {s.generation} node pools; use one of "
                    f"{', '.join(GKE_TPU_ACCELERATORS)}"
                )
            if self.topology and not re.fullmatch(r"\d+(x\d+){1,2}", self.topology):
                raise LaunchError(f"--topology {self.topology!r} is not like 2x2x4 or 4x4")
        spec.validate()
        return s


def coordinator_address(spec: LaunchSpec, target: GkeTarget) -> str:
    """DNS name of pod 0 of slice 0 through the JobSet's headless service, with the port."""
    return f"{spec.name}-{REPLICATED_JOB}-0-0.{spec.name}:{target.coordinator_port}"


def pod_command(spec: LaunchSpec) -> list[str]:
    """`sh -c` that derives this pod's process id, then execs the user's command."""
    line = (
        f"export {common.ENV_PROCESS_ID}=$(( {ENV_SLICE_INDEX} * {spec.num_hosts} "
        f"+ JOB_COMPLETION_INDEX )) && exec {spec.shell_command()}"
    )
    return ["sh", "-c", line]


def jobset_manifest(spec: LaunchSpec, target: GkeTarget) -> dict[str, Any]:
    """The JobSet as a plain dict (see `to_yaml`)."""
    s = target.validate(spec)
    env: list[dict[str, Any]] = [
        {"name": k, "value": v}
        for k, v in spec.process_env(coordinator=coordinator_address(spec, target)).items()
    ]
    env.append(
        {
            "name": ENV_SLICE_INDEX,
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX_ANNOTATION}']"}
            },
        }
    )
    node_selector: dict[str, str] = {}
    if s is not None:
        node_selector["cloud.google.com/gke-tpu-accelerator"] = GKE_TPU_ACCELERATORS[s.generation]
        node_selector["cloud.google.com/gke-tpu-topology"] = target.topology or gke_tpu_topology(s)
        resources = {"google.com/tpu": s.chips_per_host}
    else:
        node_selector["cloud.google.com/gke-accelerator"] = target.accelerator
        resources = {"nvidia.com/gpu": spec.devices_per_host}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": target.termination_grace_seconds,
    }
    if target.host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if target.spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
        pod_spec["tolerations"] = [
            {
                "key": "cloud.google.com/gke-spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            }
        ]
    pod_spec["nodeSelector"] = node_selector
    if target.service_account:
        pod_spec["serviceAccountName"] = target.service_account
    pod_spec["containers"] = [
        {
            "name": "parti-jax",
            "image": target.image_name,
            "command": pod_command(spec),
            "env": env,
            "ports": [{"containerPort": target.coordinator_port}],
            "resources": {"requests": dict(resources), "limits": dict(resources)},
        }
    ]
    metadata: dict[str, Any] = {"name": spec.name}
    if target.namespace:
        metadata["namespace"] = target.namespace
    if s is not None:
        # One slice per node pool: pods of a slice never straddle two pools.
        metadata["annotations"] = {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
        }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": target.max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": spec.num_slices,
                    "template": {
                        "spec": {
                            "parallelism": spec.num_hosts,
                            "completions": spec.num_hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": {"spec": pod_spec},
                        }
                    },
                }
            ],
        },
    }


# ------------------------------------------------------------------ YAML
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid double-quoted YAML scalar
    raise TypeError(f"cannot write {type(v).__name__} to YAML")


def _yaml_lines(obj: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = k if _PLAIN_KEY.match(k) else json.dumps(k)
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{key}:")
                lines += _yaml_lines(v, indent + 2)
            elif isinstance(v, dict | list):
                lines.append(f"{pad}{key}: {'{}' if isinstance(v, dict) else '[]'}")
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict | list) and item:
                sub = _yaml_lines(item, indent + 2)
                sub[0] = f"{pad}- {sub[0][indent + 2 :]}"
                lines += sub
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(pad + _scalar(obj))
    return lines


def to_yaml(obj: dict[str, Any]) -> str:
    """Block-style YAML for dicts/lists of str/int/bool (strings always quoted)."""
    return "\n".join(_yaml_lines(obj, 0)) + "\n"


# ------------------------------------------------------------- commands
@dataclasses.dataclass(frozen=True)
class GkePlan:
    spec: LaunchSpec
    target: GkeTarget
    manifest_path: str
    manifest_yaml: str
    apply: tuple[str, ...]
    logs: tuple[str, ...]
    delete: tuple[str, ...]
    build: tuple[tuple[str, ...], ...]  # build and push the default image ((): --image given)


def gke_plan(spec: LaunchSpec, target: GkeTarget) -> GkePlan:
    """Builds (without running) the manifest and the kubectl commands."""
    manifest = jobset_manifest(spec, target)
    path = target.manifest or f"{spec.name}.jobset.yaml"
    ns: Sequence[str] = (f"--namespace={target.namespace}",) if target.namespace else ()
    selector = f"jobset.sigs.k8s.io/jobset-name={spec.name}"
    return GkePlan(
        spec=spec,
        target=target,
        manifest_path=path,
        manifest_yaml=to_yaml(manifest),
        apply=("kubectl", "apply", "-f", path, *ns),
        logs=(
            "kubectl",
            "logs",
            "-f",
            "--prefix",
            f"--max-log-requests={spec.num_processes}",
            "-l",
            selector,
            *ns,
        ),
        delete=("kubectl", "delete", "jobset", spec.name, *ns),
        build=image_build_commands(target) if not target.image else (),
    )


def image_build_commands(target: GkeTarget) -> tuple[tuple[str, ...], ...]:
    """From the repository root: build the wheel, build the image from the Dockerfile, push."""
    image = target.image_name
    return (
        ("scripts/build_wheel.sh",),
        ("docker", "build", "--build-arg", f"ACCELERATOR={target.variant}", "-t", image, "."),
        ("docker", "push", image),
    )


def describe(plan: GkePlan) -> str:
    """What `--dry_run` prints: the manifest and the commands that use it."""
    build = ""
    if plan.build:
        build = (
            "# build and push the image (from the repository root), once per version:\n"
            + "".join(shlex.join(c) + "\n" for c in plan.build)
        )
    return (
        f"{build}# {plan.manifest_path}\n{plan.manifest_yaml}"
        f"# submit (needs the JobSet controller in the cluster):\n{shlex.join(plan.apply)}\n"
        f"# follow the logs of every pod:\n{shlex.join(plan.logs)}\n"
        f"# delete:\n{shlex.join(plan.delete)}\n"
    )


def run_gke(plan: GkePlan) -> int:
    """Writes the manifest and applies it; returns kubectl's exit code."""
    common.require_binary("kubectl")
    path = Path(plan.manifest_path)
    if path.parent != Path("."):
        os.makedirs(path.parent, exist_ok=True)
    path.write_text(plan.manifest_yaml)
    rc = subprocess.call(list(plan.apply))
    if rc == 0:
        print(f"submitted JobSet {plan.spec.name}; logs: {shlex.join(plan.logs)}")
    return rc
