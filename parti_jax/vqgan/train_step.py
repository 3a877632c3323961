"""The VQGAN's training step and the GAN set-up it shares with the upsampler.

One jitted step updates both parameter groups ({'generator', 'discriminator'},
one optimizer each): the generator's loss is differentiated with the current
discriminator, then the discriminator's (logistic + R1) on the same images;
before `LossConfig.adversarial_start_step` the discriminator and its
optimizer count stay as they were.

Codebook bookkeeping lives in `model_state['generator']['codebook']`, so a
resumed run continues it exactly: `counts` [window, K] (a ring of codes used
per step: `codebook_usage`, `codebook_perplexity`) and `latents` (a ring of
recent encoder outputs, from which `dead_code_reinit` restarts the codes used
fewer than `dead_code_threshold` times per window). Freezing
('encoder_and_codebook') stops gradients to the encoder, input projection and
codebook and gives them exactly zero updates.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from parti_jax.train import optimizers
from parti_jax.train.loop import TrainTask
from parti_jax.train.optimizers import OptimizerConfig, path_name
from parti_jax.train.state import TrainState
from parti_jax.vqgan import losses, lpips
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.discriminator import Discriminator, DiscriminatorConfig
from parti_jax.vqgan.quantizer import reinit_dead_codes
from parti_jax.vqgan.vit_vqgan import ViTVQGAN

PyTree = Any
GENERATOR, DISCRIMINATOR = "generator", "discriminator"
FREEZE_OPTIONS = ("encoder_and_codebook",)
# Encoder, the projection into the lookup space and the codebook: what makes the codes.
FROZEN_PARAMS = re.compile(r"^(encoder/|quantizer/(in_proj|codebook)(/|$))")
# AlexNet's strided convolutions and pools leave nothing of smaller images (LPIPS is NaN).
MIN_ALEXNET_SIZE = 32


# ------------------------------------------------------------------ set-up


@dataclasses.dataclass(frozen=True)
class GanSetup:
    """The adversarial set-up the VQGAN and upsampler trainers share.

    Parameter groups {'generator', 'discriminator'} with one optimizer each
    (default `OptimizerConfig.adamw_defaults`: warm-up to min(1000,
    num_steps / 10), cosine decay to 0 at num_steps); no discriminator at all
    when `LossConfig.adversarial_weight` is 0; LPIPS weights for the
    perceptual term.
    """

    loss_config: losses.LossConfig
    discriminator: Discriminator | None
    generator_optimizer: OptimizerConfig
    discriminator_optimizer: OptimizerConfig
    freeze: str | None = None

    @classmethod
    def create(
        cls,
        loss_config: losses.LossConfig,
        discriminator_config: DiscriminatorConfig | None,
        generator_optimizer: OptimizerConfig | None,
        discriminator_optimizer: OptimizerConfig | None,
        *,
        num_steps: int,
        image_size: int,
        freeze: str | None = None,
    ) -> GanSetup:
        if (
            loss_config.perceptual_weight > 0
            and loss_config.perceptual_net == "alexnet"
            and image_size < MIN_ALEXNET_SIZE
        ):
            raise ValueError(
                f"LossConfig.perceptual_net='alexnet' needs images of at least "
                f"{MIN_ALEXNET_SIZE}px (these are {image_size}px); use 'vgg16' or "
                "perceptual_weight=0"
            )
        default = OptimizerConfig.adamw_defaults(
            warmup_steps=min(1000, max(num_steps // 10, 0)), decay_end_step=max(num_steps, 2)
        )
        discriminator = None
        if loss_config.adversarial_weight > 0:
            discriminator = Discriminator(discriminator_config or DiscriminatorConfig())
        return cls(
            loss_config,
            discriminator,
            generator_optimizer or default,
            discriminator_optimizer or default,
            freeze,
        )

    def task(self, **fields: Any) -> TrainTask:
        """A TrainTask with these optimizers, learning rate and LPIPS weights (the step's
        constant argument); `fields` give the rest (init, step, data, ...)."""
        return TrainTask(
            optimizer=self.optimizers(),
            constants=(self.lpips_params(),),
            learning_rate_fn=self.learning_rate_fn(),
            **fields,
        )

    def optimizers(self) -> dict[str, optax.GradientTransformation]:
        tx = {GENERATOR: generator_optimizer_tx(self.generator_optimizer, self.freeze)}
        if self.discriminator is not None:
            tx[DISCRIMINATOR] = optimizers.make_optimizer(self.discriminator_optimizer)
        return tx

    def learning_rate_fn(self) -> Any:
        return optimizers.learning_rate_fn(self.generator_optimizer)

    def variables(self, generator: dict, key: jax.Array, images: jax.Array) -> dict:
        """{'generator': generator variables, 'discriminator': its init on `images`}."""
        out = {GENERATOR: generator}
        if self.discriminator is not None:
            out[DISCRIMINATOR] = {"params": self.discriminator.init(key, images)["params"]}
        return out

    def lpips_params(self) -> PyTree:
        """LPIPS weights of the perceptual term ({} when it is off): a step argument."""
        if self.loss_config.perceptual_weight <= 0:
            return {}
        return lpips.load_lpips_params(self.loss_config.perceptual_net)

    def eval_lpips_net(self, image_size: int) -> str:
        """The LPIPS trunk for evaluation: the loss's, or VGG16 below AlexNet's minimum size."""
        return "vgg16" if image_size < MIN_ALEXNET_SIZE else self.loss_config.perceptual_net


# ------------------------------------------------------------------ pieces


def is_frozen(path: str, freeze: str | None) -> bool:
    """Whether generator parameter `path` ('encoder/...') is frozen under `freeze`."""
    return freeze is not None and FROZEN_PARAMS.search(path) is not None


def _stop_frozen(params: PyTree, freeze: str | None) -> PyTree:
    if freeze is None:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.lax.stop_gradient(x) if is_frozen(path_name(p), freeze) else x, params
    )


def generator_optimizer_tx(config: OptimizerConfig, freeze: str | None) -> Any:
    """Adam-W of `config`; with `freeze`, frozen parameters get exactly zero updates."""
    tx = optimizers.make_optimizer(config)
    if freeze is None:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if is_frozen(path_name(p), freeze) else "trained", params
        )

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def init_codebook_stats(config: VQGANConfig, window: int, buffer_size: int) -> dict:
    """Zeroed codebook bookkeeping (see the module docstring)."""
    return {
        "counts": jnp.zeros((window, config.codebook_size), jnp.float32),
        "latents": jnp.zeros((max(buffer_size, 1), config.code_dim), jnp.float32),
        "reinitialised": jnp.zeros([], jnp.int32),
    }


def _distribution_stats(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(fraction of codes with a count, perplexity = exp(entropy)) of a [K] count vector."""
    probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-12)), 0.0))
    return jnp.mean((counts > 0).astype(jnp.float32)), jnp.exp(entropy)


def _update_codebook_stats(
    stats: dict,
    codebook: jax.Array,
    counts: jax.Array,
    latents: jax.Array,
    step: jax.Array,
    rng: jax.Array,
    *,
    dead_code_reinit: bool,
    threshold: float,
    group_sizes: tuple[int, ...] = (),
) -> tuple[dict, jax.Array, dict]:
    """Adds this step's counts/latents; restarts dead codes at the end of each window."""
    window = stats["counts"].shape[0]
    ring = stats["counts"].at[step % window].set(counts)
    window_counts = jnp.sum(ring, axis=0)
    usage, perplexity = _distribution_stats(window_counts)
    new = dict(stats, counts=ring)
    metrics = {"codebook_usage": usage, "codebook_perplexity": perplexity}
    if not dead_code_reinit:
        return new, codebook, metrics
    buffer = stats["latents"]
    flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    m = min(flat.shape[0], buffer.shape[0])
    pick_rng, reinit_rng = jax.random.split(rng)
    if flat.shape[0] > m:
        flat = flat[jax.random.randint(pick_rng, (m,), 0, flat.shape[0])]
    slots = (step * m + jnp.arange(m)) % buffer.shape[0]
    buffer = buffer.at[slots].set(flat)
    new["latents"] = buffer
    due = ((step + 1) % window == 0) & (step + 1 >= window)

    def restart(codebook):
        if not group_sizes:
            replaced, dead = reinit_dead_codes(
                codebook, window_counts, buffer, reinit_rng, threshold
            )
            return replaced, jnp.sum(dead.astype(jnp.int32))
        # A product codebook (code_group_sizes): each group's rows restart from that
        # group's slices of recent latents, by how often that digit was used.
        groups = len(group_sizes)
        digits = window_counts.reshape(group_sizes)
        slices = buffer.reshape(buffer.shape[0], groups, -1)
        parts, num, start = [], jnp.zeros([], jnp.int32), 0
        for g, rng in enumerate(jax.random.split(reinit_rng, groups)):
            counts_g = digits.sum(axis=tuple(a for a in range(groups) if a != g))
            rows = codebook[start : start + group_sizes[g]]
            replaced, dead = reinit_dead_codes(rows, counts_g, slices[:, g], rng, threshold)
            parts.append(replaced)
            num, start = num + jnp.sum(dead.astype(jnp.int32)), start + group_sizes[g]
        return jnp.concatenate(parts, axis=0), num

    # Only at the end of a window: a cond, not a where, so the other steps skip the work.
    codebook, num_dead = jax.lax.cond(
        due, restart, lambda c: (c, jnp.zeros([], jnp.int32)), codebook
    )
    new["reinitialised"] = stats["reinitialised"] + num_dead
    metrics["dead_codes_reinitialised"] = num_dead.astype(jnp.float32)
    metrics["dead_codes_reinitialised_total"] = new["reinitialised"].astype(jnp.float32)
    return new, codebook, metrics


# ------------------------------------------------------------------ the step


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    lpips_params: PyTree,
    *,
    model: ViTVQGAN,
    discriminator: Discriminator | None,
    loss_config: losses.LossConfig,
    freeze: str | None = None,
    dead_code_reinit: bool = False,
    dead_code_threshold: float = 1.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One generator + discriminator update. Pure; the training loop jits it once with
    shardings and donation (and adds the learning rate and the NaN policy).

    `lpips_params`: LPIPS weights (lpips.load_lpips_params), an argument rather
    than a constant so they are not baked into the compiled program ({} when
    the perceptual term is off).
    """
    images = batch["image"].astype(jnp.float32)
    step = state.step
    rng = state.step_rng("dropout")
    g_params = state.params[GENERATOR]
    d_params = state.params.get(DISCRIMINATOR) if discriminator is not None else None
    cfg = model.config
    perceptual_fn = None
    if loss_config.perceptual_weight > 0:
        lpips_model = lpips.LPIPS(loss_config.perceptual_net)
        perceptual_fn = functools.partial(lpips_model.apply, lpips_params)
    disc_fn = None
    if d_params is not None:
        disc_fn = functools.partial(discriminator.apply, {"params": d_params})

    def g_loss(params):
        params = _stop_frozen(params, freeze)
        recon, aux = model.apply(
            {"params": params}, images, enable_dropout=True, rngs={"dropout": rng}
        )
        loss, metrics = losses.generator_loss(
            images,
            recon,
            config=loss_config,
            step=step,
            aux=aux,
            perceptual_fn=perceptual_fn,
            disc_fn=disc_fn,
            logit_laplace_eps=cfg.logit_laplace_eps,
        )
        return loss, (metrics, recon, aux["code_counts"], aux["latents"])

    (loss, (metrics, recon, counts, latents)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
        g_params
    )
    metrics = {f"batch_{k}" if k in ("usage", "perplexity") else k: v for k, v in metrics.items()}
    new_state = apply_adversarial_gradients(
        state,
        g_grads,
        metrics,
        discriminator=discriminator,
        loss_config=loss_config,
        real=images,
        fake=recon,
    )

    # Codebook bookkeeping and dead-code restarts (on the updated codebook).
    g_new = new_state.params[GENERATOR]
    stats, codebook, stat_metrics = _update_codebook_stats(
        state.model_state[GENERATOR]["codebook"],
        g_new["quantizer"]["codebook"],
        counts,
        latents,
        step,
        state.step_rng("dead_codes"),
        dead_code_reinit=dead_code_reinit,
        threshold=dead_code_threshold,
        group_sizes=tuple(cfg.code_group_sizes),
    )
    metrics.update(stat_metrics)
    g_new = dict(g_new, quantizer=dict(g_new["quantizer"], codebook=codebook))
    model_state = dict(new_state.model_state)
    model_state[GENERATOR] = dict(model_state[GENERATOR], codebook=stats)
    new_state = new_state.replace(
        params=dict(new_state.params, **{GENERATOR: g_new}), model_state=model_state
    )
    return new_state, metrics


def apply_adversarial_gradients(
    state: TrainState,
    g_grads: PyTree,
    metrics: dict[str, jax.Array],
    *,
    discriminator: Discriminator | None,
    loss_config: losses.LossConfig,
    real: jax.Array,
    fake: jax.Array,
) -> TrainState:
    """Applies the generator's gradients and, with a discriminator, its update; fills `metrics`.

    Shared by the VQGAN and upsampler steps: the discriminator's loss
    (logistic + R1) is taken on the same `real` / `fake` images the
    generator's loss saw; before `LossConfig.adversarial_start_step` the
    discriminator and its optimizer state stay as they were. Adds grad_norm
    and (with a discriminator) its metrics and disc_grad_norm.
    """
    step = state.step
    d_params = state.params.get(DISCRIMINATOR) if discriminator is not None else None
    metrics["grad_norm"] = optax.tree.norm(g_grads)
    grads = {GENERATOR: g_grads}
    if d_params is not None:

        def d_loss(params):
            fn = functools.partial(discriminator.apply, {"params": params})
            return losses.discriminator_loss(fn, real, fake, config=loss_config, step=step)

        (_, d_metrics), d_grads = jax.value_and_grad(d_loss, has_aux=True)(d_params)
        d_metrics = dict(d_metrics)
        d_metrics.pop("adversarial_on", None)
        metrics.update(d_metrics)
        metrics["disc_grad_norm"] = optax.tree.norm(d_grads)
        grads[DISCRIMINATOR] = d_grads
    new_state = state.apply_gradients(grads)
    if d_params is not None:
        # Before the start step the discriminator (and its optimizer count) stays as it was.
        on = step >= loss_config.adversarial_start_step
        keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(on, n, o))
        params, opt_state = dict(new_state.params), dict(new_state.opt_state)
        params[DISCRIMINATOR] = keep(params[DISCRIMINATOR], state.params[DISCRIMINATOR])
        opt_state[DISCRIMINATOR] = keep(opt_state[DISCRIMINATOR], state.opt_state[DISCRIMINATOR])
        new_state = new_state.replace(params=params, opt_state=opt_state)
    return new_state
