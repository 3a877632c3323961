"""The paper's run files (runs/parti_*.gin) and the per-device memory estimate.

The analytic estimate (parti_jax.memory.train_memory) is checked against XLA's
memory analysis of the compiled train step for a tiny model on the 8-device
CPU mesh: the train state exactly (to 1%), the total within 35%. The four
paper run files must parse, fit their mesh, and fit 90% of their target's
device memory analytically (no compilation of large models here).
"""

from __future__ import annotations

import argparse
import json
import re

import pytest

import gin
from parti_jax import memory
from parti_jax.cli import benchmark as benchmark_cli
from parti_jax.cli import flags
from parti_jax.cli import main as cli_main
from parti_jax.models.config import ModelConfig
from parti_jax.partitioning import MeshConfig
from parti_jax.train.optimizers import OptimizerConfig

PAPER_RUNS = {
    "runs/parti_350m_dp.gin": ("data_parallel", {"data": 64, "fsdp": 1, "tensor": 1}),
    "runs/parti_750m_dp.gin": ("data_parallel", {"data": 128, "fsdp": 1, "tensor": 1}),
    "runs/parti_3b_tp4.gin": ("fsdp_tp", {"data": 64, "fsdp": 1, "tensor": 4}),
    "runs/parti_20b_fsdp_tp.gin": ("fsdp_tp", {"data": 1, "fsdp": 128, "tensor": 4}),
}


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def _load(path: str) -> dict:
    flags.setup_gin(flags.CommonArgs([path], [], [], None, argparse.Namespace()), finalize=False)
    return benchmark_cli.run_file_setup()


@pytest.mark.parametrize("path", sorted(PAPER_RUNS))
def test_paper_run_fits_its_target(path):
    setup = _load(path)
    rules, degrees = PAPER_RUNS[path]
    assert setup["mesh_config"].rules == rules
    assert setup["batch_size"] == 8192 and setup["text_length"] == 128
    # The paper's Adafactor, with the first moment in int8.
    assert setup["optimizer_config"] == OptimizerConfig(momentum_dtype="int8")
    assert setup["config"].decoder_attention == "conv_sparse"  # the paper's attention
    with gin.config_scope("train"):
        assert gin.get_configurable("LoopConfig")().num_steps == 450_000
    est = memory.train_memory(**setup)
    assert dict(est.mesh) == degrees
    assert est.batch_per_device * degrees["data"] * degrees["fsdp"] == 8192
    assert est.fits(setup["target"]), (path, est.gib())
    # The header states the total that the estimate gives (to 0.1 GiB).
    text = (flags.gin_dir() / path).read_text()
    stated = float(re.search(r"= ([\d.]+) GiB of ([\d.]+) GiB", text).group(1))
    assert stated == pytest.approx(est.total / memory.GIB, abs=0.06), est.gib()


def test_benchmark_memory_prints_the_estimate_as_a_json_line(capsys):
    code = cli_main.main(["benchmark", "memory", "--gin_file=runs/parti_350m_dp.gin"])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert code == 0, line
    assert (line["benchmark"], line["model"], line["method"]) == (
        "memory",
        "parti_350m_dp",
        "analytic",
    )
    assert line["mesh"] == PAPER_RUNS["runs/parti_350m_dp.gin"][1] and line["fits_90_percent"]
    assert line["batch_per_device"] * 64 == line["batch_size"] == 8192


def test_state_bytes_follow_the_sharding():
    cfg = ModelConfig(
        num_encoder_layers=16, num_decoder_layers=64, d_model=4096, mlp_dim=16384, num_heads=64
    )
    fsdp = memory.state_bytes(
        cfg, OptimizerConfig(), {"data": 1, "fsdp": 128, "tensor": 4}, "fsdp_tp", 128
    )
    replicated = memory.state_bytes(
        cfg, OptimizerConfig(), {"data": 512, "fsdp": 1, "tensor": 1}, "data_parallel", 128
    )
    params_20b = 20_538_998_784  # gin/models/parti_20b.gin
    assert replicated[0] == params_20b * 4
    assert fsdp[0] == pytest.approx(params_20b * 4 / 512, rel=0.01)
    # Adafactor: the float32 first moment, factored second moments for the MLP and
    # embeddings, and full second moments for the attention kernels [embed, heads,
    # head_dim] (head_dim 64 < min_dim_size_to_factor=128): ~1.47x the parameters.
    assert params_20b * 4 * 1.4 < replicated[1] < params_20b * 4 * 1.5
    assert fsdp[1] == pytest.approx(replicated[1] / 512, rel=0.02)


def test_memory_errors_name_the_field():
    target = memory.HardwareTarget(num_devices=8)
    with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple"):
        memory.train_memory(
            ModelConfig(), target=target, mesh_config=MeshConfig(data=8, fsdp=1), batch_size=12
        )
    with pytest.raises(ValueError, match="MeshConfig data=4 x fsdp=1 x tensor=1 = 4 devices"):
        MeshConfig(data=4, fsdp=1).degrees(8)
    with pytest.raises(ValueError, match="num_heads=16 is not divisible by tensor=3"):
        memory.train_memory(
            ModelConfig(),
            target=memory.HardwareTarget(num_devices=6, devices_per_host=6),
            mesh_config=MeshConfig(data=2, fsdp=1, tensor=3, rules="fsdp_tp"),
            batch_size=12,
        )
    with pytest.raises(ValueError, match="HardwareTarget.devices_per_host=3"):
        memory.HardwareTarget(num_devices=8, devices_per_host=3)


@pytest.mark.slow
def test_analytic_estimate_matches_compiled_memory_analysis(cpu_devices):
    """A tiny model on a fsdp=4 x tensor=2 CPU mesh, remat, micro-batches, chunked loss."""
    cfg = ModelConfig(
        text_vocab_size=256, codebook_size=500, image_grid=(8, 8), max_text_length=16,
        d_model=64, num_heads=4, mlp_dim=256, num_encoder_layers=1, num_decoder_layers=2,
        dtype="float32", remat_policy="full",
    )  # fmt: skip
    kw = dict(
        mesh_config=MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp"),
        batch_size=64,
        text_length=16,
        optimizer_config=OptimizerConfig(min_dim_size_to_factor=16),
        num_micro_batches=2,
        loss_chunk_size=16,
    )
    analytic = memory.train_memory(cfg, target=memory.HardwareTarget(num_devices=8), **kw)
    compiled = memory.train_memory(cfg, target=memory.HardwareTarget(), method="compiled", **kw)
    assert dict(analytic.mesh) == dict(compiled.mesh) == {"data": 1, "fsdp": 4, "tensor": 2}
    # The state is what the compiled step takes as arguments (less the batch).
    args = compiled.compiled["argument"] - analytic.batch
    assert analytic.state == pytest.approx(args, rel=0.01)
    assert analytic.total == pytest.approx(compiled.total, rel=0.35), (
        analytic.gib(),
        compiled.compiled,
    )


def test_activation_estimate_orders_the_remat_policies_and_counts_the_conv_band():
    cfg = ModelConfig(num_encoder_layers=2, num_decoder_layers=4, d_model=256, mlp_dim=1024)

    def act(**changes):
        return memory.activation_bytes(cfg.replace(**changes), rows=4, text_length=32, tensor=1)

    full, none = act(remat_policy="full"), act(remat_policy="none")
    named = act(remat_policy="save_qkv_attention_out")
    named_mlp = act(remat_policy="save_qkv_attention_out_mlp_in")
    dots = act(remat_policy="dots_with_no_batch_dims_saveable")
    # The named policies keep Q, K, V and the context per layer: more than 'full',
    # less than keeping every matmul output. The MLP input adds one [rows, tokens,
    # d_model] bfloat16 tensor per layer: 4 decoder layers x 1024 image tokens and
    # 2 encoder layers x 32 text tokens.
    assert full < named < named_mlp < dots < none
    assert named_mlp - named == (4 * 1024 + 2 * 32) * 4 * 256 * 2
    # Conv-shaped attention's probabilities span its blocks' 228 keys, not 1024.
    assert act(decoder_attention="conv_sparse") < none
