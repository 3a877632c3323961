"""GKE JobSet manifests: structure, the env each pod gets, and the process ids it derives."""

from __future__ import annotations

import os
import subprocess

import pytest

from parti_jax.launch import gke, install, tpu
from parti_jax.launch.common import LaunchError, LaunchSpec

yaml = pytest.importorskip("yaml")  # test-only: the manifest is written without PyYAML

CMD = ("parti-jax", "train", "--gin_file=runs/x.gin", "--workdir=gs://b/run 1")


def _tpu_spec(accelerator: str, **kw) -> LaunchSpec:
    return tpu.spec_for_slice(LaunchSpec(command=CMD, name="job", **kw), accelerator)


def _pod(manifest: dict) -> dict:
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_tpu_multislice_jobset():
    spec = _tpu_spec("v5litepod-16", num_slices=2)
    target = gke.GkeTarget(image="img:1", accelerator="v5litepod-16", spot=True, max_restarts=7)
    plan = gke.gke_plan(spec, target)
    manifest = yaml.safe_load(plan.manifest_yaml)
    assert manifest == gke.jobset_manifest(spec, target)  # the YAML writer round-trips
    assert manifest["kind"] == "JobSet"
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 7
    rjob = manifest["spec"]["replicatedJobs"][0]
    assert rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    pod = _pod(manifest)
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
        "cloud.google.com/gke-spot": "true",
    }
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    env = _env(container)
    assert env["PARTI_JAX_COORDINATOR"] == "job-slice-0-0.job:8482"
    assert env["PARTI_JAX_NUM_PROCESSES"] == "8"
    assert "jobset.sigs.k8s.io/job-index" in env["PARTI_JAX_SLICE_INDEX"]["fieldRef"]["fieldPath"]
    assert plan.apply == ("kubectl", "apply", "-f", "job.jobset.yaml")


def test_every_pod_gets_a_distinct_process_id():
    """Runs the pod's `sh -c` as each (slice, completion index) would."""
    spec = _tpu_spec("v4-16", num_slices=3)  # 2 hosts per slice, 6 processes
    spec = LaunchSpec(**{**spec.__dict__, "command": ("printenv", "PARTI_JAX_PROCESS_ID")})
    container = _pod(gke.jobset_manifest(spec, gke.GkeTarget(image="i", accelerator="v4-16")))[
        "containers"
    ][0]
    ids = []
    for slice_index in range(3):
        for index in range(2):
            env = dict(
                os.environ, PARTI_JAX_SLICE_INDEX=str(slice_index), JOB_COMPLETION_INDEX=str(index)
            )
            out = subprocess.run(container["command"], env=env, capture_output=True, text=True)
            ids.append(int(out.stdout))
    assert ids == list(range(6))


def test_command_words_survive_quoting():
    spec = LaunchSpec(
        command=("python3", "-c", "import sys; print(sys.argv[1:])", "a b", "it's"),
        num_hosts=1,
        devices_per_host=8,
    )
    container = _pod(gke.jobset_manifest(spec, gke.GkeTarget(image="i", accelerator="nvidia-l4")))[
        "containers"
    ][0]
    env = dict(os.environ, PARTI_JAX_SLICE_INDEX="0", JOB_COMPLETION_INDEX="0")
    out = subprocess.run(container["command"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "['a b', \"it's\"]"


def test_gpu_jobset():
    spec = LaunchSpec(command=CMD, name="gpu-run", num_hosts=2, devices_per_host=8, tensor=8)
    manifest = gke.jobset_manifest(
        spec, gke.GkeTarget(image="i", accelerator="nvidia-h100-80gb", namespace="ml")
    )
    pod = _pod(manifest)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = _env(container)
    assert env["PARTI_JAX_NUM_PROCESSES"] == "2"
    assert env["PARTI_JAX_COORDINATOR"] == "gpu-run-slice-0-0.gpu-run:8482"
    assert env["PARTI_JAX_MESH"].startswith("data=2,fsdp=1,tensor=8")
    assert "annotations" not in manifest["metadata"]  # exclusive topology is for TPU pools
    assert manifest["metadata"]["namespace"] == "ml"


@pytest.mark.parametrize(
    "accelerator,topology",
    [
        ("v4-8", "2x2x1"),
        ("v4-16", "2x2x2"),
        ("v4-32", "2x2x4"),
        ("v5p-128", "4x4x4"),
        ("v5p-256", "4x4x8"),
        ("v6e-8", "2x4"),
        ("v6e-256", "16x16"),
    ],
)
def test_topology_table(accelerator, topology):
    assert gke.gke_tpu_topology(tpu.tpu_slice(accelerator)) == topology


def test_bad_input_is_named():
    spec = _tpu_spec("v4-32")
    with pytest.raises(LaunchError, match="pass --registry=REGISTRY .* or --image=IMAGE"):
        gke.jobset_manifest(spec, gke.GkeTarget(accelerator="v4-32"))
    with pytest.raises(LaunchError, match="no v3 node pools"):
        gke.jobset_manifest(_tpu_spec("v3-32"), gke.GkeTarget(image="i", accelerator="v3-32"))
    with pytest.raises(LaunchError, match=r"v4-32 has 4 host\(s\).*is 1"):
        gke.jobset_manifest(
            LaunchSpec(command=CMD, devices_per_host=4),
            gke.GkeTarget(image="i", accelerator="v4-32"),
        )
    with pytest.raises(LaunchError, match=r"multiply to 32, which does not divide the slice's 16"):
        gke.jobset_manifest(
            _tpu_spec("v4-32", fsdp=32), gke.GkeTarget(image="i", accelerator="v4-32")
        )


def test_yaml_writer_quotes_everything():
    tricky = {"a": "x: y # z", "b": ["- item", "'q'", 'say "hi"\nnext'], "c": True, "n": 3, "e": {}}
    assert yaml.safe_load(gke.to_yaml(tricky)) == tricky


@pytest.mark.parametrize(
    "accelerator,spec_kw,variant",
    [("v5p-16", {}, "tpu"), ("nvidia-h100-80gb", {"num_hosts": 2, "devices_per_host": 8}, "cuda")],
)
def test_default_image_from_the_registry(accelerator, spec_kw, variant):
    """Without --image the pods run REGISTRY/parti-jax:<version>-<tpu|cuda>, and the plan
    carries the commands that build it from the Dockerfile and push it."""
    spec = LaunchSpec(command=CMD, name="job", **spec_kw)
    if variant == "tpu":
        spec = tpu.spec_for_slice(spec, accelerator)
    target = gke.GkeTarget(registry="us-docker.pkg.dev/p/r/", accelerator=accelerator)
    image = f"us-docker.pkg.dev/p/r/parti-jax:{install.VERSION}-{variant}"
    plan = gke.gke_plan(spec, target)
    assert _pod(yaml.safe_load(plan.manifest_yaml))["containers"][0]["image"] == image
    assert plan.build == (
        ("scripts/build_wheel.sh",),
        ("docker", "build", "--build-arg", f"ACCELERATOR={variant}", "-t", image, "."),
        ("docker", "push", image),
    )
    text = gke.describe(plan)
    assert text.index("docker build") < text.index('kind: "JobSet"') < text.index("kubectl apply")
    # --image wins, and then there is nothing to build.
    own = gke.gke_plan(spec, gke.GkeTarget(image="mine:1", registry="r", accelerator=accelerator))
    assert own.build == () and '"mine:1"' in own.manifest_yaml
