"""`train_vqgan` (`parti-jax train-vqgan`): the ViT-VQGAN on the training loop.

Every checkpoint also (re)writes `<workdir>/vqgan_meta.json` (config,
codebook size, grid, image size, the codebook hash of every step); every
`loop.eval_every` steps fixed held-out images and their reconstructions go to
`<workdir>/images/step_<n>.png` and TensorBoard, with PSNR, LPIPS and the
codebook share they use. At every log point TensorBoard (and W&B, when on) also
gets `codebook/code_counts`: a histogram of how often each code was used over
the last `codebook_window` steps (the counts the dead-code restarts read; a
spike at 0 is the dead codes).

Decoder fine-tuning (Parti §2.1): `init_from` a base work directory with
`freeze='encoder_and_codebook'` keeps the base's encoder, input projection
and codebook bit-identical (same codebook hash, same codes) and trains a new
decoder (any size, e.g. `output='linear'`); the encoder fields must agree.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parti_jax import storage
from parti_jax.models.config import check_counts
from parti_jax.train import checkpoints
from parti_jax.train import loop as loop_lib
from parti_jax.train import metrics as metrics_lib
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import TrainState
from parti_jax.vqgan import losses, lpips, train_data
from parti_jax.vqgan import tokenizer as tokenizer_lib
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.discriminator import DiscriminatorConfig
from parti_jax.vqgan.quantizer import codebook_hash
from parti_jax.vqgan.train_step import (
    FREEZE_OPTIONS,
    GENERATOR,
    GanSetup,
    init_codebook_stats,
    train_step,
)
from parti_jax.vqgan.vit_vqgan import ViTVQGAN

# Fields the frozen part depends on: a fine-tuned VQGAN must keep them.
ENCODER_FIELDS = (
    "image_size",
    "patch_size",
    "encoder_width",
    "encoder_depth",
    "encoder_heads",
    "encoder_mlp_dim",
    "codebook_size",
    "code_dim",
    "position_embedding",
    "attention_window",
    "encoder_context",
    "dtype",
)
# Fields a warm start may change: how the same function is computed or trained.
RUNTIME_FIELDS = (
    "scan_layers",
    "remat",
    "attention_impl",
    "dropout",
    "dtype",
    "weight_dtype",
    "beta",
)
# Generator parameters restored by a frozen-encoder warm start (checkpoint paths).
FROZEN_RESTORE = rf"^{GENERATOR}/(encoder/|quantizer/(in_proj|codebook)(/|$))"


# ------------------------------------------------------------------ helpers


def _make_pixels(task: Any, data_factory: Any, image_size: int, **kw: Any) -> Any:
    source = train_data.pixel_source(
        train_data.SYNTHETIC if task is None else task, data_factory, image_size=image_size, **kw
    )
    return train_data.PixelsIterator(source, image_size)


def _eval_images(make: Callable[..., Any], split: str, eval_split: str, count: int) -> np.ndarray:
    """The first `count` images of `eval_split` (or of `split` when that has none), in order."""
    for s in (eval_split, split):
        try:
            batch = next(make(split=s, batch_size=count, drop_remainder=False))
        except (ValueError, StopIteration) as e:
            if s == split:
                raise ValueError(f"no images for the image grid from split {s!r}: {e}") from e
            metrics_lib.console(
                f"image grid: split {eval_split!r} unavailable ({e}); using {split!r}"
            )
            continue
        return np.asarray(batch["image"])[:count]
    raise AssertionError("unreachable")


def _host_array(x: jax.Array) -> np.ndarray:
    """A replicated global array's value on this host (works multi-process too)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(x.addressable_data(0))


def _state_codebook_hash(state: TrainState) -> str:
    return codebook_hash(_host_array(state.params[GENERATOR]["quantizer"]["codebook"]))


def _code_count_histograms(state: TrainState, step: int) -> dict[str, np.ndarray]:
    """Per-code usage counts summed over the codebook window (the loop's `histograms`)."""
    del step
    counts = _host_array(state.model_state[GENERATOR]["codebook"]["counts"])
    return {"codebook/code_counts": counts.sum(axis=0)}


def _check_same_config(workdir: str | os.PathLike, config: VQGANConfig) -> None:
    if not tokenizer_lib.meta_path(workdir).exists():
        return
    saved = tokenizer_lib.config_from_meta(tokenizer_lib.load_vqgan_meta(workdir))
    diffs = tokenizer_lib.config_differences(saved, config)
    if diffs:
        raise ValueError(
            f"{workdir} holds a VQGAN trained with another configuration ({'; '.join(diffs)}); "
            "resume with the same VQGANConfig or use a new --workdir (init_from= to warm-start)"
        )


def _warm_start(
    state: TrainState,
    init_from: str,
    init_step: int | None,
    config: VQGANConfig,
    freeze: str | None,
) -> tuple[TrainState, dict[str, Any]]:
    """Restores the base VQGAN's generator (or, frozen, its encoder + codebook) into `state`."""
    base_meta = tokenizer_lib.load_vqgan_meta(init_from)
    base_cfg = tokenizer_lib.config_from_meta(base_meta)
    step_dir = checkpoints.resolve_checkpoint_dir(init_from, init_step)
    base_step = int(step_dir.name)
    include = rf"^{GENERATOR}/"
    # Frozen, the encoder must agree; otherwise every field that shapes the function.
    fields = ENCODER_FIELDS
    if freeze is None:
        fields = [f.name for f in dataclasses.fields(VQGANConfig) if f.name not in RUNTIME_FIELDS]
    diffs = [
        f"VQGANConfig.{f}: base {getattr(base_cfg, f)!r}, this run {getattr(config, f)!r}"
        for f in fields
        if getattr(base_cfg, f) != getattr(config, f)
    ]
    if diffs:
        what = "keeps the base VQGAN's encoder and codebook" if freeze else "restores its generator"
        raise ValueError(
            f"{init_from}: init_from {what}, but this run's config differs there "
            f"({'; '.join(diffs)}); set these fields as in the base"
        )
    if freeze is not None:
        include = FROZEN_RESTORE
    params, names = checkpoints.restore_params_from(step_dir, state.params, include=include)
    state = state.replace(params=params)
    restored_hash = _state_codebook_hash(state)
    expected = base_meta.get("codebook_hashes", {}).get(str(base_step))
    if expected is not None and expected != restored_hash:
        raise ValueError(
            f"{step_dir}: restored codebook hash {restored_hash} != {expected} recorded in "
            f"{base_meta['_path']} for step {base_step}; the base checkpoint is corrupt"
        )
    metrics_lib.console(
        f"warm start: {len(names)} parameter(s) from {step_dir} (codebook {restored_hash}"
        f"{', frozen' if freeze else ''})"
    )
    return state, {
        "path": os.fspath(storage.path(init_from)),
        "step": base_step,
        "codebook_hash": restored_hash,
        "include": include,
    }


def _make_evaluate(
    run: loop_lib.Run,
    model: ViTVQGAN,
    images: np.ndarray,
    num_grid_images: int,
    lpips_net: str,
) -> Callable[[TrainState, int], dict[str, float]]:
    """Reconstructs fixed images: writes images/step_<n>.png and returns that grid (inputs
    above reconstructions, for TensorBoard), PSNR, L2, LPIPS and the codebook share used."""
    lpips_model = lpips.LPIPS(lpips_net)
    lpips_params = jax.device_put(lpips.load_lpips_params(lpips_net), run.replicated)
    x = jax.device_put(images, run.replicated)
    k = model.config.codebook_size

    @functools.partial(jax.jit, out_shardings=run.replicated)
    def evaluate(params, x, lp):
        recon, aux = model.apply({"params": params}, x)
        recon = jnp.clip(recon, 0.0, 1.0)
        return {
            "recon": recon,
            "codes": aux["codes"],
            "psnr": jnp.mean(losses.psnr(recon, x)),
            "l2": losses.l2_loss(recon, x),
            "lpips": jnp.mean(lpips_model.apply(lp, x, recon)),
        }

    def evaluate_state(state: TrainState, step: int) -> dict[str, float]:
        params = state.params[GENERATOR]
        out = {k: _host_array(v) for k, v in evaluate(params, x, lpips_params).items()}
        n = min(num_grid_images, len(images))
        grid = metrics_lib.image_grid([images[:n], out["recon"][:n]])
        if run.is_primary:  # written locally, then uploaded for a URL work dir
            png = storage.join(run.workdir, "images", f"step_{step}.png")
            with storage.staged(png, kind="file") as local:
                train_data.write_png(local, grid)
        return {
            "reconstructions": grid,
            "psnr": float(out["psnr"]),
            "l2": float(out["l2"]),
            "lpips": float(out["lpips"]),
            "codebook_usage": len(np.unique(out["codes"])) / k,
        }

    return evaluate_state


# ------------------------------------------------------------------ train


def train_vqgan(
    *,
    workdir: str,
    vqgan_config: VQGANConfig,
    batch_size: int,
    loop: loop_lib.LoopConfig,
    loss_config: losses.LossConfig | None = None,
    discriminator_config: DiscriminatorConfig | None = None,
    mesh_config: Any = None,
    rules: Any = None,
    generator_optimizer: OptimizerConfig | None = None,
    discriminator_optimizer: OptimizerConfig | None = None,
    task: Any = None,
    data_factory: Callable[..., Iterator] | None = None,
    split: str = "train",
    eval_split: str = "validation",
    num_grid_images: int = 8,
    num_eval_images: int = 32,
    codebook_window: int = 100,
    dead_code_reinit: bool = False,
    dead_code_threshold: float = 1.0,
    dead_code_buffer: int = 4096,
    init_from: str | None = None,
    init_step: int | None = None,
    freeze: str | None = None,
) -> loop_lib.TrainResult:
    """Trains a ViT-VQGAN (or fine-tunes its decoder); resumes from `<workdir>/checkpoints`.

    Args:
      workdir: checkpoints, vqgan_meta.json, metrics.jsonl, images/step_<n>.png.
      vqgan_config: the model.
      batch_size: global batch (all hosts together).
      loop: steps, cadences, checkpoints, NaN policy, seed (LoopConfig); every
        `loop.eval_every` steps (and at the end) fixed held-out images are
        reconstructed into images/step_<n>.png and eval/* metrics.
      loss_config: loss weights (default: the paper's).
      discriminator_config: the StyleGAN discriminator (used when
        loss_config.adversarial_weight > 0).
      mesh_config: partitioning.MeshConfig or a jax Mesh (default: all devices
        on 'data', parameters replicated).
      rules: rule-table name or table (default: the MeshConfig's).
      generator_optimizer, discriminator_optimizer: OptimizerConfig (default:
        OptimizerConfig.adamw_defaults: Adam β 0.9/0.99, weight decay 1e-4,
        warm-up then cosine decay to 0 at num_steps).
      task: a `<name>_pixels` seqio task (name or object); None or 'synthetic':
        synthetic images (no TensorFlow).
      data_factory: instead of `task`: f(batch_size=, shard_index=,
        num_shards=, seed=, split=) -> iterator of {'image': [B, S, S, 3]}.
      split, eval_split: training split; the split the image grids and eval
        metrics come from (the training split when the task lacks it).
      num_grid_images, num_eval_images: images in the grid / in the eval metrics.
      codebook_window: steps over which codebook usage and perplexity are
        measured (and dead codes found).
      dead_code_reinit: restart codes used fewer than `dead_code_threshold`
        times in a window from a ring of `dead_code_buffer` recent latents.
      init_from: a base train-vqgan work directory to warm-start from (when
        `workdir` has no checkpoint yet); `init_step` picks its step.
      freeze: 'encoder_and_codebook' (decoder fine-tuning; needs init_from).
    """
    loss_config = loss_config or losses.LossConfig()
    if freeze is not None and freeze not in FREEZE_OPTIONS:
        raise ValueError(f"train_vqgan.freeze={freeze!r}: expected None or one of {FREEZE_OPTIONS}")
    if freeze is not None and not init_from:
        raise ValueError(
            f"train_vqgan.freeze={freeze!r} needs train_vqgan.init_from=<base VQGAN work "
            "directory>: a frozen encoder and codebook must come from a trained VQGAN"
        )
    if freeze is not None and dead_code_reinit:
        raise ValueError(
            "train_vqgan.dead_code_reinit=True changes the codebook, which "
            f"freeze={freeze!r} keeps fixed; turn one of them off"
        )
    check_counts(
        "train_vqgan",
        codebook_window=codebook_window,
        num_grid_images=num_grid_images,
        num_eval_images=num_eval_images,
        dead_code_buffer=dead_code_buffer,
    )
    check_counts("train_vqgan", low=0, init_step=init_step)
    size = vqgan_config.image_size
    gan = GanSetup.create(
        loss_config,
        discriminator_config,
        generator_optimizer,
        discriminator_optimizer,
        num_steps=loop.num_steps,
        image_size=size,
        freeze=freeze,
    )
    run = loop_lib.start_run(
        workdir, batch_size=batch_size, mesh_config=mesh_config, rules=rules, where="train_vqgan"
    )
    _check_same_config(run.workdir, vqgan_config)
    make = functools.partial(
        _make_pixels,
        task=task,
        data_factory=data_factory,
        image_size=size,
        shard_index=run.shard.index,
        num_shards=run.shard.count,
    )
    model = ViTVQGAN(vqgan_config)
    tokens_per_step = batch_size * vqgan_config.num_tokens
    buffer = min(dead_code_buffer, codebook_window * tokens_per_step) if dead_code_reinit else 1

    def init(key):
        g_key, d_key = jax.random.split(key)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        generator = {
            "params": model.init({"params": g_key}, images)["params"],
            "codebook": init_codebook_stats(vqgan_config, codebook_window, buffer),
        }
        return gan.variables(generator, d_key, images)

    base_info = None

    def warm_start(state: TrainState) -> TrainState:
        nonlocal base_info
        state, base_info = _warm_start(state, init_from, init_step, vqgan_config, freeze)
        return state

    def write_meta(step: int, state: TrainState) -> None:
        h = _state_codebook_hash(state)
        if not run.is_primary:
            return
        file = tokenizer_lib.meta_path(run.workdir)
        old = tokenizer_lib.load_vqgan_meta(run.workdir) if file.exists() else {}
        hashes = {k: v for k, v in old.get("codebook_hashes", {}).items() if int(k) < step}
        hashes[str(step)] = h
        tokenizer_lib.write_vqgan_meta(
            run.workdir,
            {
                "format_version": tokenizer_lib.META_FORMAT_VERSION,
                "config": dataclasses.asdict(vqgan_config),
                "codebook_size": vqgan_config.codebook_size,
                "grid": [vqgan_config.grid, vqgan_config.grid],
                "image_size": size,
                "codebook_hash": h,
                "step": int(step),
                "codebook_hashes": hashes,
                "freeze": freeze,
                "init_from": base_info or old.get("init_from"),
                "loss_config": dataclasses.asdict(loss_config),
            },
        )

    evaluate = None
    if loop.eval_every:
        images = _eval_images(
            functools.partial(make, shard_index=0, num_shards=1, seed=loop.seed),
            split,
            eval_split,
            max(num_eval_images, num_grid_images),
        )
        evaluate = _make_evaluate(run, model, images, num_grid_images, gan.eval_lpips_net(size))
    result = loop_lib.run_training(
        run,
        gan.task(
            init=init,
            step=functools.partial(
                train_step,
                model=model,
                discriminator=gan.discriminator,
                loss_config=loss_config,
                freeze=freeze,
                dead_code_reinit=dead_code_reinit,
                dead_code_threshold=dead_code_threshold,
            ),
            data=lambda seed: make(split=split, batch_size=run.local_batch, seed=seed),
            batch_keys=("image",),
            evaluate=evaluate,
            evaluate_at_end=True,
            histograms=_code_count_histograms,
            warm_start=warm_start if init_from else None,
            on_save=write_meta,
            tokens_per_step=tokens_per_step,
        ),
        loop,
    )
    result.records["codebook_hash"] = _state_codebook_hash(result.state)
    return result
