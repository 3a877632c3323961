"""`parti-jax benchmark`: speed of the train step, sampling, the VQGAN and the input pipeline.

    parti-jax benchmark memory --gin_file=runs/parti_3b_tp4.gin [--method=analytic|compiled]
    parti-jax benchmark {train_step,sample,vqgan,input,all} --gin_file=models/tiny.gin \\
        [--gin_file=vqgan/tiny.gin] [--batch_size=8] [--mesh=data=1,fsdp=-1,tensor=1] \\
        [--peak_flops=...] [--memory_bandwidth=...] [--steps=10] [--warmup=2] \\
        [--dtype=bfloat16] [--attention_impl=cudnn] [--remat_policy=full] [--scan_layers] \\
        [--guidance=both] [--profile_dir=DIR] [--output=results.jsonl]

Prints one JSON object per line (and appends it to `--output`): the figure,
the device, the software versions and the knobs. A benchmark that fails (e.g.
out of memory) prints a line with an `error` field and the command exits 1
after the others ran. Sizes come from gin: `ModelConfig` (gin/models/) for
train_step / sample / input, `VQGANConfig` (gin/vqgan/) for vqgan, optional
`MeshConfig`; `memory` reads a run file (train.*, MeshConfig, HardwareTarget).
Only `input` loads TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parti_jax.cli import flags

DESCRIPTION = "Benchmarks: train step, sampling, VQGAN, input pipeline; memory of a run file."
_MEMORY_CHILD = "PARTI_JAX_MEMORY_CHILD"


def _parser() -> argparse.ArgumentParser:
    p = flags.make_parser("benchmark", DESCRIPTION, workdir=False)
    p.add_argument("which", help="train_step, sample, vqgan, input, a comma-separated list, all; "
                   "or memory")  # fmt: skip
    p.add_argument("--label", default=None, help="model name in the results (default: gin files)")
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--steps", type=int, default=None, help="timed iterations (default per bench)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations after compiling")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model overrides (applied after gin)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    g.add_argument("--attention_impl", choices=("xla", "cudnn"), default=None)
    g.add_argument("--remat_policy", default=None, help="ModelConfig.remat_policy")
    g.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("train_step")
    g.add_argument("--batch_size", type=int, default=8, help="global train batch")
    g.add_argument("--text_length", type=int, default=None, help="default: max_text_length")
    g.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=-1,tensor=1 (MeshConfig degrees)")
    g.add_argument("--rules", default=None, help="data_parallel | fsdp | fsdp_tp")
    g.add_argument("--num_devices", type=int, default=None, help="use the first N devices")
    g.add_argument("--num_micro_batches", type=int, default=1)
    g.add_argument("--peak_flops", type=float, default=None, help="per-device peak FLOP/s")
    g.add_argument("--profile_dir", default=None, help="jax.profiler trace of a few steps here")
    g = p.add_argument_group("sample")
    g.add_argument("--num_prompts", type=int, default=1, help="prompts per sampling batch")
    g.add_argument("--guidance", choices=("both", "on", "off"), default="both")
    g.add_argument("--guidance_scale", type=float, default=1.2)
    g.add_argument("--memory_bandwidth", type=float, default=None, help="device bytes/s")
    g.add_argument(
        "--float32_weights",
        action="store_true",
        help="sample/vqgan with float32 weights (default: weights cast to the compute dtype)",
    )
    g = p.add_argument_group("memory (a run file: train.*, MeshConfig, HardwareTarget)")
    g.add_argument(
        "--method",
        choices=("analytic", "compiled", "both"),
        default="analytic",
        help="analytic formula, or XLA's memory analysis of the compiled step on a CPU mesh "
        "of the target's size (a subprocess with that many fake devices)",
    )
    g = p.add_argument_group("vqgan")
    g.add_argument("--vqgan_batch_size", type=int, default=8)
    g = p.add_argument_group("input")
    g.add_argument("--input_batch_size", type=int, default=64)
    g.add_argument("--codes_dir", default=None, help="codes folder (default: synthetic codes)")
    g.add_argument("--input_examples", type=int, default=2048, help="synthetic codes written")
    g.add_argument("--input_threads", type=int, default=None, help="tf.data threads")
    return p


def _label(ns: argparse.Namespace, prefix: str = "models/") -> str:
    """--label, else the stems of the gin files under `prefix` (else of all of them)."""
    if ns.label:
        return ns.label
    names = [f for f in ns.gin_file if prefix in f.replace("\\", "/")] or ns.gin_file
    return "+".join(Path(f).stem for f in names) or "defaults"


def main(argv: Sequence[str]) -> int:
    """Entry point of `parti-jax benchmark` (dispatched by parti_jax.cli.main)."""
    args = flags.parse_args(_parser(), argv)
    ns = args.namespace
    flags.setup_gin(args)
    if ns.which == "memory":
        return _memory(ns, argv)
    import gin
    from parti_jax import benchmark as bench
    from parti_jax import partitioning

    bound = set(re.findall(r"^(\w+)\.", gin.config_str(), re.MULTILINE))
    with flags.usage_errors(ValueError, TypeError):
        which = bench.parse_which(ns.which)
        # Defaults are Parti-350M and ViT-VQGAN Small: never run them by accident on a CPU.
        for name, folder, benches in (
            ("ModelConfig", "models", {"train_step", "sample", "input"}),
            ("VQGANConfig", "vqgan", {"vqgan"}),
        ):
            if benches & set(which) and name not in bound:
                raise ValueError(
                    f"no {name} bindings: pass a size file from gin/{folder}/, e.g. "
                    f"--gin_file={folder}/tiny.gin"
                )
        knobs = ("dtype", "attention_impl", "remat_policy", "scan_layers")
        changes = {k: getattr(ns, k) for k in knobs if getattr(ns, k) is not None}
        model = gin.get_configurable("ModelConfig")(**changes)
        vq_changes = {k: v for k, v in changes.items() if k in ("dtype", "attention_impl")}
        vqgan = gin.get_configurable("VQGANConfig")(**vq_changes)
        mesh = partitioning.parse_mesh(ns.mesh or "") | ({"rules": ns.rules} if ns.rules else {})
        mesh = gin.get_configurable("MeshConfig")(**mesh)
    timing = {k: getattr(ns, k) for k in ("steps", "warmup") if getattr(ns, k) is not None}
    common = dict(timing, seed=ns.seed, label=_label(ns))
    sample = dict(common, num_prompts=ns.num_prompts, text_length=ns.text_length)
    sample.update(memory_bandwidth=ns.memory_bandwidth, cast_weights=not ns.float32_weights)
    scales = {"both": (None, ns.guidance_scale), "on": (ns.guidance_scale,), "off": (None,)}
    jobs: dict[str, list[tuple[Any, dict]]] = {
        "train_step": [(bench.bench_train_step, dict(
            common, model_config=model, batch_size=ns.batch_size, mesh_config=mesh,
            text_length=ns.text_length, peak_flops=ns.peak_flops, num_devices=ns.num_devices,
            num_micro_batches=ns.num_micro_batches, profile_dir=ns.profile_dir,
            optimizer_config=gin.get_configurable("OptimizerConfig")()))],
        "sample": [(bench.bench_sample, dict(sample, model_config=model, guidance_scale=s))
                   for s in scales[ns.guidance]],
        "vqgan": [(bench.bench_vqgan, dict(
            common, vqgan_config=vqgan, batch_size=ns.vqgan_batch_size,
            cast_weights=not ns.float32_weights, label=_label(ns, "vqgan/")))],
        "input": [(bench.bench_input, dict(
            common, model_config=model, batch_size=ns.input_batch_size, codes_dir=ns.codes_dir,
            num_examples=ns.input_examples, text_length=ns.text_length,
            num_threads=ns.input_threads))],
    }  # fmt: skip
    return bench.run_benchmarks([job for name in which for job in jobs[name]], ns.output)


def run_file_setup() -> dict[str, Any]:
    """`memory.train_memory`'s arguments from the parsed run file: train.*, ModelConfig,
    MeshConfig, OptimizerConfig, HardwareTarget."""
    import gin

    flags.check_required_bindings("train", ["batch_size"])
    train = {
        name: gin.query_parameter(f"train.{name}") if flags.is_bound(f"train.{name}") else default
        for name, default in (
            ("batch_size", None),
            ("text_length", 128),
            ("num_micro_batches", 1),
            ("loss_chunk_size", None),
        )
    }
    configs = {
        "config": "ModelConfig",
        "target": "HardwareTarget",
        "mesh_config": "MeshConfig",
        "optimizer_config": "OptimizerConfig",
    }
    with flags.usage_errors(ValueError, TypeError):
        return {**train, **{k: gin.get_configurable(name)() for k, name in configs.items()}}


def _memory(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    """`benchmark memory`: one JSON line per method; exits 1 when an estimate exceeds 90% of
    the target's device memory. The compiled method runs in a subprocess with the target's
    device count faked on CPU (XLA:CPU buffer assignment)."""
    from parti_jax import benchmark as bench
    from parti_jax import memory

    run = run_file_setup()
    fits = True
    for method in ("analytic", "compiled") if ns.method == "both" else (ns.method,):
        if method == "compiled" and os.environ.get(_MEMORY_CHILD) != "1":
            devices = run["target"].num_devices
            env = dict(os.environ, JAX_PLATFORMS="cpu", **{_MEMORY_CHILD: "1"})
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            rest = [a for a in argv if not a.startswith("--method=")]
            if "--method" in rest:  # `--method both`
                del rest[rest.index("--method") : rest.index("--method") + 2]
            command = [sys.executable, "-m", "parti_jax", "benchmark", *rest, "--method=compiled"]
            fits = subprocess.run(command, env=env, check=False).returncode == 0 and fits
            continue
        with flags.usage_errors(ValueError):
            estimate = memory.train_memory(**run, method=method)
        record = memory.report(estimate, **run)
        bench.emit({"benchmark": "memory", "model": _label(ns, ""), **record}, ns.output)
        fits = fits and record["fits_90_percent"]
    return 0 if fits else 1


if __name__ == "__main__":
    # `python -m parti_jax.cli.benchmark ...`: the same as `parti-jax benchmark ...`.
    sys.exit(flags.run_main(main, sys.argv[1:]))
