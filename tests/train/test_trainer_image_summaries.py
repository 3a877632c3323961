"""Image summaries at eval steps, written by the one loop for each trainer: the
encoder-decoder's sample grid (samples above the captions' own images, through the
VQGAN that made the codes) and the upsampler's (input, upsampled, target) grid."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

pytest_plugins = ["tests.pipeline_fixtures"]


def _fixtures():
    """tests/pipeline_fixtures.py (imported once pytest has loaded it as a plugin)."""
    from tests import pipeline_fixtures

    return pipeline_fixtures


def _tensorboard_images(workdir: Path) -> dict[str, list[tuple[int, int, int]]]:
    """{tag: [(step, height, width)]} of the image summaries in <workdir>/tensorboard."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    return {
        tag: [(e.step, e.height, e.width) for e in acc.Images(tag)] for tag in acc.Tags()["images"]
    }


def _loop(num_steps: int):
    from parti_jax.train.loop import LoopConfig

    return LoopConfig(
        num_steps=num_steps,
        log_every=num_steps,
        eval_every=num_steps,
        checkpoint_every=num_steps,
        async_checkpoints=False,
    )


def _codes_task(codes_dir: str | Path):
    import parti_jax.tasks

    name = "image_summaries_" + hashlib.sha256(str(codes_dir).encode()).hexdigest()[:8]
    return parti_jax.tasks.register_codes_task(name, str(codes_dir), shuffle_buffer_size=16)


def _train_t2i(workdir: Path, task, **kwargs):
    from parti_jax.models.config import ModelConfig
    from parti_jax.train import t2i
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.vqgan.tokenizer import code_decoder

    fx = _fixtures()
    kwargs.setdefault("code_decoder_loader", code_decoder)
    return t2i.train(
        workdir=str(workdir),
        model_config=ModelConfig(**fx.TINY_MODEL),
        batch_size=fx.BATCH,
        loop=_loop(2),
        mesh_config=fx._mesh_config(),
        optimizer_config=OptimizerConfig(learning_rate=1e-2, min_dim_size_to_factor=16),
        task=task,
        text_length=fx.TEXT_LENGTH,
        eval_steps=1,
        eval_split="train",  # the fixture's codes have one split
        **kwargs,
    )


def test_t2i_writes_a_sample_grid_at_the_eval_step(tiny_pipeline, tmp_path, capsys):
    result = _train_t2i(tmp_path / "t2i", _codes_task(tiny_pipeline["codes"]), num_eval_samples=3)
    assert result.status == "done"
    images = _tensorboard_images(tmp_path / "t2i")
    fx = _fixtures()
    # Two rows (samples, the captions' own images) of three 16px images, 2px white padding.
    size = fx.TINY_VQGAN["image_size"]
    assert images == {"eval/samples": [(2, 2 * (size + 2) + 2, 3 * (size + 2) + 2)]}
    assert "eval samples: off" not in capsys.readouterr().out


def test_t2i_sample_grid_is_skipped_in_one_line_without_the_vqgan(tiny_pipeline, tmp_path, capsys):
    """The VQGAN named by codes_meta.json is gone: training goes on without pictures."""
    codes = tmp_path / "codes"
    shutil.copytree(tiny_pipeline["codes"], codes)
    meta = json.loads((codes / "codes_meta.json").read_text())
    meta["vqgan_checkpoint"] = str(tmp_path / "deleted_vqgan" / "checkpoints" / "6")
    (codes / "codes_meta.json").write_text(json.dumps(meta))
    result = _train_t2i(tmp_path / "t2i", _codes_task(codes))
    assert result.status == "done"
    assert _tensorboard_images(tmp_path / "t2i") == {}
    lines = [x for x in capsys.readouterr().out.splitlines() if "eval samples: off" in x]
    assert len(lines) == 1 and "deleted_vqgan" in lines[0], lines
    metrics = [json.loads(x) for x in (tmp_path / "t2i" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in m for m in metrics)


def test_upsampler_writes_input_upsampled_target_grid(tiny_pipeline, tmp_path):
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.upsampler.config import UpsamplerConfig
    from parti_jax.upsampler.train import train_upsampler
    from parti_jax.vqgan.losses import LossConfig

    fx = _fixtures()
    result = train_upsampler(
        workdir=str(tmp_path / "up"),
        upsampler_config=UpsamplerConfig(**fx.TINY_UPSAMPLER),
        batch_size=fx.BATCH,
        loop=_loop(2),
        loss_config=LossConfig(perceptual_weight=0.0, adversarial_weight=0.0),
        vqgan_path=tiny_pipeline["vqgan"],
        mesh_config=fx._mesh_config(),
        generator_optimizer=OptimizerConfig.adamw_defaults(learning_rate=1e-3, warmup_steps=1),
        eval_steps=1,
        num_grid_images=3,
    )
    assert result.status == "done"
    out = fx.TINY_UPSAMPLER["input_size"] * fx.TINY_UPSAMPLER["scale"]
    images = _tensorboard_images(tmp_path / "up")
    # Rows: the input (nearest-neighbour enlarged), the upsampled image, the target.
    assert images == {"eval/upsampled": [(2, 3 * (out + 2) + 2, 3 * (out + 2) + 2)]}
    assert np.isfinite(result.last_metrics["loss"])
