"""StyleGAN-style discriminator for the VQGAN and upsampler adversarial losses.

ViT-VQGAN trains against a StyleGAN discriminator (arXiv 2110.04627, §3.3):
a 1x1 "from RGB" conv, residual blocks that each halve the resolution
(conv3x3 -> lrelu -> conv3x3 -> lrelu -> downsample, plus a downsampled 1x1
skip, summed and scaled by 1/sqrt(2)), an optional minibatch-stddev feature,
then conv3x3 -> dense -> dense to one logit per image. The downsample is a
[1, 3, 3, 1] binomial blur followed by 2x2 average pooling (antialiased), or
plain average pooling when `blur=False`. No equalised learning rate: the
trainer's Adam normalises step sizes per parameter.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.partitioning import CONV_HEIGHT, CONV_IN, CONV_OUT, CONV_WIDTH, EMBED, MLP

Array = jax.Array

_BLUR_1D = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0  # [1,3,3,1]/8 * [1,1]/2
_BLUR_POOL = np.outer(_BLUR_1D, _BLUR_1D)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Discriminator size; channels double per halving from `base_channels` up to `max_channels`."""

    # Channels of the full-resolution features (after "from RGB").
    base_channels: int = 64
    # Channel cap for the low-resolution blocks.
    max_channels: int = 512
    # Resolution (per side) at which the residual blocks stop and the head starts.
    final_resolution: int = 4
    # Antialias before each 2x downsample with a [1, 3, 3, 1] binomial blur.
    blur: bool = True
    # Group size of the minibatch-stddev feature (0 turns it off); the batch must divide it.
    mbstd_group_size: int = 4
    # Slope of the leaky ReLUs.
    leaky_slope: float = 0.2
    # Computation and parameter dtypes.
    dtype: str = "float32"
    weight_dtype: str = "float32"


def _conv(features: int, size: int, cfg: DiscriminatorConfig, name: str, bias: bool = True):
    return nn.Conv(
        features,
        (size, size),
        padding="SAME",
        use_bias=bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.weight_dtype),
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.he_normal(), (CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT)
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
        name=name,
    )


def downsample(x: Array, blur: bool) -> Array:
    """Halves H and W: [1, 3, 3, 1] blur (edge-padded) then 2x2 mean, or the mean alone.

    Blur-then-pool is one stride-2 depthwise convolution with the separable
    kernel [1, 4, 6, 4, 1] / 16 per axis (the 4-tap blur convolved with the
    2-tap mean); the edge padding (1 before, 2 after) keeps it exact.
    """
    b, h, w, c = x.shape
    if not blur:
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    kernel = jnp.asarray(np.tile(_BLUR_POOL[:, :, None, None], (1, 1, 1, c)), x.dtype)
    x = jnp.pad(x, ((0, 0), (1, 2), (1, 2), (0, 0)), mode="edge")
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(2, 2),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


def minibatch_stddev(x: Array, group_size: int) -> Array:
    """Appends one channel: the mean stddev of features across a group of images (StyleGAN)."""
    b, h, w, c = x.shape
    g = min(group_size, b)
    if b % g:
        raise ValueError(
            f"minibatch stddev: batch {b} is not divisible by DiscriminatorConfig."
            f"mbstd_group_size={group_size}; change the batch or the group size (0 disables it)"
        )
    y = x.astype(jnp.float32).reshape(g, b // g, h, w, c)
    std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)  # [b/g, h, w, c]
    stat = jnp.mean(std, axis=(1, 2, 3))  # [b/g]
    stat = jnp.tile(stat, (g,))[:, None, None, None]  # row i belongs to group i % (b/g)
    return jnp.concatenate([x, jnp.broadcast_to(stat, (b, h, w, 1)).astype(x.dtype)], axis=-1)


class ResidualDownBlock(nn.Module):
    """conv3x3 -> lrelu -> conv3x3 -> lrelu -> down, plus down -> 1x1 skip, over sqrt(2)."""

    features: int
    config: DiscriminatorConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        act = lambda v: nn.leaky_relu(v, cfg.leaky_slope)  # noqa: E731
        y = act(_conv(x.shape[-1], 3, cfg, "conv_0")(x))
        y = act(_conv(self.features, 3, cfg, "conv_1")(y))
        y = downsample(y, cfg.blur)
        skip = _conv(self.features, 1, cfg, "skip", bias=False)(downsample(x, cfg.blur))
        return (y + skip) / math.sqrt(2.0)


class Discriminator(nn.Module):
    """Images [B, H, W, 3] in [0, 1] (H = W a power-of-two multiple of final_resolution) -> logits [B]."""

    config: DiscriminatorConfig = DiscriminatorConfig()

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        b, h, w, _ = images.shape
        steps = math.log2(h / cfg.final_resolution) if h == w else -1.0
        if steps < 0 or steps != int(steps):
            raise ValueError(
                f"Discriminator: image batch {tuple(images.shape)} must be square with a side "
                f"equal to DiscriminatorConfig.final_resolution={cfg.final_resolution} times "
                "a power of two"
            )
        act = lambda v: nn.leaky_relu(v, cfg.leaky_slope)  # noqa: E731
        x = images.astype(jnp.float32) * 2.0 - 1.0
        x = act(_conv(cfg.base_channels, 1, cfg, "from_rgb")(x))
        for i in range(int(steps)):
            features = min(cfg.base_channels * 2 ** (i + 1), cfg.max_channels)
            x = ResidualDownBlock(features, cfg, name=f"block_{i}")(x)
        if cfg.mbstd_group_size:
            x = minibatch_stddev(x, cfg.mbstd_group_size)
        x = act(_conv(x.shape[-1] - (1 if cfg.mbstd_group_size else 0), 3, cfg, "head_conv")(x))
        x = x.reshape(b, -1)
        dense = lambda n, axes, name: nn.Dense(  # noqa: E731
            n,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.weight_dtype),
            kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
            name=name,
        )
        x = act(dense(x.shape[-1] // (cfg.final_resolution**2), (EMBED, MLP), "head_dense")(x))
        logits = dense(1, (MLP, None), "logits")(x)
        return logits[:, 0].astype(jnp.float32)
