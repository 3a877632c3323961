"""Training the upsampler on VQGAN reconstructions: pairs, the GAN step, `train_upsampler`.

Pairs (Parti §2.4): a target image x at the output resolution
(`UpsamplerConfig.output_size`) is area-downsampled by `scale` to the input
resolution, and the upsampler's input is the VQGAN's reconstruction of it,
decode(encode(downsample(x))), which is what it sees at sampling time. A
`clean_fraction` share of rows gets the clean downsample instead (drawn per
row in the step from the state's key, so a resumed run draws the same rows).
Without a VQGAN every input is the clean downsample.

Losses: `parti_jax.vqgan.losses.generator_loss` without VQ terms (L2 + LPIPS +
non-saturating adversarial, the adversarial term on from
`LossConfig.adversarial_start_step`) for the upsampler, and the logistic loss
+ R1 for the StyleGAN discriminator (`discriminator_loss`), one optimizer per
parameter group in one `TrainState` ({'generator', 'discriminator'}; no
discriminator at all when `LossConfig.adversarial_weight` is 0). The shared
loop (`parti_jax.train.loop.run`) does checkpoints, resume, metrics and the
SIGTERM save.

Metrics: loss parts, `psnr` (clipped prediction vs target), `bicubic_psnr`
(the bicubic resize of the same input vs target, the baseline to beat) and
their difference `psnr_gain`; with `eval_every`, the same on the eval split
with VQGAN inputs only (the sampling-time case).

Work directory: `checkpoints/<step>/state` (TrainState), `metrics.jsonl`, and
`upsampler_meta.json` (configs, input/output resolution, the VQGAN and its
codebook hash the upsampler was trained on), which `load_upsampler` and the
sampler read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from parti_jax.train import checkpoints, distributed, loop, optimizers
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import TrainState
from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.data import (  # re-exported: the pair-making pieces
    SHAPES_WORLD,
    ReconstructionPairs,
    ShapesPixelsIterator,
    area_downsample,
    bicubic_upsample,
    make_target_source,
)
from parti_jax.upsampler.inference import (  # re-exported: loading lives here for training
    META_FILE,
    LoadedUpsampler,
    UpsamplerLoadError,
    abstract_params,
    make_upsample_fn,
    read_upsampler_meta,
)
from parti_jax.upsampler.model import Upsampler
from parti_jax.vqgan.discriminator import Discriminator, DiscriminatorConfig
from parti_jax.vqgan.losses import LossConfig, generator_loss, psnr
from parti_jax.vqgan.lpips import LPIPS, load_lpips_params
from parti_jax.vqgan.train_step import BoundStep, apply_adversarial_gradients

__all__ = [
    "SHAPES_WORLD",
    "LoadedUpsampler",
    "ReconstructionPairs",
    "ShapesPixelsIterator",
    "UpsamplerLoadError",
    "area_downsample",
    "bicubic_upsample",
    "eval_step",
    "load_upsampler",
    "make_upsample_fn",
    "read_upsampler_meta",
    "train_step",
    "train_upsampler",
]
log = logging.getLogger(__name__)
PyTree = Any
Array = jax.Array
META_VERSION = 1
GENERATOR, DISCRIMINATOR = "generator", "discriminator"
# AlexNet's stride-4 first layer needs at least this many pixels per side.
MIN_ALEXNET_SIZE = 32


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
    discriminator: Discriminator | None,
    loss_config: LossConfig,
    clean_fraction: float,
    learning_rate_fn: Callable[[Array], Array],
    nan_policy: str = "stop",
) -> tuple[TrainState, dict[str, Array]]:
    """One generator + discriminator update; pure, jitted once by the trainer.

    As in the VQGAN step (parti_jax.vqgan.train_step): the generator's loss is
    differentiated with the current discriminator, then the discriminator's
    (logistic + R1) on the same predictions; before
    `LossConfig.adversarial_start_step` the discriminator and its optimizer
    state stay as they were. `lpips_params` is an argument, not a constant
    baked into the program ({} when the perceptual term is off).
    """
    scale = model.config.scale
    targets = batch["image"].astype(jnp.float32)
    inputs, clean_share = make_inputs(
        batch, state.step_rng("clean"), scale=scale, clean_fraction=clean_fraction
    )
    step = state.step
    d_params = state.params.get(DISCRIMINATOR) if discriminator is not None else None
    perceptual_fn = None
    if loss_config.perceptual_weight > 0:
        perceptual_fn = functools.partial(LPIPS(loss_config.perceptual_net).apply, lpips_params)
    disc_fn = None
    if d_params is not None:
        disc_fn = functools.partial(discriminator.apply, {"params": d_params})

    def g_loss(params):
        pred = model.apply({"params": params}, inputs)
        loss, parts = generator_loss(
            targets,
            pred,
            config=loss_config,
            step=step,
            perceptual_fn=perceptual_fn,
            disc_fn=disc_fn,
        )
        return loss, (parts, pred)

    (loss, (metrics, pred)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
        state.params[GENERATOR]
    )
    metrics = dict(metrics)
    new_state = apply_adversarial_gradients(
        state,
        g_grads,
        metrics,
        discriminator=discriminator,
        loss_config=loss_config,
        learning_rate_fn=learning_rate_fn,
        real=targets,
        fake=pred,
    )
    baseline = jnp.clip(bicubic_upsample(inputs, scale), 0.0, 1.0)
    metrics["bicubic_psnr"] = jnp.mean(psnr(baseline, targets))
    metrics["psnr_gain"] = metrics["psnr"] - metrics["bicubic_psnr"]
    metrics["clean_share"] = clean_share
    if nan_policy == "skip":
        ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        new_state = loop.keep_if_finite(ok, new_state, state)
        metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
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


# ------------------------------------------------------------------ helpers


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


def _vqgan_record(vqgan_path: str | None, tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    meta = dict(tokenizer.meta)
    return {
        "path": str(Path(vqgan_path).expanduser().absolute()),
        "codebook_hash": meta.get("codebook_hash"),
        "codebook_size": meta.get("codebook_size"),
        "grid": meta.get("grid"),
        "image_size": meta.get("image_size"),
        "step": meta.get("step"),
    }


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    status: str
    last_metrics: dict[str, float]


# ------------------------------------------------------------------ train


def train_upsampler(
    *,
    workdir: str,
    upsampler_config: UpsamplerConfig,
    batch_size: int,
    num_steps: int,
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
    seed: int = 0,
    nan_policy: str = "stop",
    log_every: int = 50,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    async_checkpoints: bool = True,
    eval_every: int | None = None,
    eval_steps: int = 4,
    eval_split: str = "validation",
    tensorboard: bool | None = None,
) -> TrainResult:
    """Trains the upsampler; resumes from `<workdir>/checkpoints` when present.

    Args:
      workdir: checkpoints, metrics.jsonl, upsampler_meta.json.
      upsampler_config: the network; its output_size is the target resolution.
      batch_size: global batch (all hosts).
      num_steps: total steps (a resumed run continues up to it).
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
      seed: parameters, clean-row draws and data order.
      nan_policy: 'stop' or 'skip' (see parti_jax.train.loop).
      log_every, checkpoint_every, keep_checkpoints, async_checkpoints: cadence.
      eval_every, eval_steps, eval_split: periodic PSNR on held-out images
        (None: off).
      tensorboard: TensorBoard summaries (None: when TensorFlow is loaded).
    """
    from parti_jax.workdir import check_workdir

    workdir_path = check_workdir(workdir)
    loss_config = loss_config or LossConfig()
    if adversarial_start_step is not None:
        loss_config = dataclasses.replace(
            loss_config, adversarial_start_step=int(adversarial_start_step)
        )
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean_fraction={clean_fraction} must be in [0, 1]")
    if nan_policy not in loop.NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}: expected one of {loop.NAN_POLICIES}")
    if (
        loss_config.perceptual_weight > 0
        and loss_config.perceptual_net == "alexnet"
        and upsampler_config.output_size < MIN_ALEXNET_SIZE
    ):
        raise ValueError(
            f"LossConfig.perceptual_net='alexnet' needs images of at least {MIN_ALEXNET_SIZE}px "
            f"(the upsampler's output is {upsampler_config.output_size}px); use 'vgg16' or "
            "perceptual_weight=0"
        )
    default_opt = dict(
        warmup_steps=min(1000, max(num_steps // 10, 0)), decay_end_step=max(num_steps, 2)
    )
    generator_optimizer = generator_optimizer or OptimizerConfig.adamw_defaults(**default_opt)
    discriminator_optimizer = discriminator_optimizer or OptimizerConfig.adamw_defaults(
        **default_opt
    )
    adversarial = loss_config.adversarial_weight > 0
    discriminator_config = discriminator_config or DiscriminatorConfig()

    mesh, rules = loop.resolve_mesh(mesh_config, rules, loop.DATA_PARALLEL_MESH)
    shard_index, num_shards, writer_proc = distributed.data_shard(mesh)
    batch_devices = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    if batch_size % num_shards or batch_size % batch_devices:
        raise ValueError(
            f"batch_size={batch_size} does not divide over the mesh's data x fsdp = "
            f"{batch_devices} devices ({num_shards} data shards); choose a multiple"
        )
    local_batch = batch_size // num_shards

    tokenizer = _load_vqgan(vqgan_path, upsampler_config) if vqgan_path else None
    if tokenizer is None and clean_fraction < 1.0:
        log.warning("no vqgan_path: the upsampler trains on clean downsamples only")
    reconstruct = None
    if tokenizer is not None and clean_fraction < 1.0:
        reconstruct = lambda low: tokenizer.decode(tokenizer.encode(low))  # noqa: E731
    out_size, scale = upsampler_config.output_size, upsampler_config.scale
    task_name = getattr(task, "name", task) if data_factory is None else "data_factory"

    def make_data(seed: int, split: str) -> ReconstructionPairs:
        source = make_target_source(
            task=task,
            data_factory=data_factory,
            image_size=out_size,
            batch_size=local_batch,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed,
            split=split,
        )
        return ReconstructionPairs(
            source,
            output_size=out_size,
            scale=scale,
            reconstruct_fn=reconstruct if split == "train" else _eval_reconstruct(tokenizer),
            where=f"{task_name} ({split})",
        )

    data = make_data(seed, "train")

    model = Upsampler(upsampler_config)
    discriminator = Discriminator(discriminator_config) if adversarial else None
    tx = {GENERATOR: optimizers.make_optimizer(generator_optimizer)}
    if adversarial:
        tx[DISCRIMINATOR] = optimizers.make_optimizer(discriminator_optimizer)
    lr_fn = optimizers.learning_rate_fn(generator_optimizer)

    def init_fn(key):
        low = jnp.zeros((1, upsampler_config.input_size, upsampler_config.input_size, 3))
        variables = {GENERATOR: model.init(jax.random.fold_in(key, 0), low)}
        if adversarial:
            high = jnp.zeros((1, out_size, out_size, 3))
            variables[DISCRIMINATOR] = discriminator.init(jax.random.fold_in(key, 1), high)
        return variables

    ckpt = checkpoints.Checkpointer(
        workdir_path,
        save_interval_steps=checkpoint_every,
        max_to_keep=keep_checkpoints,
        async_save=async_checkpoints,
        data_shard=checkpoints.DataShard(shard_index, num_shards, writer_proc),
    )
    state, state_shardings, data, _ = loop.init_or_restore_state(
        ckpt, init_fn, tx, data_iterator=data, mesh=mesh, rules=rules, seed=seed
    )

    is_primary = jax.process_index() == 0
    if is_primary:
        meta = {
            "format_version": META_VERSION,
            "upsampler_config": dataclasses.asdict(upsampler_config),
            "input_size": upsampler_config.input_size,
            "output_size": out_size,
            "scale": scale,
            "loss_config": dataclasses.asdict(loss_config),
            "discriminator_config": dataclasses.asdict(discriminator_config)
            if adversarial
            else None,
            "generator_optimizer": dataclasses.asdict(generator_optimizer),
            "discriminator_optimizer": dataclasses.asdict(discriminator_optimizer)
            if adversarial
            else None,
            "clean_fraction": clean_fraction,
            "task": str(task_name),
            "batch_size": batch_size,
            "vqgan": _vqgan_record(vqgan_path, tokenizer),
            "codebook_hash": tokenizer.meta.get("codebook_hash") if tokenizer else None,
        }
        (workdir_path / META_FILE).write_text(json.dumps(meta, indent=2, default=str))

    replicated = NamedSharding(mesh, PartitionSpec())
    lpips_params = {}
    if loss_config.perceptual_weight > 0:
        lpips_params = jax.device_put(load_lpips_params(loss_config.perceptual_net), replicated)
    step_fn = functools.partial(
        train_step,
        model=model,
        discriminator=discriminator,
        loss_config=loss_config,
        clean_fraction=clean_fraction if reconstruct is not None else 1.0,
        learning_rate_fn=lr_fn,
        nan_policy=nan_policy,
    )
    bsh = loop.batch_sharding(mesh)
    keys = ("image", "reconstruction") if reconstruct is not None else ("image",)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {k: bsh for k in keys}, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    eval_fn = None
    if eval_every:
        eval_jit = jax.jit(functools.partial(eval_step, model=model))

        def eval_fn(st: TrainState, step: int) -> dict[str, float]:
            it = make_data(seed, eval_split)
            totals: dict[str, float] = {}
            for _ in range(eval_steps):
                try:
                    local = next(it)
                except StopIteration:
                    break
                batch = loop.make_global_batch(local, bsh, num_shards)
                sums = jax.device_get(eval_jit(st.params[GENERATOR], batch))
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
            n = max(totals.pop("count", 0.0), 1.0)
            out = {k: v / n for k, v in totals.items()}
            out["psnr_gain"] = out.get("psnr", 0.0) - out.get("bicubic_psnr", 0.0)
            return out

    result = loop.run_session(
        mesh=mesh,
        rules=rules,
        workdir=workdir_path,
        checkpointer=ckpt,
        tensorboard=tensorboard,
        train_step=BoundStep(jitted, lpips_params),
        state=state,
        data_iterator=data,
        batch_sharding=bsh,
        num_data_shards=num_shards,
        num_steps=num_steps,
        log_every=log_every,
        eval_every=eval_every,
        eval_fn=eval_fn,
        nan_policy=nan_policy,
    )
    return TrainResult(result.state, result.step, result.status, result.last_metrics)


def _eval_reconstruct(tokenizer: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if tokenizer is None:
        return None
    return lambda low: tokenizer.decode(tokenizer.encode(low))


# ------------------------------------------------------------------ loading


def load_upsampler(path: str | os.PathLike, *, step: int | None = None) -> LoadedUpsampler:
    """Loads the generator parameters of a train-upsampler work directory (latest step)."""
    meta, meta_path = read_upsampler_meta(path)
    try:
        config = UpsamplerConfig(**meta["upsampler_config"])
    except (TypeError, ValueError) as e:
        raise UpsamplerLoadError(f"{meta_path}: bad upsampler_config ({e})") from None
    step_dir = checkpoints.resolve_checkpoint_dir(path, step)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params(config)
    )
    restored, _ = checkpoints.restore_params_from(
        step_dir, {GENERATOR: abstract}, include=f"^{GENERATOR}/"
    )
    return LoadedUpsampler(
        config=config,
        params=restored[GENERATOR],
        meta=meta,
        step=int(Path(str(step_dir)).name),
        checkpoint=str(step_dir),
        meta_path=meta_path,
    )
