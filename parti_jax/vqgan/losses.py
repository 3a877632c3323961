"""Losses of the ViT-VQGAN and the upsampler, and PSNR.

The ViT-VQGAN (arXiv 2110.04627, §3.3) trains on vq + 0.1 adversarial + 0.1
perceptual + 0.1 logit-Laplace + 1.0 L2 (the `LossConfig` defaults); the
upsampler on `generator_loss` with aux=None (L2, perceptual, adversarial). The
discriminator is trained with the logistic (non-saturating) GAN loss plus an R1
gradient penalty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
ImagesFn = Callable[[Array], Array]  # images [B, H, W, 3] -> logits [B]
PerceptualFn = Callable[[Array, Array], Array]  # (a, b) -> distances [B]

LOG_B_MIN = -5.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights; defaults are the ViT-VQGAN paper's."""

    # Weight of the mean squared pixel error.
    l2_weight: float = 1.0
    # Weight of the mean absolute pixel error (not in the paper; 0 = off). L1 is
    # the median rather than the mean under uncertainty: sharper edges and corners.
    l1_weight: float = 0.0
    # Weight of LPIPS (mean over the batch).
    perceptual_weight: float = 0.1
    # LPIPS trunk: 'vgg16' (the paper's) or 'alexnet' (about 20x cheaper; fine for tiny images).
    perceptual_net: str = "vgg16"
    # Weight of the non-saturating generator loss (0 disables the discriminator entirely).
    adversarial_weight: float = 0.1
    # The adversarial terms (generator and discriminator) switch on at this step.
    adversarial_start_step: int = 0
    # Weight of the logit-Laplace NLL (applies only to 6-channel logit-Laplace decoders).
    logit_laplace_weight: float = 0.1
    # Weight of the quantizer's loss (which already holds beta * commitment).
    vq_weight: float = 1.0
    # R1 penalty: gamma / 2 * E ||d D(x) / d x||^2 on real images (0 disables it).
    r1_gamma: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"LossConfig.{f.name}={value} must be >= 0")
        if self.perceptual_net not in ("vgg16", "alexnet"):
            raise ValueError(
                f"LossConfig.perceptual_net={self.perceptual_net!r}; use 'vgg16' or 'alexnet'"
            )


def l2_loss(recon: Array, images: Array) -> Array:
    """Mean squared error over all pixels and channels."""
    return jnp.mean(jnp.square(recon.astype(jnp.float32) - images.astype(jnp.float32)))


def psnr(a: Array, b: Array, max_val: float = 1.0) -> Array:
    """Peak signal-to-noise ratio in dB per image [B] (inf for identical images)."""
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(max_val**2 / mse)


def logit_laplace_nll(decoder_output: Array, images: Array, eps: float = 0.1) -> Array:
    """Mean negative log-likelihood of images under the decoder's logit-Laplace prediction.

    DALL-E's (arXiv 2102.12092, §A.3): a pixel x in [0, 1] is squeezed into
    y = eps + (1 - 2 eps) x and y is Laplace(mu, b) in logit space, density
    p(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)); the result is the exact
    negative log-density averaged over sub-pixels. log b is floored at
    LOG_B_MIN (b = 0.0067, below 8-bit resolution in logit space) so the loss
    cannot run to -inf on flat regions.

    Args:
      decoder_output: [B, H, W, 6] raw decoder output, [mu (3), log b (3)].
      images: [B, H, W, 3] targets in [0, 1].
      eps: the squeeze into (eps, 1 - eps) (VQGANConfig.logit_laplace_eps).
    """
    if decoder_output.shape[-1] != 6 or decoder_output.shape[:-1] != images.shape[:-1]:
        raise ValueError(
            f"logit_laplace_nll: decoder output {decoder_output.shape} must be [B, H, W, 6] "
            f"matching images {images.shape} (build the VQGAN with logit_laplace=True)"
        )
    out = decoder_output.astype(jnp.float32)
    mu, log_b = out[..., :3], jnp.maximum(out[..., 3:], LOG_B_MIN)
    y = eps + (1.0 - 2.0 * eps) * images.astype(jnp.float32)
    logit_y = jnp.log(y) - jnp.log1p(-y)
    nll = jnp.abs(logit_y - mu) * jnp.exp(-log_b) + log_b + jnp.log(2.0 * y * (1.0 - y))
    return jnp.mean(nll)


def non_saturating_generator_loss(fake_logits: Array) -> Array:
    """-log sigmoid(D(G(z))), mean over the batch."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def discriminator_logistic_loss(real_logits: Array, fake_logits: Array) -> Array:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), mean over the batch."""
    real = jax.nn.softplus(-real_logits.astype(jnp.float32))
    fake = jax.nn.softplus(fake_logits.astype(jnp.float32))
    return jnp.mean(real) + jnp.mean(fake)


def r1_penalty(disc_fn: ImagesFn, real_images: Array) -> Array:
    """E_x ||d D(x) / d x||^2 over real images (multiply by gamma / 2)."""
    grads = jax.grad(lambda x: jnp.sum(disc_fn(x)))(real_images.astype(jnp.float32))
    return jnp.mean(jnp.sum(jnp.square(grads), axis=(1, 2, 3)))


def _adversarial_on(config: LossConfig, step: Array | int) -> Array:
    return jnp.asarray(step) >= config.adversarial_start_step


def generator_loss(
    images: Array,
    recon: Array,
    *,
    config: LossConfig,
    step: Array | int,
    aux: Mapping[str, Array] | None = None,
    perceptual_fn: PerceptualFn | None = None,
    disc_fn: ImagesFn | None = None,
    logit_laplace_eps: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """Total generator (VQGAN or upsampler) loss and its parts.

    Args:
      images: targets [B, H, W, 3] in [0, 1].
      recon: reconstruction [B, H, W, 3] (unclipped model output).
      config: loss weights.
      step: training step (switches the adversarial term on at
        config.adversarial_start_step; before that D is not evaluated).
      aux: the VQGAN's aux dict (vq_loss, decoder_output, ...); None for the upsampler.
      perceptual_fn: (a, b) -> [B] LPIPS (lpips.make_lpips_fn); needed if perceptual_weight > 0.
      disc_fn: images -> logits [B] with the discriminator params bound; needed
        if adversarial_weight > 0.
      logit_laplace_eps: VQGANConfig.logit_laplace_eps of the model.

    Returns:
      (loss, metrics) with scalar metrics: loss, l2, psnr, and when active
      l1, perceptual, logit_laplace, vq_loss, codebook_loss, commitment_loss,
      perplexity, usage, adversarial, adversarial_on.
    """
    if images.shape != recon.shape:
        raise ValueError(f"generator_loss: images {images.shape} != recon {recon.shape}")
    metrics: dict[str, Array] = {}
    metrics["l2"] = l2_loss(recon, images)
    metrics["psnr"] = jnp.mean(psnr(jnp.clip(recon, 0.0, 1.0), images))
    loss = config.l2_weight * metrics["l2"]
    if config.l1_weight > 0:
        metrics["l1"] = jnp.mean(jnp.abs(recon.astype(jnp.float32) - images.astype(jnp.float32)))
        loss = loss + config.l1_weight * metrics["l1"]
    if config.perceptual_weight > 0:
        if perceptual_fn is None:
            raise ValueError(
                "generator_loss: LossConfig.perceptual_weight > 0 needs perceptual_fn "
                "(parti_jax.vqgan.lpips.make_lpips_fn); or set perceptual_weight = 0"
            )
        metrics["perceptual"] = jnp.mean(perceptual_fn(images, recon))
        loss = loss + config.perceptual_weight * metrics["perceptual"]
    if aux is not None:
        output = aux.get("decoder_output")
        if config.logit_laplace_weight > 0 and output is not None and output.shape[-1] == 6:
            metrics["logit_laplace"] = logit_laplace_nll(output, images, logit_laplace_eps)
            loss = loss + config.logit_laplace_weight * metrics["logit_laplace"]
        if "vq_loss" in aux:
            loss = loss + config.vq_weight * aux["vq_loss"]
        for key in ("vq_loss", "codebook_loss", "commitment_loss", "perplexity", "usage"):
            if key in aux:
                metrics[key] = aux[key]
    if config.adversarial_weight > 0:
        if disc_fn is None:
            raise ValueError(
                "generator_loss: LossConfig.adversarial_weight > 0 needs disc_fn "
                "(the discriminator with its params bound); or set adversarial_weight = 0"
            )
        on = _adversarial_on(config, step)
        adv = jax.lax.cond(
            on,
            lambda r: non_saturating_generator_loss(disc_fn(r)),
            lambda r: jnp.zeros((), jnp.float32),
            recon,
        )
        metrics["adversarial"] = adv
        metrics["adversarial_on"] = on.astype(jnp.float32)
        loss = loss + config.adversarial_weight * adv
    metrics["loss"] = loss
    return loss, metrics


def discriminator_loss(
    disc_fn: ImagesFn,
    real_images: Array,
    fake_images: Array,
    *,
    config: LossConfig,
    step: Array | int,
) -> tuple[Array, dict[str, Array]]:
    """Logistic discriminator loss + gamma/2 R1, zero (and not evaluated) before the start step.

    `fake_images` are treated as constants (no gradient to the generator).
    Differentiate with respect to the discriminator params that `disc_fn` closes over.
    """
    fake_images = jax.lax.stop_gradient(fake_images)

    def active(real: Array, fake: Array) -> tuple[Array, Array, Array, Array]:
        real_logits, fake_logits = disc_fn(real), disc_fn(fake)
        logistic = discriminator_logistic_loss(real_logits, fake_logits)
        r1 = r1_penalty(disc_fn, real) if config.r1_gamma > 0 else jnp.zeros((), jnp.float32)
        return logistic, r1, jnp.mean(real_logits), jnp.mean(fake_logits)

    def inactive(real: Array, fake: Array) -> tuple[Array, Array, Array, Array]:
        return (jnp.zeros((), jnp.float32),) * 4

    on = _adversarial_on(config, step)
    logistic, r1, real_mean, fake_mean = jax.lax.cond(
        on, active, inactive, real_images.astype(jnp.float32), fake_images.astype(jnp.float32)
    )
    loss = logistic + 0.5 * config.r1_gamma * r1
    metrics = {
        "disc_loss": loss,
        "disc_logistic": logistic,
        "r1": r1,
        "real_logits": real_mean,
        "fake_logits": fake_mean,
        "adversarial_on": on.astype(jnp.float32),
    }
    return loss, metrics
