"""Factorized l2 quantizer: lookup, straight-through gradients, VQ loss, usage stats, dead codes, hash."""

from __future__ import annotations

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.vqgan.quantizer import (
    FactorizedQuantizer,
    codebook_hash,
    l2_normalize,
    reinit_dead_codes,
)

K, D_IN, CODE, D_OUT = 16, 12, 4, 10


@pytest.fixture(scope="module")
def setup():
    q = FactorizedQuantizer(codebook_size=K, code_dim=CODE, out_dim=D_OUT, beta=0.25)
    z = jax.random.normal(jax.random.key(1), (2, 8, D_IN))
    params = nn.meta.unbox(q.init(jax.random.key(0), z)["params"])
    return q, z, params


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_lookup_is_nearest_by_cosine_and_loss_matches(setup):
    q, z, params = setup
    out, aux = q.apply({"params": params}, z)
    assert out.shape == (2, 8, D_OUT)
    latents = _unit(np.asarray(z) @ np.asarray(params["in_proj"]["kernel"]))  # bias is zero at init
    codebook = _unit(params["codebook"])
    expected = np.argmax(latents @ codebook.T, axis=-1)
    np.testing.assert_array_equal(aux["codes"], expected)
    np.testing.assert_allclose(aux["latents"], latents, atol=1e-5)
    dist = np.mean((latents - codebook[expected]) ** 2)
    np.testing.assert_allclose(aux["codebook_loss"], dist, rtol=1e-4)
    np.testing.assert_allclose(aux["commitment_loss"], dist, rtol=1e-4)
    np.testing.assert_allclose(aux["vq_loss"], 1.25 * dist, rtol=1e-4)
    # The forward value is the code itself, projected up.
    up = q.apply({"params": params}, jnp.asarray(expected), method=FactorizedQuantizer.embed_codes)
    np.testing.assert_allclose(out, up, atol=1e-5)


def test_usage_statistics(setup):
    q, z, params = setup
    _, aux = q.apply({"params": params}, z)
    codes = np.asarray(aux["codes"]).reshape(-1)
    counts = np.bincount(codes, minlength=K)
    np.testing.assert_array_equal(aux["code_counts"], counts)
    p = counts[counts > 0] / counts.sum()
    np.testing.assert_allclose(aux["perplexity"], np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    np.testing.assert_allclose(aux["usage"], np.count_nonzero(counts) / K)


def test_straight_through_gradients(setup):
    q, z, params = setup
    weights = jax.random.normal(jax.random.key(2), (2, 8, D_OUT))

    def recon_loss(p, z):
        out, _ = q.apply({"params": p}, z)
        return jnp.sum(out * weights)

    g_params, g_z = jax.jit(jax.grad(recon_loss, argnums=(0, 1)))(params, z)
    # The decoder's gradient reaches the quantizer input (the encoder) ...
    assert float(jnp.abs(g_z).sum()) > 1e-3
    assert float(jnp.abs(g_params["in_proj"]["kernel"]).sum()) > 1e-3
    # ... but not the codebook: it learns only from the VQ term.
    assert float(jnp.abs(g_params["codebook"]).max()) == 0.0

    def vq(p):
        return q.apply({"params": p}, z)[1]["vq_loss"]

    g_vq = jax.jit(jax.grad(vq))(params)
    used = np.unique(np.asarray(q.apply({"params": params}, z)[1]["codes"]))
    row_norms = np.abs(np.asarray(g_vq["codebook"])).sum(-1)
    assert np.all(row_norms[used] > 0)
    assert np.all(row_norms[np.setdiff1d(np.arange(K), used)] == 0)


def test_reinit_dead_codes():
    codebook = jax.random.normal(jax.random.key(0), (K, CODE))
    counts = jnp.asarray([5.0, 0.0, 2.0, 0.0] * 4)
    latents = jax.random.normal(jax.random.key(1), (3, 5, CODE))
    new, dead = jax.jit(reinit_dead_codes)(codebook, counts, latents, jax.random.key(2), 1.0)
    assert new.shape == codebook.shape and new.dtype == codebook.dtype
    np.testing.assert_array_equal(dead, np.asarray(counts) < 1.0)
    np.testing.assert_array_equal(new[~dead], codebook[~dead])
    candidates = np.asarray(l2_normalize(latents.reshape(-1, CODE)))
    for row in np.asarray(new[dead]):
        assert np.min(np.abs(candidates - row).max(-1)) < 1e-6, "dead code not set to a latent"
    # A higher threshold also restarts rarely used codes.
    _, dead = jax.jit(reinit_dead_codes)(codebook, counts, latents, jax.random.key(2), 3.0)
    assert int(dead.sum()) == 12
    with pytest.raises(ValueError, match="one count per code"):
        reinit_dead_codes(codebook, counts[:3], latents, jax.random.key(2))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 4\]"):
        reinit_dead_codes(codebook, counts, jnp.zeros((3, 7)), jax.random.key(2))


def test_codebook_hash(setup):
    q, z, _ = setup
    boxed = q.init(jax.random.key(0), z)
    codebook = np.asarray(nn.meta.unbox(boxed["params"]["codebook"]), np.float32)
    want = hashlib.sha256(codebook.astype("<f4").tobytes()).hexdigest()[:16]
    assert codebook_hash(codebook) == want
    assert codebook_hash(boxed) == want  # any variables tree, boxed
    assert codebook_hash({"params": {"quantizer": nn.meta.unbox(boxed["params"])}}) == want
    assert codebook_hash(codebook.astype(">f4")) == want  # byte order is fixed
    assert codebook_hash(codebook + 1e-3) != want
    assert len(want) == 16
    with pytest.raises(ValueError, match="no 'codebook' entry"):
        codebook_hash({"params": {"encoder": {}}})


def test_reinit_prefers_badly_represented_latents():
    codebook = jnp.eye(CODE)[jnp.arange(K) % CODE] * 2.0  # rows along the axes
    counts = jnp.zeros((K,)).at[0].set(50.0)  # only code 0 (axis 0) is alive
    easy = jnp.tile(jnp.eye(CODE)[:1], (100, 1))  # well represented by code 0
    hard = -jnp.eye(CODE)[:1] + 0.1 * jnp.eye(CODE)[1:2]  # far from code 0
    latents = jnp.concatenate([easy, hard], axis=0)
    new, dead = jax.jit(reinit_dead_codes)(codebook, counts, latents, jax.random.key(0))
    want = np.asarray(l2_normalize(hard))[0]
    np.testing.assert_allclose(
        np.asarray(new)[np.asarray(dead)], np.tile(want, (K - 1, 1)), atol=1e-6
    )
    # Uniform sampling mostly picks the frequent easy latents instead.
    new_u, _ = reinit_dead_codes(codebook, counts, latents, jax.random.key(0), weighted=False)
    assert np.mean(np.abs(np.asarray(new_u)[1:] - np.eye(CODE)[0]).max(-1) < 1e-6) > 0.8
