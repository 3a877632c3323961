"""Upsampler: output shapes for 2x/4x, Parti's parameter counts, logical axes, gin files, training.

Counted: every weight and bias of all stages (head, WDSR blocks, tail), via
jax.eval_shape (nothing allocated or compiled for the full sizes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parti_jax import partitioning
from parti_jax.models.layers import param_count
from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.model import Upsampler, pixel_shuffle
from parti_jax.vqgan.losses import LossConfig, generator_loss
from tests.models.test_sizes import gin_configurables, stated_params


def count(cfg: UpsamplerConfig) -> int:
    x = jax.ShapeDtypeStruct((1, cfg.input_size, cfg.input_size, 3), jnp.float32)
    return param_count(jax.eval_shape(Upsampler(cfg).init, jax.random.key(0), x))


@pytest.mark.parametrize("scale,paper", [(2, 15e6), (4, 30e6)])
def test_parti_parameter_counts(scale, paper):
    n = count(UpsamplerConfig(scale=scale))
    assert abs(n / paper - 1) < 0.15, f"{scale}x: {n:,} vs ~{paper:,.0f}"


@pytest.mark.parametrize(
    "name", ["upsampler/default.gin", "upsampler/shapes.gin", "upsampler/tiny.gin"]
)
def test_gin_files_state_their_counts(name):
    cfg, loss_cfg = gin_configurables(name, "UpsamplerConfig", "LossConfig")
    assert count(cfg) == stated_params(name)[0], f"{name}: update '# params'"
    assert loss_cfg.vq_weight == 0.0 and loss_cfg.logit_laplace_weight == 0.0
    if name == "upsampler/default.gin":
        assert (cfg.input_size, cfg.output_size) == (256, 1024)
        assert (cfg.num_blocks, cfg.channels) == (12, 128)


@pytest.mark.parametrize("scale", [2, 4])
def test_output_shapes(scale):
    cfg = UpsamplerConfig(scale=scale, input_size=8, num_blocks=1, channels=8, expansion=2)
    model = Upsampler(cfg)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    y = jax.eval_shape(model.apply, variables, x)
    assert y.shape == (2, 8 * scale, 8 * scale, 3) and y.dtype == jnp.float32
    assert [k for k in variables["params"]] == [f"stage_{i}" for i in range(scale // 2)]
    with pytest.raises(ValueError, match=r"\(2, 16, 16, 3\).*input_size=8"):
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))


def test_global_residual_and_clipping():
    cfg = UpsamplerConfig(scale=4, input_size=8, num_blocks=1, channels=8, expansion=2)
    model = Upsampler(cfg)
    x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32))
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))
    apply = jax.jit(model.apply, static_argnames="method")
    # With the residual branches zeroed the network is the cascaded bicubic resize.
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables)
    want = x
    for _ in range(cfg.num_stages):
        b, h, w, c = want.shape
        want = jax.image.resize(want, (b, 2 * h, 2 * w, c), "bicubic")
    np.testing.assert_allclose(apply(zero, x), want, atol=1e-5)
    out = apply(variables, x)
    assert float(jnp.abs(out - want).max()) > 1e-4  # the residual branches do something
    clipped = apply(variables, x * 3.0 - 1.0, method=Upsampler.upsample)
    assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0


def test_every_parameter_has_logical_axes():
    cfg = UpsamplerConfig(scale=4, input_size=8, num_blocks=2, channels=8, expansion=2)
    shapes = jax.eval_shape(Upsampler(cfg).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert partitioning.params_without_axes(shapes) == []
    # Per stage: head (2) + 2 blocks x (expand, reduce) x (kernel, bias) + tail (2).
    assert len(jax.tree.leaves(nn.meta.unbox(shapes))) == 2 * (2 + 2 * 4 + 2)


def test_pixel_shuffle_layout():
    x = jnp.arange(1 * 1 * 1 * 12, dtype=jnp.float32).reshape(1, 1, 1, 12)
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(y[0, 0, 1], [3, 4, 5])
    np.testing.assert_array_equal(y[0, 1, 0], [6, 7, 8])


def test_config_errors():
    with pytest.raises(ValueError, match="UpsamplerConfig.scale=3"):
        UpsamplerConfig(scale=3)
    with pytest.raises(ValueError, match="global_residual"):
        UpsamplerConfig(global_residual="lanczos")


def test_training_steps_lower_l2():
    cfg = UpsamplerConfig(scale=2, input_size=8, num_blocks=2, channels=16, expansion=2)
    model = Upsampler(cfg)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    high = np.full((4, 16, 16, 3), 0.1, np.float32)
    for i in range(4):
        cx, cy = rng.integers(4, 12, 2)
        high[i][np.abs(xx - cx) + np.abs(yy - cy) <= 4] = rng.random(3)
    low = jax.image.resize(high, (4, 8, 8, 3), "linear")
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), low)["params"])
    loss_cfg = LossConfig(perceptual_weight=0.0, adversarial_weight=0.0)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, state):
        def loss_fn(p):
            return generator_loss(high, model.apply({"params": p}, low), config=loss_cfg, step=0)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, metrics["l2"]

    state = opt.init(params)
    losses = []
    for _ in range(25):
        params, state, l2 = step(params, state)
        losses.append(float(l2))
    assert losses[-1] < 0.7 * losses[0], losses
