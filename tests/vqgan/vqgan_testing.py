"""A tiny ViT-VQGAN trained in process, for the tests of the trainer, tokenizer and codes."""

from __future__ import annotations

import dataclasses

from parti_jax.train.loop import LoopConfig
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.losses import LossConfig
from parti_jax.vqgan.train import train_vqgan
from tests.pipeline_fixtures import TINY_VQGAN

TINY = VQGANConfig(**TINY_VQGAN)
LOOP_FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}


def train_tiny(workdir, *, num_steps=2, config=TINY, **overrides):
    """train_vqgan on synthetic 16px images; LoopConfig fields may be passed as keywords."""
    loop = dict(num_steps=num_steps, log_every=1, checkpoint_every=num_steps)
    loop.update(async_checkpoints=False, tensorboard=False)
    loop.update({k: overrides.pop(k) for k in list(overrides) if k in LOOP_FIELDS})
    kwargs = dict(
        workdir=str(workdir),
        vqgan_config=config,
        batch_size=8,
        loop=LoopConfig(**loop),
        loss_config=LossConfig(perceptual_weight=0.0, adversarial_weight=0.0),
        generator_optimizer=OptimizerConfig.adamw_defaults(
            learning_rate=3e-3, warmup_steps=1, decay_end_step=100
        ),
        codebook_window=2,
    )
    kwargs.update(overrides)
    return train_vqgan(**kwargs)
