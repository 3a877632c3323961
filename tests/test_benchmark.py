"""`parti-jax benchmark`: JSON lines from every benchmark, error lines, usage errors, the
FLOP count, a run without TensorFlow (parti_jax.benchmark, parti_jax.cli.benchmark)."""

import argparse
import gzip
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax import benchmark as bench
from parti_jax.cli import main as cli_main
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder
from parti_jax.train.t2i import t2i_flops_per_step

TINY = ["--gin_file=models/tiny.gin", "--gin_file=vqgan/tiny.gin"]
FAST = ["--steps=2", "--warmup=1", "--num_prompts=2", "--vqgan_batch_size=2"]
# One device keeps the compiles short (sharded train steps are tested in tests/train).
FAST += ["--batch_size=2", "--num_devices=1", "--mesh=data=1,fsdp=1,tensor=1"]
# A binding on top of the size file (both tests use it, so the subprocess finds the
# in-process test's executables in the persistent compile cache).
FAST += ["--gin.ModelConfig.num_decoder_layers=2"]
ENV_KEYS = (
    "device",
    "platform",
    "device_count",
    "jax",
    "flax",
    "optax",
    "date",
    "xla_flags",
    "prng_impl",
)
POSITIVE = {
    "train_step": (
        "step_time_s",
        "examples_per_s",
        "tokens_per_s",
        "flops_per_step",
        "mfu",
        "compile_s",
    ),
    "sample": ("seconds_per_batch", "images_per_s", "floor_bytes", "floor_s", "floor_ratio"),
    "vqgan": ("seconds_per_batch", "images_per_s", "stack_params"),
    "input": ("examples_per_s", "tokens_per_s", "batch_seconds_median"),
}


def _lines(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def _check(result):
    assert "error" not in result, result.get("error")
    for key in ENV_KEYS:
        assert key in result, key
    assert isinstance(result["device"], str) and result["device"]
    assert isinstance(result["device_count"], int) and result["device_count"] >= 1
    for key in POSITIVE[result["benchmark"]]:
        value = result[key]
        assert isinstance(value, int | float) and np.isfinite(value) and value > 0, (key, value)


def test_all_benchmarks_print_json_lines(capsys, tmp_path):
    out = tmp_path / "results.jsonl"
    code = cli_main.main(
        [
            "benchmark",
            "all",
            *TINY,
            *FAST,
            "--peak_flops=1e13",
            "--memory_bandwidth=1e10",
            "--input_batch_size=8",
            "--input_examples=32",
            f"--output={out}",
        ]
    )
    assert code == 0
    results = _lines(capsys.readouterr().out)
    kinds = [(r["benchmark"], r.get("guidance_scale"), r.get("op")) for r in results]
    assert kinds == [
        ("train_step", None, None),
        ("sample", None, None),
        ("sample", 1.2, None),
        ("vqgan", None, "encode"),
        ("vqgan", None, "decode"),
        ("input", None, None),
    ]
    for r in results:
        _check(r)
    train, plain, guided = results[0], results[1], results[2]
    assert 0 < train["mfu"] <= 1
    tiny = _gin_configs("models/tiny.gin")["ModelConfig"].replace(num_decoder_layers=2)
    assert train["num_decoder_layers"] == 2  # the --gin. binding reached the model
    assert train["flops_per_step"] == t2i_flops_per_step(tiny, 2, 16)
    assert train["mesh_devices"] == 1 and np.isfinite(train["loss"])
    assert train["tokens_per_s"] == pytest.approx(train["examples_per_s"] * (16 + 16))
    # Guidance doubles the rows, so the cache part of the floor doubles; weights do not.
    assert (plain["rows"], guided["rows"]) == (2, 4)
    assert guided["floor_weight_bytes"] == plain["floor_weight_bytes"]
    assert guided["floor_self_attention_bytes"] == 2 * plain["floor_self_attention_bytes"]
    assert plain["full_cache_read_bytes"] > plain["floor_bytes"]
    # With 2 prompts the 2 [EOS] rows' cross-attention K/V count once, not twice.
    assert plain["floor_unique_cross_bytes"] == plain["floor_bytes"]
    once = guided["floor_bytes"] - guided["floor_cross_attention_bytes"] / 4
    assert guided["floor_unique_cross_bytes"] == pytest.approx(once)
    assert [json.loads(line) for line in out.read_text().splitlines()] == results


def test_failures_become_error_lines(capsys):
    # 8 CPU devices on fsdp cannot split a batch of 3: an error line, exit 1, no traceback out.
    code = cli_main.main(["benchmark", "train_step", *TINY, "--batch_size=3", "--steps=1"])
    assert code == 1
    (result,) = _lines(capsys.readouterr().out)
    assert result["benchmark"] == "train_step" and "batch_size=3" in result["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["vqgan", "--gin_file=models/tiny.gin"], "VQGANConfig"),
        (["train_step", "--gin_file=vqgan/tiny.gin"], "ModelConfig"),
        (["train_step,decode", *TINY], "unknown benchmark decode"),
        (["train_step", *TINY, "--mesh=data=2,model=4"], "--mesh=data=2,model=4"),
        (["train_step", *TINY, "--remat_policy=sometimes"], "remat_policy='sometimes'"),
    ],
)
def test_usage_errors_name_the_flag(capsys, args, message):
    assert cli_main.main(["benchmark", *args]) == 2
    assert message in capsys.readouterr().err


def test_model_benchmarks_run_without_tensorflow():
    # An accelerator host without TensorFlow: `python -m parti_jax.cli.benchmark` (what
    # scripts/gpu_benchmark.sh runs) must not import TensorFlow or seqio for these.
    script = (
        "import sys\n"
        "for name in ('tensorflow', 'seqio'):\n"
        "    sys.modules[name] = None\n"
        "sys.argv[0] = 'benchmark'\n"
        "import runpy\n"
        "runpy.run_module('parti_jax.cli.benchmark', run_name='__main__')\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    args = ["train_step,sample,vqgan", *TINY, *FAST, "--guidance=on", "--peak_flops=1e13"]
    args += ["--memory_bandwidth=1e10"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _lines(proc.stdout)
    assert [r["benchmark"] for r in results] == ["train_step", "sample", "vqgan", "vqgan"]
    for r in results:
        _check(r)
    assert results[0]["num_decoder_layers"] == 2  # the --gin. binding reached the model


# ------------------------------------------------------------------ FLOPs


def test_flops_per_step_matches_a_count_by_hand_for_tiny():
    cfg = ModelConfig(
        text_vocab_size=256,
        codebook_size=64,
        image_grid=(4, 4),
        max_text_length=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
        d_model=32,
        mlp_dim=64,
        num_heads=2,
        dtype="float32",
    )
    lt, n, batch = 8, 16, 2  # text tokens, image tokens (4x4), examples
    # Encoder layer: Q,K,V,O (4 x 32x32) and MLP (32x64, 64x32) over 8 text tokens,
    # plus QK^T and AV (2 matmuls of 8x8x32).
    enc = 2 * lt * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * lt * lt * 32
    # Decoder layer: self-attention projections + MLP over 16 image tokens; causal
    # scores counted on the lower triangle with the diagonal (16*17/2 pairs);
    # cross-attention Q,O over image tokens, K,V over text tokens, 16x8 scores.
    dec = (
        2 * n * (4 * 32 * 32 + 2 * 32 * 64)
        + 2 * 2 * (n * (n + 1) // 2) * 32
        + 2 * n * (2 * 32 * 32)
        + 2 * lt * (2 * 32 * 32)
        + 2 * 2 * n * lt * 32
    )
    logits = 2 * n * 32 * 128  # decoder vocab 65 padded to 128
    assert (enc, dec, logits) == (139264, 394240, 131072)
    expected = 3 * (enc + dec + logits) * batch
    assert t2i_flops_per_step(cfg, batch, lt) == expected
    # Conv-shaped attention (3x3 window) counts only the keys each query sees: the
    # first cell sees BOS; the rest of row 0 its left cell (3); each lower row
    # 2 + 4 + 4 + 3 (left cell + up to 3 above): 43 pairs instead of 136.
    conv = cfg.replace(decoder_attention="conv_sparse", conv_kernel_size=3)
    saved = 3 * 2 * 2 * (n * (n + 1) // 2 - 43) * 32 * batch
    assert t2i_flops_per_step(conv, batch, lt) == expected - saved

    # The same count from the model's real parameter shapes: every kernel times the
    # tokens that flow through it (embeddings excluded), plus the score matmuls.
    model = EncoderDecoder(cfg)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.ones((1, lt), jnp.int32), jnp.zeros((1, n), jnp.int32)
    )
    matmul = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["params"]))[0]:
        names = [str(p.key) for p in path]
        if names[-1] != "kernel":
            continue
        size = int(np.prod(leaf.shape))
        if names[0] == "encoder" or "cross_attention" in names and names[-2] in ("key", "value"):
            tokens = lt
        else:
            tokens = n
        matmul += 2 * size * tokens
    scores = 2 * 2 * lt * lt * 32 + 2 * 2 * (n * (n + 1) // 2) * 32 + 2 * 2 * n * lt * 32
    assert 3 * (matmul + scores) * batch == expected


def test_decoder_step_params_leaves_out_embeddings_and_cross_kv():
    cfg = ModelConfig(
        text_vocab_size=256,
        codebook_size=64,
        image_grid=(4, 4),
        max_text_length=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
        d_model=32,
        mlp_dim=64,
        num_heads=2,
        dtype="float32",
    )
    shapes = jax.eval_shape(
        EncoderDecoder(cfg).init,
        jax.random.key(0),
        jnp.ones((1, 4), jnp.int32),
        jnp.zeros((1, 16), jnp.int32),
    )
    # self-attention 4x32x32, cross Q and O 2x32x32, MLP 2x32x64, 3 norms (64 each),
    # final norm 64, logits 32x128.
    expected = 4 * 1024 + 2 * 1024 + 2 * 2048 + 3 * 64 + 64 + 32 * 128
    assert bench.decoder_step_params(shapes["params"]) == expected


# ---------------------------------------------------------------- devices, gin


def test_device_specs():
    assert bench.device_spec("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert bench.device_spec("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert bench.device_spec("NVIDIA H200") == (989e12, 4.8e12)
    assert bench.device_spec("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bench.device_spec("TPU v5 lite") == (197e12, 8.19e11)
    assert bench.device_spec("TPU v5") == (459e12, 2.765e12)
    assert bench.device_spec("cpu") == (None, None)


def _gin_configs(path):
    import gin
    from parti_jax.cli import flags

    flags.setup_gin(
        flags.CommonArgs(
            gin_files=[str(path)],
            gin_bindings=[],
            gin_search_paths=[],
            workdir=None,
            namespace=argparse.Namespace(),
        )
    )
    return {name: gin.get_configurable(name)() for name in ("ModelConfig", "VQGANConfig")}


def _write_trace(folder, events):
    run = folder / "plugins" / "profile" / "2026_12_07"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_profile_categories_sum_kernel_time_and_idle(tmp_path):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    ]
    kernel = lambda name, ts, dur, **args: {  # noqa: E731
        "ph": "X", "pid": 7, "tid": 1, "name": name, "ts": ts, "dur": dur, "args": args,
    }  # fmt: skip
    events = meta + [
        {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 500},  # host
        kernel("sm90_xmma_gemm_bf16", 0, 100),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 100, 50),
        kernel("loop_fusion", 150, 20, hlo_op="rng-bit-generator.3"),  # by its annotation
        kernel("input_reduce_fusion", 170, 10),
        kernel("wrapped_transpose", 200, 10),  # 20 us idle before it
        kernel("loop_add_fusion", 205, 15),  # overlaps the transpose on another stream
    ]
    _write_trace(tmp_path, events)
    table = bench.profile_categories(str(tmp_path))
    seconds = {k: round(v * 1e6, 6) for k, v in table["seconds"].items()}
    assert seconds == {
        "matmul": 100, "attention": 50, "rng": 20, "reductions": 10, "copies": 10,
        "collectives": 0, "other": 15, "idle": 20,
    }  # fmt: skip
    assert table["span_s"] == pytest.approx(220e-6)
    assert table["shares"]["matmul"] == pytest.approx(100 / 220)
    # A CPU trace has no device events.
    _write_trace(tmp_path / "cpu", meta[:1] + events[2:3])
    assert bench.profile_categories(str(tmp_path / "cpu")) == {}
    assert bench.profile_categories(str(tmp_path / "none")) == {}
