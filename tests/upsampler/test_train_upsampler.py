"""Upsampler training: pairs, a short run that lowers the loss, checkpoints/resume/meta, the CLI.

The tiny pipeline fixture (tests/pipeline_fixtures.py) supplies a VQGAN for
the reconstruction-input tests; the loss test trains on clean downsamples of
the shapes world (no VQGAN, no TensorFlow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gin
from parti_jax.loading import load_upsampler
from parti_jax.train import metrics as metrics_lib
from parti_jax.train.loop import LoopConfig
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.synthetic import ShapesPixelsIterator
from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.data import ReconstructionPairs, area_downsample
from parti_jax.upsampler.inference import META_FILE
from parti_jax.upsampler.train import train_upsampler
from parti_jax.vqgan.losses import LossConfig

pytest_plugins = ["tests.pipeline_fixtures"]

# 16 -> 32: one 2x stage; targets are the shapes world at its 32px minimum.
SMALL = UpsamplerConfig(scale=2, input_size=16, num_blocks=1, channels=8, expansion=2)
NO_GAN = LossConfig(perceptual_weight=0.0, adversarial_weight=0.0)


def test_area_downsample_averages_blocks():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    low = area_downsample(images, 2)
    assert low.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(low[0, 0, 0], images[0, :2, :2].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="factor 3"):
        area_downsample(images, 3)


def test_reconstruction_pairs_and_their_errors(tmp_path):
    source = ShapesPixelsIterator(batch_size=2, image_size=32, split="validation")
    pairs = ReconstructionPairs(
        source, output_size=32, scale=2, reconstruct_fn=lambda low: 1.0 - low
    )
    batch = next(pairs)
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    np.testing.assert_allclose(batch["reconstruction"], 1.0 - area_downsample(batch["image"], 2))
    # The data position passes through (checkpointable like the wrapped iterator).
    pairs.save(str(tmp_path / "pos"))
    again = ShapesPixelsIterator(batch_size=2, image_size=32, split="validation")
    again.restore(str(tmp_path / "pos"))
    np.testing.assert_array_equal(next(again)["image"], next(pairs)["image"])
    wrong = ReconstructionPairs(
        ShapesPixelsIterator(batch_size=2, image_size=64), output_size=32, scale=2, where="t"
    )
    with pytest.raises(ValueError, match=r"t: images have shape \(64, 64, 3\).*32x32"):
        next(wrong)


def test_short_training_lowers_loss_checkpoints_and_resumes(tmp_path):
    workdir = tmp_path / "up"
    kwargs = dict(
        workdir=str(workdir),
        upsampler_config=SMALL,
        batch_size=8,
        loss_config=NO_GAN,
        generator_optimizer=OptimizerConfig.adamw_defaults(learning_rate=2e-3, warmup_steps=1),
    )
    loop = dict(log_every=1, checkpoint_every=10, async_checkpoints=False, eval_every=20)
    result = train_upsampler(loop=LoopConfig(num_steps=20, **loop), eval_steps=1, **kwargs)
    assert result.status == "done" and result.step == 20
    logged = metrics_lib.read_metrics(workdir / "metrics.jsonl")
    (evaluated,) = [r for r in logged if "eval/psnr" in r]
    assert evaluated["step"] == 20 and np.isfinite(evaluated["eval/psnr_gain"])
    rows = [r for r in logged if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    last = rows[-1]
    # PSNR of the prediction and of the bicubic baseline on the same inputs.
    assert {"psnr", "bicubic_psnr", "psnr_gain", "l2", "clean_share"} <= set(last)
    assert last["clean_share"] == 1.0  # no VQGAN: every input is a clean downsample
    assert last["psnr"] > rows[0]["psnr"]

    meta = json.loads((workdir / META_FILE).read_text())
    assert meta["input_size"] == 16 and meta["output_size"] == 32
    assert meta["upsampler_config"]["channels"] == 8 and meta["codebook_hash"] is None
    loaded = load_upsampler(workdir)
    assert loaded.step == 20 and loaded.config == SMALL
    up = loaded.make_upsample_fn()(loaded.params, np.full((1, 16, 16, 3), 0.5, np.float32))
    assert up.shape == (1, 32, 32, 3) and float(up.min()) >= 0.0 and float(up.max()) <= 1.0

    # Resume: continues from step 20 with the saved data position.
    resumed = train_upsampler(loop=LoopConfig(num_steps=22, **loop), **kwargs)
    assert resumed.step == 22
    steps = [r["step"] for r in metrics_lib.read_metrics(workdir / "metrics.jsonl")]
    assert steps[-2:] == [21, 22]


def test_vqgan_resolution_must_match_upsampler_input(tiny_pipeline, tmp_path):
    big_input = UpsamplerConfig(scale=2, input_size=32, num_blocks=1, channels=8)
    with pytest.raises(ValueError, match=r"makes 16px images but UpsamplerConfig.input_size=32"):
        train_upsampler(
            workdir=str(tmp_path),
            upsampler_config=big_input,
            batch_size=8,
            loop=LoopConfig(num_steps=1),
            loss_config=NO_GAN,
            vqgan_path=tiny_pipeline["vqgan"],
        )


def test_fixture_upsampler_trained_on_vqgan_reconstructions(tiny_pipeline):
    """The fixture's run: inputs were VQGAN reconstructions (25% clean); the meta records it."""
    workdir = tiny_pipeline["upsampler"]
    meta = json.loads(Path(workdir, META_FILE).read_text())
    vqgan = json.loads(Path(tiny_pipeline["vqgan"], "vqgan_meta.json").read_text())
    assert meta["codebook_hash"] == vqgan["codebook_hash"]
    assert meta["vqgan"]["image_size"] == meta["input_size"] == 16
    assert meta["output_size"] == 64 and meta["clean_fraction"] == 0.25
    last = metrics_lib.read_metrics(f"{workdir}/metrics.jsonl")[-1]
    assert 0.0 <= last["clean_share"] < 1.0 and np.isfinite(last["bicubic_psnr"])


def test_cli_tiny_gin_with_discriminator(tmp_path):
    """`parti-jax train-upsampler --gin_file=runs/tiny_upsampler.gin`: GAN terms switch on."""
    from parti_jax.cli import main as cli

    workdir = tmp_path / "tiny"
    try:
        code = cli.main(
            [
                "train-upsampler",
                "--gin_file=runs/tiny_upsampler.gin",
                f"--workdir={workdir}",
                "--gin.train_upsampler/LoopConfig.num_steps=4",
                "--gin.train_upsampler/LoopConfig.log_every=1",
                "--gin.train_upsampler/LoopConfig.checkpoint_every=4",
                "--gin.LossConfig.adversarial_start_step=2",
                "--gin.LossConfig.r1_gamma=0.0",  # R1 is tested with the losses; saves compile time
            ]
        )
    finally:
        gin.clear_config()
    assert code == 0
    rows = metrics_lib.read_metrics(workdir / "metrics.jsonl")
    assert [r["adversarial_on"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert rows[0]["disc_loss"] == 0.0 and rows[-1]["disc_loss"] > 0.0
    assert (workdir / "checkpoints" / "4").is_dir() and (workdir / "operative_config.gin").exists()


def test_cli_requires_workdir_and_gin(capsys):
    from parti_jax.cli import main as cli

    assert cli.main(["train-upsampler", "--gin_file=runs/tiny_upsampler.gin"]) == 2
    assert "--workdir is required" in capsys.readouterr().err
