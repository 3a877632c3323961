"""StyleGAN-style discriminator: shapes, logical axes, downsampling, minibatch stddev, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax import partitioning
from parti_jax.partitioning import CONV_HEIGHT, CONV_IN, CONV_OUT, CONV_WIDTH
from parti_jax.vqgan.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    downsample,
    minibatch_stddev,
)

TINY = DiscriminatorConfig(base_channels=8, max_channels=16, mbstd_group_size=2)


def _images(n: int = 4, size: int = 32) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).random((n, size, size, 3), dtype=np.float32))


@pytest.mark.parametrize("blur", [True, False])
def test_logits_shape_and_input_gradient(blur):
    model = Discriminator(dataclasses.replace(TINY, blur=blur))
    x = _images()
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    # 32 -> 4: three residual down blocks, channels doubling up to the cap.
    params = variables["params"]
    assert [k for k in params if k.startswith("block_")] == ["block_0", "block_1", "block_2"]
    assert params["block_2"]["conv_1"]["kernel"].value.shape[-1] == 16
    grads = jax.jit(jax.grad(lambda im: jnp.sum(model.apply(variables, im))))(x)
    assert float(jnp.abs(grads).sum()) > 0  # R1 has something to penalise


def test_every_parameter_has_logical_axes():
    variables = jax.eval_shape(Discriminator(TINY).init, jax.random.key(0), _images())
    assert partitioning.params_without_axes(variables) == []
    conv = variables["params"]["block_0"]["conv_0"]["kernel"]
    assert conv.names == (CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT)


def test_downsample_preserves_constants_and_halves():
    x = jnp.full((2, 8, 8, 3), 0.7)
    for blur in (True, False):
        y = downsample(x, blur)
        assert y.shape == (2, 4, 4, 3)
        np.testing.assert_allclose(y, 0.7, rtol=1e-6)
    # Blur antialiases: a one-pixel checkerboard (pure Nyquist) nearly vanishes.
    checker = jnp.asarray((np.indices((8, 8)).sum(0) % 2)[None, :, :, None], jnp.float32)
    assert float(jnp.std(downsample(checker, True))) < float(jnp.std(checker)) * 0.2


def test_minibatch_stddev():
    same = jnp.ones((4, 2, 2, 3))
    out = minibatch_stddev(same, 2)
    assert out.shape == (4, 2, 2, 4)
    np.testing.assert_allclose(out[..., 3], 1e-4, atol=1e-4)
    varied = minibatch_stddev(_images(4, 2), 4)
    assert float(varied[..., 3].min()) > 0.05
    with pytest.raises(ValueError, match="mbstd_group_size=4"):
        minibatch_stddev(jnp.ones((6, 2, 2, 3)), 4)


def test_bad_resolution_is_named():
    model = Discriminator(TINY)
    with pytest.raises(ValueError, match=r"\(2, 24, 24, 3\).*final_resolution=4"):
        model.init(jax.random.key(0), jnp.zeros((2, 24, 24, 3)))


def test_sharded_init_on_a_mesh(cpu_devices):
    mesh = partitioning.create_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
    rules = partitioning.get_rules("fsdp_tp")
    variables, _ = partitioning.sharded_init(
        Discriminator(TINY).init, mesh, rules, jax.random.key(0), _images()
    )
    dense = variables["params"]["head_dense"]["kernel"]
    assert dense.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
