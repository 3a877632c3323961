"""`train_upsampler` (`parti-jax train-upsampler`): the upsampler on the training loop.

Pairs (Parti §2.4): a target at `UpsamplerConfig.output_size` is
area-downsampled by `scale`, and the input is the VQGAN's reconstruction of
that downsample, what the upsampler sees at sampling time (`clean_fraction`
of the rows, drawn per step from the state's key, get the clean downsample;
without a VQGAN all do). The loss is `generator_loss` without VQ terms, with
the discriminator of `GanSetup`. Metrics: the loss parts, `psnr`,
`bicubic_psnr` (the baseline to beat) and `psnr_gain`; the evaluation
measures them on held-out VQGAN inputs and returns the image eval/upsampled
(rows: a few held-out inputs, enlarged, their upsampled images and the
targets) for the loop's image writers. `upsampler_meta.json` records the
configs and the VQGAN (codebook hash) the upsampler was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parti_jax import storage
from parti_jax.models.config import check_counts
from parti_jax.train import loop as loop_lib
from parti_jax.train.metrics import image_grid
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import TrainState
from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.data import ReconstructionPairs, area_downsample, bicubic_upsample
from parti_jax.upsampler.inference import META_FILE
from parti_jax.upsampler.model import Upsampler
from parti_jax.vqgan.discriminator import DiscriminatorConfig
from parti_jax.vqgan.losses import LossConfig, generator_loss, psnr
from parti_jax.vqgan.lpips import LPIPS
from parti_jax.vqgan.train_data import SHAPES_WORLD, pixel_source
from parti_jax.vqgan.train_step import GENERATOR, GanSetup, apply_adversarial_gradients

log = logging.getLogger(__name__)
PyTree = Any
Array = jax.Array
META_VERSION = 1


# ------------------------------------------------------------------ the step


def make_inputs(
    batch: Mapping[str, Array], rng: Array, *, scale: int, clean_fraction: float
) -> tuple[Array, Array]:
    """(upsampler inputs, share of clean rows): reconstructions with a clean_fraction of
    rows replaced by the clean area downsample; all clean without reconstructions."""
    clean = area_downsample(batch["image"].astype(jnp.float32), scale)
    if "reconstruction" not in batch:
        return clean, jnp.ones((), jnp.float32)
    recon = batch["reconstruction"].astype(jnp.float32)
    if clean_fraction <= 0.0:
        return recon, jnp.zeros((), jnp.float32)
    pick = jax.random.bernoulli(rng, clean_fraction, (recon.shape[0],))
    inputs = jnp.where(pick[:, None, None, None], clean, recon)
    return inputs, jnp.mean(pick.astype(jnp.float32))


def train_step(
    state: TrainState,
    batch: Mapping[str, Array],
    lpips_params: PyTree,
    *,
    model: Upsampler,
    gan: GanSetup,
    clean_fraction: float,
) -> tuple[TrainState, dict[str, Array]]:
    """One generator + discriminator update; pure, jitted once by the training loop.

    As in the VQGAN step (parti_jax.vqgan.train_step): the generator's loss is
    differentiated with the current discriminator, then the discriminator's
    (logistic + R1) on the same predictions; before
    `LossConfig.adversarial_start_step` the discriminator and its optimizer
    state stay as they were. `lpips_params` is an argument, not a constant
    baked into the program ({} when the perceptual term is off).
    """
    scale, loss_config = model.config.scale, gan.loss_config
    targets = batch["image"].astype(jnp.float32)
    inputs, clean_share = make_inputs(
        batch, state.step_rng("clean"), scale=scale, clean_fraction=clean_fraction
    )
    perceptual_fn = None
    if loss_config.perceptual_weight > 0:
        perceptual_fn = functools.partial(LPIPS(loss_config.perceptual_net).apply, lpips_params)
    disc_fn = None
    if gan.discriminator is not None:
        disc_fn = functools.partial(
            gan.discriminator.apply, {"params": state.params["discriminator"]}
        )

    def g_loss(params):
        pred = model.apply({"params": params}, inputs)
        loss, parts = generator_loss(
            targets,
            pred,
            config=loss_config,
            step=state.step,
            perceptual_fn=perceptual_fn,
            disc_fn=disc_fn,
        )
        return loss, (parts, pred)

    (_, (metrics, pred)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
        state.params[GENERATOR]
    )
    metrics = dict(metrics)
    new_state = apply_adversarial_gradients(
        state,
        g_grads,
        metrics,
        discriminator=gan.discriminator,
        loss_config=loss_config,
        real=targets,
        fake=pred,
    )
    baseline = jnp.clip(bicubic_upsample(inputs, scale), 0.0, 1.0)
    metrics["bicubic_psnr"] = jnp.mean(psnr(baseline, targets))
    metrics["psnr_gain"] = metrics["psnr"] - metrics["bicubic_psnr"]
    metrics["clean_share"] = clean_share
    return new_state, metrics


def eval_step(params: PyTree, batch: Mapping[str, Array], *, model: Upsampler) -> dict[str, Array]:
    """Sums over a batch (VQGAN inputs when present): psnr, bicubic_psnr, l2, count."""
    scale = model.config.scale
    targets = batch["image"].astype(jnp.float32)
    inputs, _ = make_inputs(batch, jax.random.key(0), scale=scale, clean_fraction=0.0)
    pred = jnp.clip(model.apply({"params": params}, inputs), 0.0, 1.0)
    base = jnp.clip(bicubic_upsample(inputs, scale), 0.0, 1.0)
    return {
        "psnr": jnp.sum(psnr(pred, targets)),
        "bicubic_psnr": jnp.sum(psnr(base, targets)),
        "l2": jnp.sum(jnp.mean(jnp.square(pred - targets), axis=(1, 2, 3))),
        "count": jnp.asarray(targets.shape[0], jnp.float32),
    }


def grid_rows(
    params: PyTree, batch: Mapping[str, Array], *, model: Upsampler, num: int
) -> tuple[Array, Array, Array]:
    """(inputs, upsampled, targets) of the batch's first `num` rows, the inputs as
    `eval_step` sees them (VQGAN reconstructions when present)."""
    batch = {k: v[:num] for k, v in batch.items()}
    inputs, _ = make_inputs(batch, jax.random.key(0), scale=model.config.scale, clean_fraction=0.0)
    pred = jnp.clip(model.apply({"params": params}, inputs), 0.0, 1.0)
    return inputs, pred, batch["image"].astype(jnp.float32)


# ------------------------------------------------------------------ train


def _load_vqgan(vqgan_path: str, config: UpsamplerConfig) -> Any:
    from parti_jax.vqgan.tokenizer import ImageTokenizer

    tokenizer = ImageTokenizer.load(vqgan_path)
    size = int(tokenizer.meta["image_size"])
    if size != config.input_size:
        raise ValueError(
            f"VQGAN {vqgan_path} makes {size}px images but UpsamplerConfig.input_size="
            f"{config.input_size}; the upsampler's input is the VQGAN's output, so set "
            f"UpsamplerConfig.input_size = {size} or pass the VQGAN of that resolution"
        )
    return tokenizer


def train_upsampler(
    *,
    workdir: str,
    upsampler_config: UpsamplerConfig,
    batch_size: int,
    loop: loop_lib.LoopConfig,
    loss_config: LossConfig | None = None,
    discriminator_config: DiscriminatorConfig | None = None,
    vqgan_path: str | None = None,
    task: Any = SHAPES_WORLD,
    data_factory: Callable[..., Iterator] | None = None,
    clean_fraction: float = 0.0,
    adversarial_start_step: int | None = None,
    generator_optimizer: OptimizerConfig | None = None,
    discriminator_optimizer: OptimizerConfig | None = None,
    mesh_config: Any = None,
    rules: Any = None,
    eval_steps: int = 4,
    eval_split: str = "validation",
    num_grid_images: int = 4,
) -> loop_lib.TrainResult:
    """Trains the upsampler; resumes from `<workdir>/checkpoints` when present.

    Args:
      workdir: checkpoints, metrics.jsonl, upsampler_meta.json.
      upsampler_config: the network; its output_size is the target resolution.
      batch_size: global batch (all hosts).
      loop: steps, cadences, checkpoints, NaN policy, seed (LoopConfig); every
        `loop.eval_every` steps PSNR on `eval_steps` held-out batches.
      loss_config: L2 / perceptual / adversarial weights (VQ and logit-Laplace
        terms do not apply); default LossConfig().
      discriminator_config: the StyleGAN discriminator (when adversarial_weight > 0).
      vqgan_path: a train-vqgan work directory whose reconstructions are the
        inputs (its image_size must be upsampler_config.input_size); None:
        clean downsamples only.
      task: 'shapes_world' (built in, TensorFlow-free, drawn at the output
        size) or a registered seqio `<name>_pixels` task (name or object)
        whose images are output_size pixels.
      data_factory: instead of `task`: f(batch_size=, shard_index=,
        num_shards=, seed=, split=) -> iterator of {'image': float32
        [B, S, S, 3] in [0, 1]} host-local batches at the output size.
      clean_fraction: share of rows (per step, random) whose input is the
        clean area downsample instead of the VQGAN reconstruction.
      adversarial_start_step: overrides LossConfig.adversarial_start_step.
      generator_optimizer, discriminator_optimizer: default
        OptimizerConfig.adamw_defaults().
      mesh_config: partitioning.MeshConfig or a Mesh; default all devices on 'data'.
      rules: rule table name or table (default the MeshConfig's).
      eval_steps, eval_split: the held-out batches of the periodic evaluation.
      num_grid_images: held-out images in the evaluation's image eval/upsampled (rows:
        the input enlarged to the output size, the upsampled image, the target); 0: none.
    """
    loss_config = loss_config or LossConfig()
    if adversarial_start_step is not None:
        loss_config = dataclasses.replace(
            loss_config, adversarial_start_step=int(adversarial_start_step)
        )
    check_counts("train_upsampler", eval_steps=eval_steps)
    check_counts("train_upsampler", 0, num_grid_images=num_grid_images)
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"train_upsampler.clean_fraction={clean_fraction} must be in [0, 1]")
    out_size, scale = upsampler_config.output_size, upsampler_config.scale
    gan = GanSetup.create(
        loss_config,
        discriminator_config,
        generator_optimizer,
        discriminator_optimizer,
        num_steps=loop.num_steps,
        image_size=out_size,
    )
    run = loop_lib.start_run(
        workdir,
        batch_size=batch_size,
        mesh_config=mesh_config,
        rules=rules,
        where="train_upsampler",
    )
    tokenizer = _load_vqgan(vqgan_path, upsampler_config) if vqgan_path else None
    if tokenizer is None and clean_fraction < 1.0:
        log.warning("no vqgan_path: the upsampler trains on clean downsamples only")
    reconstruct = None
    if tokenizer is not None:
        reconstruct = lambda low: tokenizer.decode(tokenizer.encode(low))  # noqa: E731
    train_reconstruct = reconstruct if clean_fraction < 1.0 else None
    task_name = getattr(task, "name", task) if data_factory is None else "data_factory"

    def make_data(seed: int, split: str) -> ReconstructionPairs:
        source = pixel_source(
            task or SHAPES_WORLD,
            data_factory,
            image_size=out_size,
            batch_size=run.local_batch,
            shard_index=run.shard.index,
            num_shards=run.shard.count,
            seed=seed,
            split=split,
        )
        return ReconstructionPairs(
            source,
            output_size=out_size,
            scale=scale,
            reconstruct_fn=train_reconstruct if split == "train" else reconstruct,
            where=f"{task_name} ({split})",
        )

    model = Upsampler(upsampler_config)

    def init(key):
        low = jnp.zeros((1, upsampler_config.input_size, upsampler_config.input_size, 3))
        high = jnp.zeros((1, out_size, out_size, 3))
        generator = model.init(jax.random.fold_in(key, 0), low)
        return gan.variables(generator, jax.random.fold_in(key, 1), high)

    adversarial = gan.discriminator is not None
    run.write_json(
        META_FILE,
        {
            "format_version": META_VERSION,
            "upsampler_config": dataclasses.asdict(upsampler_config),
            "input_size": upsampler_config.input_size,
            "output_size": out_size,
            "scale": scale,
            "loss_config": dataclasses.asdict(loss_config),
            "discriminator_config": dataclasses.asdict(gan.discriminator.config)
            if adversarial
            else None,
            "generator_optimizer": dataclasses.asdict(gan.generator_optimizer),
            "discriminator_optimizer": dataclasses.asdict(gan.discriminator_optimizer)
            if adversarial
            else None,
            "clean_fraction": clean_fraction,
            "task": str(task_name),
            "batch_size": batch_size,
            "vqgan": _vqgan_record(vqgan_path, tokenizer),
            "codebook_hash": tokenizer.meta.get("codebook_hash") if tokenizer else None,
        },
    )
    eval_jit = jax.jit(functools.partial(eval_step, model=model))
    grid_jit = jax.jit(
        functools.partial(grid_rows, model=model, num=num_grid_images),
        out_shardings=run.replicated,
    )

    def evaluate(state: TrainState, step: int) -> dict[str, Any]:
        params = state.params[GENERATOR]
        batches = make_data(loop.seed, eval_split)
        grid = {}
        first = next(batches, None) if num_grid_images else None
        if first is not None:  # the grid's images are its first rows
            batches = itertools.chain([first], batches)
            low, pred, target = (
                np.asarray(x.addressable_data(0)) for x in grid_jit(params, run.global_batch(first))
            )
            low = np.repeat(np.repeat(low, scale, axis=1), scale, axis=2)  # nearest neighbour
            grid["upsampled"] = image_grid([low, pred, target])
        totals = loop_lib.evaluate_sums(run, eval_jit, params, batches, eval_steps)
        n = max(totals.pop("count", 0.0), 1.0)
        out = {k: v / n for k, v in totals.items()}
        out["psnr_gain"] = out.get("psnr", 0.0) - out.get("bicubic_psnr", 0.0)
        return {**grid, **out}

    return loop_lib.run_training(
        run,
        gan.task(
            init=init,
            step=functools.partial(
                train_step,
                model=model,
                gan=gan,
                clean_fraction=clean_fraction if train_reconstruct is not None else 1.0,
            ),
            data=lambda seed: make_data(seed, "train"),
            batch_keys=("image", "reconstruction") if train_reconstruct else ("image",),
            evaluate=evaluate,
        ),
        loop,
    )


def _vqgan_record(vqgan_path: str | None, tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    meta = dict(tokenizer.meta)
    return {
        "path": os.fspath(storage.path(vqgan_path)),
        "codebook_hash": meta.get("codebook_hash"),
        "codebook_size": meta.get("codebook_size"),
        "grid": meta.get("grid"),
        "image_size": meta.get("image_size"),
        "step": meta.get("step"),
    }
