"""`parti-jax benchmark`: speed of the train step, sampling, the VQGAN and the input pipeline.

    parti-jax benchmark memory --gin_file=runs/parti_3b_tp4.gin [--method=analytic|compiled]
    parti-jax benchmark {train_step,sample,vqgan,input,all} --gin_file=models/tiny.gin \\
        [--gin_file=vqgan/tiny.gin] [--batch_size=8] [--mesh=data=1,fsdp=-1,tensor=1] \\
        [--peak_flops=...] [--memory_bandwidth=...] [--steps=10] [--warmup=2] \\
        [--dtype=bfloat16] [--attention_impl=cudnn] [--remat_policy=full] [--scan_layers] \\
        [--guidance=both] [--profile_dir=DIR] [--output=results.jsonl]

Prints one JSON object per line on stdout (and appends it to `--output`):
the figure, the device, the software versions, the command-line knobs. A
benchmark that fails (e.g. out of memory at a large batch) prints a line with
an `error` field instead and the command exits 1 after the others have run.

Gin files give the sizes: `ModelConfig` bindings (gin/models/*.gin) for
train_step / sample / input, `VQGANConfig` bindings (gin/vqgan/*.gin) for
vqgan, optional `MeshConfig` bindings. With gin-config installed they are
parsed by gin; on a bare accelerator host without it (only
jax/flax/optax/orbax), run `python -m parti_jax.cli.benchmark ...` and the
literal bindings are read by `parti_jax.gin_reader`. This
module imports neither gin nor TensorFlow at module level; TensorFlow is
loaded only by the `input` benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = "Benchmarks: train step, sampling, VQGAN, input pipeline."
BENCHMARKS = ("train_step", "sample", "vqgan", "input")


class BenchmarkUsageError(Exception):
    """A bad flag or gin file; printed as one line (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parti-jax benchmark",
        description=DESCRIPTION,
        epilog="Gin bindings: --gin.NAME=VALUE, e.g. --gin.ModelConfig.num_decoder_layers=2.",
    )
    p.add_argument(
        "which", help=f"what to measure: {', '.join(BENCHMARKS)}, a comma-separated list, or all"
    )
    p.add_argument("--gin_file", action="append", default=[], help="gin file; repeatable")
    p.add_argument("--gin_search_path", action="append", default=[], help="extra gin folder")
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


def _split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--gin.X=Y` / `--gin.X Y` -> 'X = Y' bindings; the rest for argparse."""
    bindings, rest, argv, i = [], [], list(argv), 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--gin."):
            body = arg[len("--gin.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise BenchmarkUsageError(f"{arg}: a gin override needs a value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return bindings, rest


def _gin_available() -> bool:
    """Whether gin-config is importable. Another distribution also installs a
    top-level `gin` module (seen on an accelerator host's image): it lacks
    gin-config's API, so it counts as no gin and the literal reader is used."""
    try:
        import gin
    except ImportError:
        return False
    return all(hasattr(gin, a) for a in ("external_configurable", "parse_config", "config_str"))


def load_configs(
    gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]
) -> tuple[dict[str, Any], set[str]]:
    """{'ModelConfig', 'VQGANConfig', 'MeshConfig'} instances from gin files and bindings,
    and the names of those that some binding set (the others are their defaults)."""
    from parti_jax.models.config import ModelConfig
    from parti_jax.partitioning import MeshConfig
    from parti_jax.vqgan.config import VQGANConfig

    classes = {"ModelConfig": ModelConfig, "VQGANConfig": VQGANConfig, "MeshConfig": MeshConfig}
    if _gin_available():
        import gin
        from parti_jax.cli import flags

        try:
            flags.setup_gin(
                flags.CommonArgs(
                    gin_files=list(gin_files),
                    gin_bindings=list(bindings),
                    gin_search_paths=list(search_paths),
                    workdir=None,
                    namespace=argparse.Namespace(),
                )
            )
            out = {}
            for name, cls in classes.items():
                made = gin.get_configurable(name)()
                out[name] = cls(**{f: getattr(made, f) for f in cls.__dataclass_fields__})
            text = gin.config_str()
            bound = {n for n in classes if re.search(rf"^{n}\.", text, re.MULTILINE)}
            return out, bound
        except flags.UsageError as e:
            raise BenchmarkUsageError(str(e)) from e
        except (ValueError, TypeError) as e:
            raise BenchmarkUsageError(str(e).splitlines()[0]) from e
    from parti_jax import gin_reader

    merged: dict[str, dict[str, Any]] = {}
    try:
        for f in gin_files:
            for name, params in gin_reader.read_gin_bindings(f, search_paths).items():
                merged.setdefault(name, {}).update(params)
        for b in bindings:
            name, param, value = gin_reader.parse_binding(b, where=f"--gin.{b.replace(' = ', '=')}")
            merged.setdefault(name, {})[param] = value
        configs = {
            name: gin_reader.config_from_bindings(cls, merged, name)
            for name, cls in classes.items()
        }
        return configs, {n for n in classes if merged.get(n)}
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise BenchmarkUsageError(str(e)) from e


def _parse_mesh(text: str, base: Any) -> Any:
    degrees = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise BenchmarkUsageError(
                f"--mesh={text}: expected comma-separated data=N,fsdp=N,tensor=N (-1 fills)"
            )
        degrees[name] = int(value)
    return dataclasses.replace(base, **degrees)


def _which(text: str) -> tuple[str, ...]:
    if text == "all":
        return BENCHMARKS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise BenchmarkUsageError(
            f"unknown benchmark {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(BENCHMARKS)}, a comma-separated list of them, or all"
        )
    return names


def _label(args: argparse.Namespace, kind: str) -> str:
    if args.label:
        return args.label
    prefix = "vqgan/" if kind == "vqgan" else "models/"
    names = [f for f in args.gin_file if f.replace("\\", "/").find(prefix) >= 0]
    names = names or args.gin_file
    return "+".join(Path(f).stem for f in names) or "defaults"


def _emit(result: dict[str, Any], output: str | None) -> None:
    line = json.dumps(result, allow_nan=False, default=str)
    print(line, flush=True)
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")


def _run(
    args: argparse.Namespace, configs: dict[str, Any], bound: set[str]
) -> list[tuple[str, Any]]:
    """(name, thunk) of each benchmark to run; a thunk returns one dict or a list."""
    from parti_jax import benchmark as bench

    which = _which(args.which)
    # Defaults are Parti-350M and ViT-VQGAN Small: never run them by accident on a CPU.
    if set(which) & {"train_step", "sample", "input"} and "ModelConfig" not in bound:
        raise BenchmarkUsageError(
            "no ModelConfig bindings: pass a model size, e.g. --gin_file=models/tiny.gin "
            "(models/shapes.gin, models/parti_350m.gin, ...)"
        )
    if "vqgan" in which and "VQGANConfig" not in bound:
        raise BenchmarkUsageError(
            "no VQGANConfig bindings: pass a VQGAN size, e.g. --gin_file=vqgan/tiny.gin "
            "(vqgan/shapes.gin, vqgan/small.gin, vqgan/base.gin, vqgan/large.gin)"
        )

    model = configs["ModelConfig"]
    changes = {
        k: getattr(args, k)
        for k in ("dtype", "attention_impl", "remat_policy", "scan_layers")
        if getattr(args, k) is not None
    }
    try:
        model = model.replace(**changes)
        vqgan = configs["VQGANConfig"]
        vq_changes = {k: changes[k] for k in ("dtype", "attention_impl") if k in changes}
        vqgan = dataclasses.replace(vqgan, **vq_changes)
        mesh = configs["MeshConfig"]
        if args.mesh:
            mesh = _parse_mesh(args.mesh, mesh)
        if args.rules:
            mesh = dataclasses.replace(mesh, rules=args.rules)
    except ValueError as e:
        raise BenchmarkUsageError(str(e)) from e

    def steps(default: int) -> int:
        return args.steps if args.steps is not None else default

    def warmup(default: int) -> int:
        return args.warmup if args.warmup is not None else default

    label = _label(args, "model")
    jobs: list[tuple[str, Any]] = []
    if "train_step" in which:
        jobs.append(
            (
                "train_step",
                lambda: bench.bench_train_step(
                    model,
                    batch_size=args.batch_size,
                    mesh_config=mesh,
                    text_length=args.text_length,
                    steps=steps(10),
                    warmup=warmup(2),
                    peak_flops=args.peak_flops,
                    num_micro_batches=args.num_micro_batches,
                    num_devices=args.num_devices,
                    profile_dir=args.profile_dir,
                    seed=args.seed,
                    label=label,
                ),
            )
        )
    if "sample" in which:
        scales = {"both": (None, args.guidance_scale), "on": (args.guidance_scale,)}
        for scale in scales.get(args.guidance, (None,)):
            jobs.append(
                (
                    "sample",
                    lambda scale=scale: bench.bench_sample(
                        model,
                        num_prompts=args.num_prompts,
                        guidance_scale=scale,
                        text_length=args.text_length,
                        steps=steps(3),
                        warmup=warmup(1),
                        memory_bandwidth=args.memory_bandwidth,
                        cast_weights=not args.float32_weights,
                        seed=args.seed,
                        label=label,
                    ),
                )
            )
    if "vqgan" in which:
        jobs.append(
            (
                "vqgan",
                lambda: bench.bench_vqgan(
                    vqgan,
                    batch_size=args.vqgan_batch_size,
                    steps=steps(5),
                    warmup=warmup(1),
                    cast_weights=not args.float32_weights,
                    seed=args.seed,
                    label=_label(args, "vqgan"),
                ),
            )
        )
    if "input" in which:
        jobs.append(
            (
                "input",
                lambda: bench.bench_input(
                    model,
                    batch_size=args.input_batch_size,
                    num_batches=steps(20),
                    warmup=warmup(3),
                    codes_dir=args.codes_dir,
                    num_examples=args.input_examples,
                    text_length=args.text_length,
                    num_threads=args.input_threads,
                    seed=args.seed,
                    label=label,
                ),
            )
        )
    return jobs


_MEMORY_CHILD = "PARTI_JAX_MEMORY_CHILD"


def _memory_setup(args: argparse.Namespace, bindings: Sequence[str]) -> dict[str, Any]:
    """The train_memory arguments from a run file's gin (train.*, MeshConfig, HardwareTarget)."""
    if not _gin_available():
        raise BenchmarkUsageError(
            "benchmark memory reads a run file's train.* bindings: install gin-config"
        )
    import gin
    from parti_jax.cli import flags

    try:
        flags.setup_gin(
            flags.CommonArgs(
                gin_files=list(args.gin_file),
                gin_bindings=list(bindings),
                gin_search_paths=list(args.gin_search_path),
                workdir=None,
                namespace=argparse.Namespace(),
            )
        )
    except flags.UsageError as e:
        raise BenchmarkUsageError(str(e)) from e

    def train_param(name: str, default: Any = None, required: bool = False) -> Any:
        try:
            return gin.query_parameter(f"train.{name}")
        except ValueError:
            if required:
                raise BenchmarkUsageError(
                    f"benchmark memory: no train.{name} binding; pass a run file, e.g. "
                    "--gin_file=runs/parti_350m_dp.gin"
                ) from None
            return default

    def build(name: str) -> Any:
        try:
            return gin.get_configurable(name)()
        except (ValueError, TypeError) as e:
            raise BenchmarkUsageError(f"{name}: {str(e).splitlines()[0]}") from e

    return dict(
        config=build("ModelConfig"),
        target=build("HardwareTarget"),
        mesh_config=build("MeshConfig"),
        optimizer_config=build("OptimizerConfig"),
        batch_size=int(train_param("batch_size", required=True)),
        text_length=int(train_param("text_length", 128)),
        num_micro_batches=int(train_param("num_micro_batches", 1)),
        loss_chunk_size=train_param("loss_chunk_size"),
    )


def _memory(args: argparse.Namespace, bindings: Sequence[str], argv: Sequence[str]) -> int:
    """`benchmark memory`: per-device memory of a run file's train step on its HardwareTarget.

    Prints one JSON line per method; exits 1 when an estimate exceeds 90% of
    the target's device memory. The compiled method runs in a subprocess with
    the target's device count faked on CPU (XLA:CPU buffer assignment).
    """
    import os
    import subprocess

    from parti_jax import memory

    setup = _memory_setup(args, bindings)
    target = setup["target"]
    methods = ("analytic", "compiled") if args.method == "both" else (args.method,)
    fits = True
    for method in methods:
        if method == "compiled" and os.environ.get(_MEMORY_CHILD) != "1":
            env = dict(os.environ)
            env.update(
                {
                    _MEMORY_CHILD: "1",
                    "JAX_PLATFORMS": "cpu",
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={target.num_devices}",
                }
            )
            rest = [a for a in argv if not a.startswith("--method")]
            proc = subprocess.run(
                [sys.executable, "-m", "parti_jax.cli.benchmark", *rest, "--method=compiled"],
                env=env,
                check=False,
            )
            fits = fits and proc.returncode == 0
            continue
        try:
            if method == "analytic":
                est = memory.train_memory(**setup)
            else:
                kwargs = {k: v for k, v in setup.items() if k != "target"}
                est = memory.compiled_train_memory(**kwargs, num_devices=target.num_devices)
        except ValueError as e:
            raise BenchmarkUsageError(str(e)) from e
        ok = est.fits(target)
        fits = fits and ok
        _emit(
            {
                "benchmark": "memory",
                "model": args.label or "+".join(Path(f).stem for f in args.gin_file),
                "method": est.method,
                "target": target.name,
                "num_devices": target.num_devices,
                "device_memory_gib": target.device_memory_gib,
                "mesh": dict(est.mesh),
                "rules": setup["mesh_config"].rules,
                "batch_size": setup["batch_size"],
                "batch_per_device": est.batch_per_device,
                "num_micro_batches": setup["num_micro_batches"],
                "micro_batch_per_device": est.micro_batch_per_device,
                "remat_policy": setup["config"].remat_policy,
                "gib_per_device": est.gib(),
                "fits_90_percent": ok,
            },
            args.output,
        )
    return 0 if fits else 1


def run_benchmarks(argv: Sequence[str]) -> int:
    """Parses flags and gin, runs the benchmarks, prints JSON lines; 1 if any failed."""
    bindings, rest = _split_gin_bindings(argv)
    args = _parser().parse_args(rest)
    if args.which == "memory":
        return _memory(args, bindings, argv)
    configs, bound = load_configs(args.gin_file, bindings, args.gin_search_path)
    failed = 0
    for name, thunk in _run(args, configs, bound):
        try:
            result = thunk()
        except BenchmarkUsageError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded as a result line (e.g. out of memory)
            from parti_jax import benchmark as bench

            failed += 1
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
            result = {
                "benchmark": name,
                "model": _label(args, name),
                **bench.environment(),
                "error": message[:2000],
            }
        for r in result if isinstance(result, list) else [result]:
            _emit(r, args.output)
    return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
    """Entry point of `parti-jax benchmark` (dispatched by parti_jax.cli.main)."""
    try:
        return run_benchmarks(argv)
    except BenchmarkUsageError as e:
        if _gin_available():
            from parti_jax.cli import flags

            raise flags.UsageError(str(e)) from e
        print(f"parti-jax benchmark: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m parti_jax.cli.benchmark ...`: the same command on a host without gin-config.
    sys.exit(main(sys.argv[1:]))
