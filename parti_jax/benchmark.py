"""Speed benchmarks: train step, sampling, VQGAN, input pipeline (docs/DESIGN.md §6).

Each `bench_*` function builds its model from a config dataclass, feeds it
synthetic data already on the device, compiles once, runs `warmup` calls and
then `steps` timed calls (each ended by `jax.block_until_ready`), and returns
JSON-ready dicts: the median time and the rates derived from it, the device
and software versions, and the config knobs that change speed. BENCHMARKS.md
gives the accounting: train-step MFU from `t2i.t2i_flops_per_step` over the
devices' dense bf16 peak; sampling against the memory-bandwidth floor of
`decoding.sampling_bandwidth_floor`. Nothing here imports TensorFlow or gin
(the model benchmarks run on a host with only jax/flax/optax/orbax) except
`bench_input`.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax import storage
from parti_jax.devices import DEVICE_SPECS, device_spec  # noqa: F401 - re-exported
from parti_jax.memory import compiled_sizes
from parti_jax.models.config import ModelConfig
from parti_jax.models.layers import conv_sparse_mask, param_count

PyTree = Any


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Device, software versions, host and date: the fields every result line carries."""
    device = jax.devices()[0]
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    packages = {"jaxlib": "jaxlib", "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint"}
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        **{key: _package_version(name) for key, name in packages.items()},
        "numpy": np.__version__,
        "python": platform.python_version(),
        "host_cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": load,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # What else changes a figure: compiler flags, the default PRNG, the memory cap.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        **_cuda_versions(),
    }


def _cuda_versions() -> dict[str, Any]:
    """CUDA runtime and cuDNN versions jax loaded ({} without its CUDA plugin)."""
    try:
        from jax._src.lib import cuda_versions  # private: present with jax[cuda] only
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    versions = {}
    for name, getter in (("cuda", "cuda_runtime_get_version"), ("cudnn", "cudnn_get_version")):
        try:
            versions[name] = getattr(cuda_versions, getter)()
        except Exception:  # noqa: BLE001 - a version is a note, never a failure
            versions[name] = None
    return versions


# Kernel categories of a device profile, tried in order on the kernel's name and its
# HLO annotations (lowercase); the first match wins, anything else is 'other'.
PROFILE_CATEGORIES = (
    ("attention", ("fmha", "flash", "cudnn", "attention", "splash")),
    ("rng", ("threefry", "philox", "rng", "random")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "dot", "matmul", "convolution")),
    ("collectives", ("nccl", "all-reduce", "all_reduce", "all-gather", "reduce-scatter")),
    ("copies", ("memcpy", "memset", "copy", "transpose", "dynamic-update-slice", "concatenate")),
    ("reductions", ("reduce",)),
)


def profile_categories(trace_dir: str) -> dict[str, Any]:
    """Device kernel time of a jax.profiler trace (made with create_perfetto_trace),
    summed by PROFILE_CATEGORIES, plus 'idle': the device's span not covered by any
    kernel. Seconds per category and shares of the span; {} when the trace has no
    device ('/device:...') events (CPU runs)."""
    runs = storage.listdir(storage.join(trace_dir, "plugins", "profile"))
    traces = [storage.join(trace_dir, "plugins", "profile", run, "perfetto_trace.json.gz")
              for run in runs]  # fmt: skip
    traces = [t for t in traces if storage.exists(t)]
    if not traces:
        return {}
    data = json.loads(gzip.decompress(storage.read_bytes(traces[-1])))
    events = data["traceEvents"] if isinstance(data, dict) else data
    devices = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and str(e.get("args", {}).get("name", "")).startswith("/device:")
    }
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in devices]
    if not kernels:
        return {}
    seconds = {name: 0.0 for name, _ in PROFILE_CATEGORIES} | {"other": 0.0}
    for e in kernels:
        text = " ".join([e.get("name", ""), *map(str, e.get("args", {}).values())]).lower()
        category = next(
            (name for name, keys in PROFILE_CATEGORIES if any(k in text for k in keys)), "other"
        )
        seconds[category] += float(e.get("dur", 0.0)) * 1e-6
    # Busy time = the union of kernel intervals (streams overlap); idle = span - busy.
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in kernels)
    busy, (start, end) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > end:
            busy, start, end = busy + (end - start), a, b
        else:
            end = max(end, b)
    busy += end - start
    span = max(b for _, b in spans) - spans[0][0]
    seconds["idle"] = max(0.0, span - busy) * 1e-6
    total = span * 1e-6
    return {
        "span_s": total,
        "seconds": seconds,
        "shares": {k: (v / total if total else 0.0) for k, v in seconds.items()},
    }


def _result(benchmark: str, label: str, **fields: Any) -> dict[str, Any]:
    """A result line: the benchmark, the model's label, `environment()`, then `fields`."""
    return {"benchmark": benchmark, "model": label, **environment(), **fields}


BENCHMARKS = ("train_step", "sample", "vqgan", "input")


def parse_which(text: str) -> tuple[str, ...]:
    """'all', or one or a comma-separated list of BENCHMARKS; errors name the unknown."""
    if text == "all":
        return BENCHMARKS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(
            f"unknown benchmark {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(BENCHMARKS)}, a comma-separated list of them, or all"
        )
    return names


def emit(result: Mapping[str, Any], output: str | None = None) -> None:
    """Prints `result` as one JSON line (and appends it to `output`)."""
    line = json.dumps(result, allow_nan=False, default=str)
    print(line, flush=True)
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")


def run_benchmarks(
    jobs: Sequence[tuple[Callable[..., Any], Mapping[str, Any]]], output: str | None = None
) -> int:
    """Runs `bench_fn(**kwargs)` for each job and emits its result(s).

    A failure (e.g. out of memory at a large batch) emits a line with an
    `error` field, its traceback goes to stderr, and the others still run.
    Returns 1 if any failed, else 0.
    """
    failed = 0
    for fn, kwargs in jobs:
        try:
            results = fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - recorded as a result line
            failed += 1
            traceback.print_exc(file=sys.stderr)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            name = fn.__name__.removeprefix("bench_")
            error = f"{type(e).__name__}: {first}"[:2000]
            results = _result(name, kwargs.get("label", ""), error=error)
        for r in results if isinstance(results, list) else [results]:
            emit(r, output)
    return 1 if failed else 0


# ------------------------------------------------------------ timing


def _time_calls(fn: Callable[[], Any], *, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `fn` after `warmup` calls, each waited for."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _compile_and_time(fn: Callable, *args: Any, warmup: int, steps: int) -> tuple[Any, dict]:
    """(`fn` compiled for `args`, the fields of `_timing` for `seconds_per_batch`)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = _time_calls(lambda: compiled(*args), warmup=warmup, steps=steps)
    return compiled, _timing(times, "seconds_per_batch", compile_s, warmup=warmup)


def _timing(times: Sequence[float], name: str, compile_s: float, **before: Any) -> dict:
    """`before`, steps, compile_s, then the median (`name`), min and max of `times`."""
    stem = name.removesuffix("_s")
    return {
        **before,
        "steps": len(times),
        "compile_s": compile_s,
        name: float(statistics.median(times)),
        f"{stem}_min_s": float(min(times)),
        f"{stem}_max_s": float(max(times)),
    }


def _compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's buffer sizes of a compiled executable (what must fit on one device)."""
    return {f"compiled_{k}_bytes": v for k, v in compiled_sizes(compiled).items()}


def _device_peak_memory() -> dict[str, int]:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU has none
        stats = {}
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def _random_params(model: nn.Module, seed: int, dtype: Any, *inputs: Any) -> PyTree:
    """Unboxed random parameters of `model`, floating leaves cast to `dtype` unless None
    (inference holds weights in the compute dtype)."""
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(seed)}, *inputs)
    params = nn.meta.unbox(variables["params"])
    if dtype is None:
        return params
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def _model_fields(config: ModelConfig) -> dict[str, Any]:
    names = ("d_model", "num_encoder_layers", "num_decoder_layers", "dtype", "attention_impl")
    names += ("remat_policy", "scan_layers", "decoder_attention", "conv_kernel_size")
    names += ("conv_attention_kernel", "decode_attention_kernel")
    names += ("decode_block_size", "decode_segments", "dropout_rate", "dropout_rng_impl")
    return {"image_tokens": config.num_image_tokens, **{k: getattr(config, k) for k in names}}


def synthetic_codes_batch(
    config: ModelConfig, batch_size: int, text_length: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch with the four keys of docs/DESIGN.md §3: full-length text, random codes + 1."""
    rng = np.random.default_rng(seed)
    text = rng.integers(3, config.text_vocab_size, (batch_size, text_length), dtype=np.int32)
    text[:, -1] = 1  # EOS
    targets = rng.integers(
        1, config.codebook_size + 1, (batch_size, config.num_image_tokens), dtype=np.int32
    )
    inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": text,
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones(targets.shape, np.float32),
    }


# ------------------------------------------------------------ train step


def bench_train_step(
    model_config: ModelConfig,
    *,
    batch_size: int,
    mesh_config: Any = None,
    text_length: int | None = None,
    steps: int = 10,
    warmup: int = 2,
    peak_flops: float | None = None,
    optimizer_config: Any = None,
    num_micro_batches: int = 1,
    loss_chunk_size: int | None = None,
    num_devices: int | None = None,
    profile_dir: str | None = None,
    profile_steps: int = 3,
    seed: int = 0,
    label: str = "",
) -> dict[str, Any]:
    """Median step time, examples/s, tokens/s and MFU of `t2i.train_step` on a mesh.

    `batch_size` is global (a multiple of the mesh's data x fsdp devices);
    `mesh_config` None: all devices on 'fsdp'; `text_length` None: the model's
    max_text_length; `peak_flops` None: DEVICE_SPECS by device kind;
    `optimizer_config` None: the paper's Adafactor; `num_devices`: use the
    first N; `profile_dir`: a jax.profiler trace of `profile_steps` more steps.
    """
    from parti_jax.memory import abstract_train_step
    from parti_jax.partitioning import MeshConfig, batch_sharding
    from parti_jax.train import t2i
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.train.state import sharded_train_state

    cfg = model_config
    text_length = int(text_length or cfg.max_text_length)
    if text_length > cfg.max_text_length:
        raise ValueError(
            f"text_length={text_length} exceeds ModelConfig.max_text_length={cfg.max_text_length}"
        )
    mesh_config = mesh_config or MeshConfig()
    opt = optimizer_config or OptimizerConfig()
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    step = abstract_train_step(
        cfg,
        mesh_config=mesh_config,
        batch_size=batch_size,
        text_length=text_length,
        optimizer_config=opt,
        num_micro_batches=num_micro_batches,
        loss_chunk_size=loss_chunk_size,
        devices=devices,
    )
    mesh, key = step.mesh, jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    state, _ = sharded_train_state(
        step.task.init,
        step.task.optimizer,
        mesh=mesh,
        rules=step.rules,
        rng=jax.random.fold_in(key, 1),
        init_rng=key,
    )
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    batch = jax.device_put(
        synthetic_codes_batch(cfg, batch_size, text_length, seed), batch_sharding(mesh)
    )
    t0 = time.perf_counter()
    compiled = step.compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    with jax.set_mesh(mesh):

        def call():
            holder["state"], metrics = compiled(holder["state"], batch)
            return holder["state"], metrics

        times = _time_calls(call, warmup=warmup, steps=steps)
        _, metrics = call()
        loss = float(jax.device_get(metrics["loss"]))
        if profile_dir:
            jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
            for i in range(profile_steps):
                with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
                    jax.block_until_ready(call())
            jax.profiler.stop_trace()
    if not np.isfinite(loss):
        raise FloatingPointError(f"train_step benchmark: the loss is {loss} after {steps} steps")

    step_s = float(statistics.median(times))
    flops = float(t2i.t2i_flops_per_step(cfg, batch_size, text_length))
    peak = float(peak_flops) if peak_flops else device_spec(devices[0].device_kind)[0]
    n = mesh.size
    return _result(
        "train_step",
        label,
        mesh_devices=n,
        mesh=dict(mesh.shape),
        rules=mesh_config.rules,
        **_model_fields(cfg),
        params=param_count(state.params),
        optimizer=opt.name,
        momentum_dtype=opt.momentum_dtype,
        batch_size=batch_size,
        text_length=text_length,
        num_micro_batches=num_micro_batches,
        loss_chunk_size=loss_chunk_size,
        **_timing(times, "step_time_s", compile_s, warmup=warmup, init_s=init_s),
        examples_per_s=batch_size / step_s,
        tokens_per_s=batch_size * (text_length + cfg.num_image_tokens) / step_s,
        image_tokens_per_s=batch_size * cfg.num_image_tokens / step_s,
        flops_per_step=flops,
        tflops_per_s_per_device=flops / step_s / n / 1e12,
        peak_flops=peak,
        mfu=(flops / step_s / (n * peak)) if peak else None,
        loss=loss,
        profile_dir=profile_dir,
        profile=profile_categories(profile_dir) if profile_dir else None,
        **_compiled_memory(compiled),
        **_device_peak_memory(),
    )


# --------------------------------------------------------------- sampling


def decoder_step_params(params: Mapping[str, Any]) -> int:
    """Decoder parameters read by one cached decoding step: all but the token and position
    embeddings (gathered one row at a time) and the cross-attention key/value kernels
    (their output is cached, computed once from the prompt)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params["decoder"]))[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if names[0] in ("token_embedder", "position_embedder"):
            continue
        if "cross_attention" in names and ("key" in names or "value" in names):
            continue
        total += int(np.prod(leaf.shape))
    return total


def bench_sample(
    model_config: ModelConfig,
    *,
    num_prompts: int,
    guidance_scale: float | None = None,
    text_length: int | None = None,
    steps: int = 3,
    warmup: int = 1,
    memory_bandwidth: float | None = None,
    cast_weights: bool = True,
    seed: int = 0,
    label: str = "",
) -> dict[str, Any]:
    """Seconds to sample full token grids for `num_prompts` prompts on one device.

    One jitted call: encode the prompts, build the cache, `decoding.sample`
    over the whole grid (temperature 1, no top-k/top-p). With guidance the
    model runs 2 x num_prompts rows (the second half the `[EOS]` prompt).
    The ratio to the bandwidth floor uses `memory_bandwidth` (bytes/s; None:
    DEVICE_SPECS). `cast_weights` holds the weights in the compute dtype, as
    an inference server would; the floor counts them at that width.
    """
    from parti_jax import decoding, sampling
    from parti_jax.models.transformer import EncoderDecoder

    cfg = model_config
    text_length = int(text_length or cfg.max_text_length)
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    model = EncoderDecoder(cfg)
    text = jnp.asarray(
        synthetic_codes_batch(cfg, num_prompts, text_length, seed)["encoder_input_tokens"]
    )
    rows = num_prompts * (1 if guidance_scale is None else 2)  # guidance adds the [EOS] rows
    image = jnp.zeros((1, cfg.num_image_tokens), jnp.int32)
    dtype = cfg.compute_dtype if cast_weights else None
    params = _random_params(model, seed, dtype, text[:1], image)
    weights_dtype = jax.tree.leaves(params)[0].dtype
    prompt_ids, sample_indices = decoding.sample_ids(num_prompts, 1)

    def run(params, text):
        return sampling.sample_tokens(
            model,
            params,
            text,
            prompt_ids,
            sample_indices,
            seed=seed,
            guidance_scale=guidance_scale,
        )

    compiled, timing = _compile_and_time(run, params, text, warmup=warmup, steps=steps)
    tokens = np.asarray(compiled(params, text))
    if tokens.shape != (num_prompts, cfg.num_image_tokens) or not (
        tokens.min() >= 1 and tokens.max() <= cfg.codebook_size
    ):
        raise AssertionError(
            f"sample benchmark: tokens {tokens.shape} in [{tokens.min()}, {tokens.max()}], "
            f"expected [{num_prompts}, {cfg.num_image_tokens}] in [1, {cfg.codebook_size}]"
        )

    seconds = timing["seconds_per_batch"]
    bandwidth = memory_bandwidth or device_spec(jax.devices()[0].device_kind)[1]
    n, step_params = cfg.num_image_tokens, decoder_step_params(params)
    floor = decoding.sampling_bandwidth_floor(
        decoder_params=step_params,
        num_layers=cfg.num_decoder_layers,
        kv_width=cfg.num_heads * cfg.kv_dim,
        text_length=text_length,
        num_steps=n,
        rows=rows,
        memory_bandwidth=bandwidth or 1.0,
        param_bytes=weights_dtype.itemsize,
        cache_bytes=jnp.dtype(cfg.compute_dtype).itemsize,
        self_attention_positions=(
            float(conv_sparse_mask(cfg.image_grid, cfg.conv_kernel_size).sum())
            if cfg.decoder_attention == "conv_sparse"
            else None
        ),
    )
    # What the same run reads if every step reads the whole preallocated
    # self-attention cache (N positions) instead of its filled prefix (t + 1).
    full_cache_bytes = floor.total_bytes - floor.self_attention_bytes
    full_cache_bytes += floor.self_attention_bytes * 2 * n / (n + 1)
    # The same floor with the guidance rows' cross-attention K/V read once: those
    # rows all hold the one [EOS] prompt (the definition above counts them per row).
    unique_bytes = floor.total_bytes
    if rows > num_prompts:
        unique_bytes -= floor.cross_attention_bytes * (rows - num_prompts - 1) / rows
    return _result(
        "sample",
        label,
        **_model_fields(cfg),
        params=param_count(params),
        weights_dtype=str(weights_dtype),
        num_prompts=num_prompts,
        guidance_scale=guidance_scale,
        rows=rows,
        text_length=text_length,
        **timing,
        images_per_s=num_prompts / seconds,
        image_tokens_per_s=num_prompts * n / seconds,
        decoder_step_params=step_params,
        floor_bytes=floor.total_bytes,
        floor_weight_bytes=floor.weight_bytes,
        floor_cross_attention_bytes=floor.cross_attention_bytes,
        floor_self_attention_bytes=floor.self_attention_bytes,
        full_cache_read_bytes=full_cache_bytes,
        memory_bandwidth=bandwidth,
        floor_s=floor.seconds if bandwidth else None,
        floor_ratio=seconds / floor.seconds if bandwidth else None,
        full_cache_read_s=full_cache_bytes / bandwidth if bandwidth else None,
        floor_unique_cross_bytes=unique_bytes,
        floor_unique_cross_ratio=seconds * bandwidth / unique_bytes if bandwidth else None,
        **_compiled_memory(compiled),
    )


# ------------------------------------------------------------------ VQGAN


def bench_vqgan(
    vqgan_config: Any,
    *,
    batch_size: int,
    steps: int = 5,
    warmup: int = 1,
    cast_weights: bool = True,
    seed: int = 0,
    label: str = "",
) -> list[dict[str, Any]]:
    """Images/s of `ViTVQGAN.encode` (pixels -> codes) and `decode_codes` on one device."""
    from parti_jax.vqgan.vit_vqgan import ViTVQGAN

    cfg = vqgan_config
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = ViTVQGAN(cfg)
    rng = np.random.default_rng(seed)
    size = cfg.image_size
    images = jnp.asarray(rng.random((batch_size, size, size, 3), dtype=np.float32))
    codes = jnp.asarray(rng.integers(0, cfg.codebook_size, (batch_size, cfg.grid, cfg.grid)))
    params = _random_params(model, seed, cfg.compute_dtype if cast_weights else None, images[:1])
    results = []
    for op, method, data, stack in (
        ("encode", ViTVQGAN.encode, images, "encoder"),
        ("decode", ViTVQGAN.decode_codes, codes, "decoder"),
    ):

        def fn(params, x, method=method):
            return model.apply({"params": params}, x, method=method)

        compiled, timing = _compile_and_time(fn, params, data, warmup=warmup, steps=steps)
        fields = {"image_size": size, "patch_size": cfg.patch_size}
        fields.update({k: getattr(cfg, f"{stack}_{k}") for k in ("width", "depth")})
        results.append(
            _result(
                "vqgan",
                label,
                op=op,
                **fields,
                stack_params=param_count(params[stack]),
                dtype=cfg.dtype,
                attention_impl=cfg.attention_impl,
                weights_dtype=str(jax.tree.leaves(params)[0].dtype),
                batch_size=batch_size,
                **timing,
                images_per_s=batch_size / timing["seconds_per_batch"],
                **_compiled_memory(compiled),
            )
        )
    return results


# ----------------------------------------------------------- input pipeline


def bench_input(
    model_config: ModelConfig,
    *,
    batch_size: int,
    steps: int = 20,
    warmup: int = 3,
    codes_dir: str | None = None,
    num_examples: int = 2048,
    text_length: int | None = None,
    num_threads: int | None = None,
    seed: int = 0,
    label: str = "",
) -> dict[str, Any]:
    """Examples/s of the codes input pipeline on this host's CPU (imports TensorFlow).

    Reads `codes_dir` (a folder written by precompute-codes), or a synthetic
    folder of `num_examples` shapes-world captions with random codes of the
    model's grid and codebook, written to a temporary folder first.
    """
    import tempfile

    from parti_jax.data.benchmark_input import benchmark_input
    from parti_jax.tasks import register_codes_task

    cfg = model_config
    text_length = int(text_length or cfg.max_text_length)
    with tempfile.TemporaryDirectory(prefix="parti_jax_bench_codes_") as tmp:
        synthetic = codes_dir is None
        if synthetic:
            codes_dir = tmp
            _write_synthetic_codes(tmp, num_examples, cfg.codebook_size, cfg.image_grid, seed)
        task = register_codes_task(f"benchmark_input_{os.getpid()}", codes_dir)
        result = benchmark_input(
            task,
            "train",
            batch_size=batch_size,
            num_batches=steps,
            warmup_batches=warmup,
            feature_lengths={"inputs": text_length, "targets": cfg.num_image_tokens},
            seed=seed,
            num_threads=num_threads,
        )
    return _result(
        "input",
        label,
        codes_dir=None if synthetic else codes_dir,
        synthetic_examples=num_examples if synthetic else None,
        text_length=text_length,
        image_tokens=cfg.num_image_tokens,
        **{k: v for k, v in result.items() if k not in ("benchmark", "host")},
    )


def _write_synthetic_codes(
    codes_dir: str, num_examples: int, codebook_size: int, grid: Sequence[int], seed: int
) -> None:
    """A complete codes folder (4 shards) of shapes-world captions and random codes."""
    from parti_jax.data import codes as codes_lib
    from parti_jax.data import shapes

    rng = np.random.default_rng(seed)
    num_shards = 4
    for s in range(num_shards):
        with codes_lib.CodesShardWriter(
            codes_dir, f"bench-{s:05d}.tfrecord", codebook_size=codebook_size, grid=grid
        ) as writer:
            for i in range(s, num_examples, num_shards):
                _, caption = shapes.generate_scene(i, "train", seed)
                writer.write(f"bench-{i}", caption, rng.integers(0, codebook_size, size=grid))
    codes_lib.finalize_codes_meta(
        codes_dir,
        codebook_size=codebook_size,
        grid=grid,
        codebook_hash="benchmark",
        image_size=int(grid[0]) * 8,
        vqgan_checkpoint="none (synthetic benchmark codes)",
        vqgan_step=0,
        source_task="synthetic",
        split="train",
    )
