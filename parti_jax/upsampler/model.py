"""WDSR-style super-resolution network (Parti's upsampler), 4x as two cascaded 2x stages.

Each 2x stage (`UpsampleStage`):
  head  conv3x3 3 -> C
  body  num_blocks WDSR-A blocks: x + s * conv3x3(C*e -> C)(relu(conv3x3(C -> C*e)(x)))
        (wide activation: the ReLU runs at expansion e times the width)
  tail  conv3x3 C -> 3 * 2 * 2, pixel shuffle to 2x
  out   tail + the 2x bicubic (or nearest) resize of the stage's input (global residual)

Parameter count (what the tests count): every weight and bias of all stages,
i.e. per stage 9*3*C + C (head) + num_blocks * (18*C*C*e + C*e + C) (body)
+ 9*C*12 + 12 (tail). With C = 128, e = 4, 12 blocks: 14.18M per stage, so
14.2M for 2x and 28.4M for 4x, against Parti's ~15M and ~30M. No text
conditioning. Images are float32 [B, H, W, 3] in [0, 1]; `__call__` returns
the unclipped prediction (for the training loss), `upsample` clips to [0, 1].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from parti_jax.partitioning import CONV_HEIGHT, CONV_IN, CONV_OUT, CONV_WIDTH
from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.vqgan.vit_vqgan import check_images

Array = jax.Array


def _conv(features: int, cfg: UpsamplerConfig, name: str, scale: float = 1.0) -> nn.Conv:
    init = nn.initializers.variance_scaling(2.0 * scale * scale, "fan_in", "truncated_normal")
    return nn.Conv(
        features,
        (3, 3),
        padding="SAME",
        dtype=cfg.compute_dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            init, (CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT)
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
        name=name,
    )


def pixel_shuffle(x: Array, factor: int) -> Array:
    """[B, H, W, C*f*f] -> [B, H*f, W*f, C] (depth-to-space)."""
    b, h, w, c = x.shape
    out = c // (factor * factor)
    x = x.reshape(b, h, w, factor, factor, out)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * factor, w * factor, out)


class WDSRBlock(nn.Module):
    """WDSR-A residual block with wide activation."""

    config: UpsamplerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        y = nn.relu(_conv(cfg.channels * cfg.expansion, cfg, "expand")(x))
        y = _conv(cfg.channels, cfg, "reduce")(y)
        return x + cfg.residual_scale * y


class UpsampleStage(nn.Module):
    """One 2x stage: [B, H, W, 3] -> [B, 2H, 2W, 3]."""

    config: UpsamplerConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        images = images.astype(jnp.float32)
        x = _conv(cfg.channels, cfg, "head")(images - 0.5)
        for i in range(cfg.num_blocks):
            x = WDSRBlock(cfg, name=f"block_{i}")(x)
        # Small init of the last conv: a fresh stage starts as the plain resize.
        x = _conv(3 * 4, cfg, "tail", scale=0.1)(x)
        b, h, w, c = images.shape
        resized = jax.image.resize(images, (b, 2 * h, 2 * w, c), method=cfg.global_residual)
        return resized + pixel_shuffle(x.astype(jnp.float32), 2)


class Upsampler(nn.Module):
    """log2(scale) cascaded 2x stages; no text conditioning."""

    config: UpsamplerConfig

    @nn.compact
    def __call__(self, images: Array, enable_dropout: bool = False) -> Array:
        """Images [B, n, n, 3] in [0, 1] -> [B, n*scale, n*scale, 3] float32, unclipped."""
        del enable_dropout  # no dropout or batch statistics
        fix = "feed the VQGAN's output size or set input_size"
        check_images(images, self.config.input_size, "UpsamplerConfig.input_size", fix)
        x = images
        for i in range(self.config.num_stages):
            x = UpsampleStage(self.config, name=f"stage_{i}")(x)
        return x

    def upsample(self, images: Array) -> Array:
        """Inference: like __call__ but clipped to [0, 1]."""
        return jnp.clip(self(images), 0.0, 1.0)
