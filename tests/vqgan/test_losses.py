"""Losses: L2, logit-Laplace, non-saturating GAN terms, R1, the weighted totals, PSNR."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.vqgan.losses import (
    LOG_B_MIN,
    LossConfig,
    discriminator_logistic_loss,
    discriminator_loss,
    generator_loss,
    l2_loss,
    logit_laplace_nll,
    non_saturating_generator_loss,
    psnr,
    r1_penalty,
)

EPS = 0.1


def _images(seed: int = 0, shape=(2, 4, 4, 3)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _best_mu(x: np.ndarray) -> np.ndarray:
    y = EPS + (1 - 2 * EPS) * x
    return np.log(y / (1 - y))


def test_l2_and_psnr():
    x = _images()
    assert float(l2_loss(x, x)) == 0.0
    assert float(l2_loss(x + 0.1, x)) == pytest.approx(0.01, rel=1e-4)
    np.testing.assert_allclose(psnr(x + 0.1, x), [20.0, 20.0], rtol=1e-4)
    assert bool(jnp.all(jnp.isinf(psnr(x, x))))


def test_logit_laplace_minimised_at_the_pixel():
    x = _images()
    mu = _best_mu(x)
    log_b = np.full_like(x, -1.0)

    def nll(mu):
        return logit_laplace_nll(jnp.concatenate([mu, log_b], -1), x, EPS)

    best = float(nll(mu))
    for delta in (-0.3, -0.01, 0.01, 0.3):
        assert float(nll(mu + delta)) > best
    # Gradient points back to the pixel from either side.
    g_hi = jax.grad(nll)(jnp.asarray(mu + 0.2))
    g_lo = jax.grad(nll)(jnp.asarray(mu - 0.2))
    assert bool(jnp.all(g_hi > 0)) and bool(jnp.all(g_lo < 0))


def test_logit_laplace_is_a_normalised_density():
    # exp(-nll) integrates to ~1 over pixel values (dy = (1 - 2 eps) dx; mass outside
    # (eps, 1 - eps) is exp(-2.197 / b) / 2 on each side, tiny for b = e^-1).
    xs = np.linspace(0, 1, 20001, dtype=np.float64)[:, None, None, None].astype(np.float32)
    out = np.broadcast_to(np.array([0.3, 0.3, 0.3, -1.0, -1.0, -1.0], np.float32), (20001, 1, 1, 6))
    per_pixel = jax.vmap(lambda o, x: logit_laplace_nll(o[None], x[None], EPS))(out, xs)
    density = np.exp(-np.asarray(per_pixel, np.float64)) * (1 - 2 * EPS)
    assert np.trapezoid(density, xs[:, 0, 0, 0]) == pytest.approx(1.0, abs=0.01)


def test_logit_laplace_scale_floor_and_shape_check():
    x = _images()
    out = np.concatenate([_best_mu(x), np.full_like(x, -50.0)], -1)
    floored = np.concatenate([_best_mu(x), np.full_like(x, LOG_B_MIN)], -1)
    np.testing.assert_allclose(logit_laplace_nll(out, x), logit_laplace_nll(floored, x))
    with pytest.raises(ValueError, match="logit_laplace=True"):
        logit_laplace_nll(jnp.zeros((2, 4, 4, 3)), x)


def test_non_saturating_losses_signs_and_gradients():
    zeros = jnp.zeros((4,))
    assert float(non_saturating_generator_loss(zeros)) == pytest.approx(np.log(2.0))
    # The generator gains by raising D(fake); the gradient does not vanish at very negative logits.
    g = jax.grad(non_saturating_generator_loss)(jnp.full((4,), -10.0))
    assert bool(jnp.all(g < -0.2))
    g_real, g_fake = jax.grad(discriminator_logistic_loss, argnums=(0, 1))(zeros, zeros)
    assert bool(jnp.all(g_real < 0)) and bool(jnp.all(g_fake > 0))
    assert float(discriminator_logistic_loss(zeros + 20, zeros - 20)) < 1e-6


def test_r1_penalty():
    x = jnp.asarray(_images())
    assert float(r1_penalty(lambda im: jnp.full((im.shape[0],), 3.0), x)) == 0.0
    w = jnp.asarray(_images(1, (4, 4, 3)))
    linear = lambda im: jnp.sum(im * w, axis=(1, 2, 3))  # noqa: E731
    assert float(r1_penalty(linear, x)) == pytest.approx(float(jnp.sum(w * w)), rel=1e-5)


def test_generator_loss_weights_and_adversarial_start():
    x = jnp.asarray(_images())
    recon = jnp.clip(x + 0.05, 0, 1)
    out6 = jnp.concatenate([jnp.asarray(_best_mu(np.asarray(recon))), jnp.zeros_like(x)], -1)
    aux = {"vq_loss": jnp.asarray(0.5), "decoder_output": out6, "perplexity": jnp.asarray(3.0)}
    cfg = LossConfig(adversarial_start_step=100)
    perceptual = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))  # noqa: E731
    disc = lambda im: jnp.sum(im, axis=(1, 2, 3)) - 20.0  # noqa: E731
    kw = dict(config=cfg, aux=aux, perceptual_fn=perceptual, disc_fn=disc, logit_laplace_eps=EPS)
    loss0, m0 = jax.jit(lambda s: generator_loss(x, recon, step=s, **kw))(10)
    loss1, m1 = generator_loss(x, recon, step=100, **kw)
    assert float(m0["adversarial_on"]) == 0.0 and float(m0["adversarial"]) == 0.0
    assert float(m1["adversarial_on"]) == 1.0
    np.testing.assert_allclose(
        m1["adversarial"], jnp.mean(jax.nn.softplus(-disc(recon))), rtol=1e-5
    )
    want = (
        1.0 * float(l2_loss(recon, x))
        + 0.1 * float(jnp.mean(perceptual(x, recon)))
        + 0.1 * float(logit_laplace_nll(out6, x, EPS))
        + 1.0 * 0.5
    )
    assert float(loss0) == pytest.approx(want, rel=1e-5)
    assert float(loss1) == pytest.approx(want + 0.1 * float(m1["adversarial"]), rel=1e-5)
    assert float(m0["perplexity"]) == 3.0
    # The upsampler's form: no aux, no VQ or logit-Laplace terms.
    _, m = generator_loss(
        x, recon, config=LossConfig(), step=0, perceptual_fn=perceptual, disc_fn=disc
    )
    assert "vq_loss" not in m and "logit_laplace" not in m
    with pytest.raises(ValueError, match="perceptual_fn"):
        generator_loss(x, recon, config=LossConfig(), step=0, disc_fn=disc)
    with pytest.raises(ValueError, match="disc_fn"):
        generator_loss(x, recon, config=LossConfig(perceptual_weight=0.0), step=0)


def test_discriminator_loss_with_r1_and_start():
    real, fake = jnp.asarray(_images(0)), jnp.asarray(_images(1))
    cfg = LossConfig(r1_gamma=2.0, adversarial_start_step=5)

    def loss_for(w, step):
        disc = lambda im: jnp.sum(im * w, axis=(1, 2, 3))  # noqa: E731
        return discriminator_loss(disc, real, fake, config=cfg, step=step)

    w = jnp.asarray(_images(2, (4, 4, 3))) * 0.1
    loss, m = loss_for(w, 5)
    logistic = discriminator_logistic_loss(
        jnp.sum(real * w, axis=(1, 2, 3)), jnp.sum(fake * w, axis=(1, 2, 3))
    )
    assert float(m["r1"]) == pytest.approx(float(jnp.sum(w * w)), rel=1e-5)
    assert float(loss) == pytest.approx(float(logistic) + float(jnp.sum(w * w)), rel=1e-5)
    grads = jax.grad(lambda w: loss_for(w, 5)[0])(w)
    assert float(jnp.abs(grads).sum()) > 0
    loss, m = loss_for(w, 4)
    assert float(loss) == 0.0 and float(m["adversarial_on"]) == 0.0
    assert float(jnp.abs(jax.grad(lambda w: loss_for(w, 4)[0])(w)).sum()) == 0.0


def test_loss_config_validation():
    with pytest.raises(ValueError, match="LossConfig.l2_weight=-1"):
        LossConfig(l2_weight=-1)
    with pytest.raises(ValueError, match="perceptual_net"):
        LossConfig(perceptual_net="resnet")


def test_l1_term_is_off_by_default_and_adds_the_mean_absolute_error():
    x = jnp.asarray(_images())
    recon = x + 0.1
    off = LossConfig(perceptual_weight=0.0, adversarial_weight=0.0, logit_laplace_weight=0.0)
    loss0, m0 = generator_loss(x, recon, config=off, step=0)
    assert "l1" not in m0
    on = dataclasses.replace(off, l1_weight=2.0)
    loss1, m1 = generator_loss(x, recon, config=on, step=0)
    assert float(m1["l1"]) == pytest.approx(0.1, rel=1e-4)
    assert float(loss1) == pytest.approx(float(loss0) + 2.0 * 0.1, rel=1e-4)
    with pytest.raises(ValueError, match="l1_weight"):
        LossConfig(l1_weight=-1.0)
