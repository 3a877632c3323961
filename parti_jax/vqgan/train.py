"""ViT-VQGAN training and decoder fine-tuning: `train_vqgan` (`parti-jax train-vqgan`).

The step (train_step.py) updates generator and discriminator in one jitted
call; the shared loop (parti_jax.train.loop.run) drives it: metrics every
`log_every` steps, orbax checkpoints with the data position, resume, SIGTERM
saves. Every checkpoint also (re)writes `<workdir>/vqgan_meta.json`
(tokenizer.py: config, codebook size, grid, image size, codebook hash and
step, and the hash of every step), and every `image_grid_every` steps
`<workdir>/images/step_<n>.png` shows fixed held-out inputs above their
reconstructions while `eval/psnr`, `eval/lpips`, `eval/codebook_usage` of
those images are logged. With `adversarial_weight = 0` there is no
discriminator at all.

Decoder fine-tuning (Parti §2.1): `init_from` a base train-vqgan work directory
with `freeze='encoder_and_codebook'` restores the encoder, the quantizer's
input projection and the codebook and never changes them, so the fine-tuned
checkpoint has the base's codebook hash and encodes bit-identically; the
decoder (any size, e.g. `output='linear'` without the logit-Laplace term) is
trained from scratch. The encoder fields of the two configs must agree (the
error names each differing field); scanned and unscanned block layouts are
converted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from parti_jax import partitioning
from parti_jax.train import checkpoints, distributed, loop, optimizers
from parti_jax.train import metrics as metrics_lib
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import TrainState
from parti_jax.vqgan import losses, lpips, train_data
from parti_jax.vqgan import tokenizer as tokenizer_lib
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.discriminator import Discriminator, DiscriminatorConfig
from parti_jax.vqgan.quantizer import codebook_hash
from parti_jax.vqgan.train_step import (
    DISCRIMINATOR,
    FREEZE_OPTIONS,
    GENERATOR,
    BoundStep,
    convert_block_layout,
    generator_optimizer_tx,
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
# AlexNet's strided convolutions and pools leave nothing of smaller images (LPIPS is NaN).
MIN_ALEXNET_SIZE = 32
# Generator parameters restored by a frozen-encoder warm start (checkpoint paths).
FROZEN_RESTORE = rf"^{GENERATOR}/(encoder/|quantizer/(in_proj|codebook)(/|$))"


# ------------------------------------------------------------------ helpers


def _make_pixels(
    *,
    task: Any,
    data_factory: Callable[..., Iterator] | None,
    split: str,
    batch_size: int,
    image_size: int,
    shard_index: int,
    num_shards: int,
    seed: int,
    train: bool,
) -> train_data.PixelsIterator:
    if data_factory is not None:
        inner = data_factory(
            batch_size=batch_size,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed,
            split=split,
        )
    elif task is None or task == "synthetic":
        inner = train_data.SyntheticImagesIterator(
            batch_size=batch_size,
            image_size=image_size,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed + (0 if split == "train" else 1_000_003),
        )
    else:
        from parti_jax.data import pipeline  # TensorFlow: only for seqio tasks

        inner = pipeline.make_pixels_iterator(
            task,
            batch_size=batch_size,
            split=split,
            image_size=image_size,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed,
            shuffle=train,
            repeat=train,
            drop_remainder=train,
        )
    return train_data.PixelsIterator(inner, image_size)


def _eval_images(make: Callable[..., Any], split: str, eval_split: str, count: int) -> np.ndarray:
    """The first `count` images of `eval_split` (or of `split` when that has none), in order."""
    for s in (eval_split, split):
        try:
            batch = next(make(split=s, batch_size=count, train=False))
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


def _check_same_config(workdir: Path, config: VQGANConfig) -> None:
    file = tokenizer_lib.meta_path(workdir)
    if not file.exists():
        return
    saved = tokenizer_lib.config_from_meta(tokenizer_lib.load_vqgan_meta(workdir))
    diffs = tokenizer_lib.config_differences(saved, config)
    if diffs:
        raise ValueError(
            f"{workdir} holds a VQGAN trained with another configuration ({'; '.join(diffs)}); "
            "resume with the same VQGANConfig or use a new --workdir (init_from= to warm-start)"
        )


class _MetaCheckpointer(checkpoints.Checkpointer):
    """A Checkpointer that (re)writes vqgan_meta.json whenever it starts a save."""

    def __init__(self, *args: Any, write_meta: Callable[[int, TrainState], None], **kw: Any):
        super().__init__(*args, **kw)
        self._write_meta = write_meta

    def save(self, step: int, state: TrainState, data_iterator: Any = None) -> bool:
        started = super().save(step, state, data_iterator)
        if started:
            self._write_meta(step, state)
        return started


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
    if freeze is not None:
        diffs = [
            f"VQGANConfig.{f}: base {getattr(base_cfg, f)!r}, this run {getattr(config, f)!r}"
            for f in ENCODER_FIELDS
            if getattr(base_cfg, f) != getattr(config, f)
        ]
        if diffs:
            raise ValueError(
                f"{init_from}: freeze={freeze!r} keeps the base VQGAN's encoder and codebook, "
                f"but this run's config differs there ({'; '.join(diffs)}); set these fields "
                "as in the base"
            )
        include = FROZEN_RESTORE
    convert = None
    if base_cfg.scan_layers != config.scan_layers:

        def convert(tree):
            return dict(
                tree, **{GENERATOR: convert_block_layout(tree[GENERATOR], config.scan_layers)}
            )

    params, names = checkpoints.restore_params_from(
        step_dir, state.params, include=include, convert=convert
    )
    state = state.replace(params=params)
    restored_hash = codebook_hash(_host_array(params[GENERATOR]["quantizer"]["codebook"]))
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
        "path": str(Path(init_from).expanduser().absolute()),
        "step": base_step,
        "codebook_hash": restored_hash,
        "include": include,
    }


def _make_eval_fn(
    *,
    model: ViTVQGAN,
    images: np.ndarray,
    num_grid_images: int,
    lpips_net: str,
    lpips_params: Any,
    mesh: jax.sharding.Mesh,
    workdir: Path,
) -> Callable[[TrainState, int], dict[str, float]]:
    """eval_fn for loop.run: reconstructs fixed images, writes the grid PNG, returns metrics."""
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.make_array_from_callback(images.shape, replicated, lambda idx: images[idx])
    lpips_model = lpips.LPIPS(lpips_net)
    k = model.config.codebook_size

    @functools.partial(jax.jit, out_shardings=replicated)
    def evaluate(params, x, lp):
        recon, aux = model.apply({"params": params}, x, train=False)
        recon = jnp.clip(recon, 0.0, 1.0)
        return {
            "recon": recon,
            "codes": aux["codes"],
            "psnr": jnp.mean(losses.psnr(recon, x)),
            "l2": losses.l2_loss(recon, x),
            "lpips": jnp.mean(lpips_model.apply(lp, x, recon)),
        }

    def eval_fn(state: TrainState, step: int) -> dict[str, float]:
        out = evaluate(state.params[GENERATOR], x, lpips_params)
        recon, codes = _host_array(out["recon"]), _host_array(out["codes"])
        if jax.process_index() == 0:
            n = min(num_grid_images, len(images))
            grid = train_data.image_grid([images[:n], recon[:n]])
            train_data.write_png(workdir / "images" / f"step_{step}.png", grid)
        return {
            "psnr": float(_host_array(out["psnr"])),
            "l2": float(_host_array(out["l2"])),
            "lpips": float(_host_array(out["lpips"])),
            "codebook_usage": len(np.unique(codes)) / k,
        }

    return eval_fn


# ------------------------------------------------------------------ train


@dataclasses.dataclass
class VQGANTrainResult:
    state: TrainState
    step: int
    status: str  # 'done' | 'preempted' | 'data_exhausted'
    last_metrics: dict[str, float]
    codebook_hash: str


def train_vqgan(
    *,
    workdir: str,
    vqgan_config: VQGANConfig,
    batch_size: int,
    num_steps: int,
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
    seed: int = 0,
    log_every: int = 50,
    image_grid_every: int | None = 500,
    num_grid_images: int = 8,
    num_eval_images: int = 32,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    async_checkpoints: bool = True,
    codebook_window: int = 100,
    dead_code_reinit: bool = False,
    dead_code_threshold: float = 1.0,
    dead_code_buffer: int = 4096,
    init_from: str | None = None,
    init_step: int | None = None,
    freeze: str | None = None,
    nan_policy: str = "stop",
    allow_data_reshuffle: bool = False,
    tensorboard: bool | None = None,
) -> VQGANTrainResult:
    """Trains a ViT-VQGAN (or fine-tunes its decoder); resumes from `<workdir>/checkpoints`.

    Args:
      workdir: checkpoints, vqgan_meta.json, metrics.jsonl, images/step_<n>.png.
      vqgan_config: the model.
      batch_size: global batch (all hosts together).
      num_steps: total steps (a resumed run continues up to it).
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
        SyntheticImagesIterator (no TensorFlow).
      data_factory: instead of `task`: f(batch_size=, shard_index=,
        num_shards=, seed=, split=) -> iterator of {'image': [B, S, S, 3]}.
      split, eval_split: training split; the split the image grids and eval
        metrics come from (the training split when the task lacks it).
      seed: parameters, dropout, data order.
      log_every, checkpoint_every, keep_checkpoints, async_checkpoints: cadence.
      image_grid_every: write images/step_<n>.png and eval/* metrics (None: off).
      num_grid_images, num_eval_images: images in the grid / in the eval metrics.
      codebook_window: steps over which codebook usage and perplexity are
        measured (and dead codes found).
      dead_code_reinit: restart codes used fewer than `dead_code_threshold`
        times in a window from a ring of `dead_code_buffer` recent latents.
      init_from: a base train-vqgan work directory to warm-start from (when
        `workdir` has no checkpoint yet); `init_step` picks its step.
      freeze: 'encoder_and_codebook' (decoder fine-tuning; needs init_from).
      nan_policy: 'stop' (raise naming the step) or 'skip'.
      allow_data_reshuffle: resume with another number of data shards.
      tensorboard: TensorBoard summaries (None: when TensorFlow is loaded).
    """
    workdir_path = Path(tokenizer_lib.meta_path(workdir)).parent
    from parti_jax.workdir import check_workdir

    check_workdir(workdir_path)
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
    if nan_policy not in loop.NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}: expected one of {loop.NAN_POLICIES}")
    if codebook_window < 1:
        raise ValueError(f"train_vqgan.codebook_window={codebook_window} must be >= 1")
    if (
        loss_config.perceptual_weight > 0
        and loss_config.perceptual_net == "alexnet"
        and vqgan_config.image_size < MIN_ALEXNET_SIZE
    ):
        raise ValueError(
            f"LossConfig.perceptual_net='alexnet' needs images of at least {MIN_ALEXNET_SIZE}px "
            f"(VQGANConfig.image_size={vqgan_config.image_size}); use 'vgg16' or "
            "perceptual_weight=0"
        )
    _check_same_config(workdir_path, vqgan_config)
    default_opt = dict(
        warmup_steps=min(1000, max(num_steps // 10, 0)), decay_end_step=max(num_steps, 2)
    )
    generator_optimizer = generator_optimizer or OptimizerConfig.adamw_defaults(**default_opt)
    discriminator_optimizer = discriminator_optimizer or OptimizerConfig.adamw_defaults(
        **default_opt
    )

    mesh, rules = loop.resolve_mesh(mesh_config, rules, loop.DATA_PARALLEL_MESH)
    shard_index, num_shards, writer_proc = distributed.data_shard(mesh)
    batch_devices = int(np.prod([mesh.shape[a] for a in partitioning.BATCH_MESH_AXES]))
    for what, n in (("data shards (hosts)", num_shards), ("data x fsdp devices", batch_devices)):
        if batch_size % n:
            raise ValueError(
                f"train_vqgan.batch_size={batch_size} does not divide over the mesh's {n} {what}; "
                f"choose a multiple of {n}"
            )
    local_batch = batch_size // num_shards
    size = vqgan_config.image_size
    make = functools.partial(
        _make_pixels,
        task=task,
        data_factory=data_factory,
        image_size=size,
        shard_index=shard_index,
        num_shards=num_shards,
    )
    data = make(split=split, batch_size=local_batch, seed=seed, train=True)

    model = ViTVQGAN(vqgan_config)
    use_disc = loss_config.adversarial_weight > 0
    discriminator = (
        Discriminator(discriminator_config or DiscriminatorConfig()) if use_disc else None
    )
    tx = {GENERATOR: generator_optimizer_tx(generator_optimizer, freeze)}
    if use_disc:
        tx[DISCRIMINATOR] = optimizers.make_optimizer(discriminator_optimizer)
    tokens_per_step = batch_size * vqgan_config.num_tokens
    buffer = min(dead_code_buffer, codebook_window * tokens_per_step) if dead_code_reinit else 1

    def init_fn(key):
        g_key, d_key = jax.random.split(key)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        out = {
            GENERATOR: {
                "params": model.init({"params": g_key}, images)["params"],
                "codebook": init_codebook_stats(vqgan_config, codebook_window, buffer),
            }
        }
        if use_disc:
            out[DISCRIMINATOR] = {"params": discriminator.init(d_key, images)["params"]}
        return out

    base_info = None

    def write_meta(step: int, st: TrainState) -> None:
        h = codebook_hash(_host_array(st.params[GENERATOR]["quantizer"]["codebook"]))
        if jax.process_index() != 0:
            return
        file = tokenizer_lib.meta_path(workdir_path)
        old = tokenizer_lib.load_vqgan_meta(workdir_path) if file.exists() else {}
        hashes = {k: v for k, v in old.get("codebook_hashes", {}).items() if int(k) < step}
        hashes[str(step)] = h
        tokenizer_lib.write_vqgan_meta(
            workdir_path,
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

    ckpt = _MetaCheckpointer(
        workdir_path,
        save_interval_steps=checkpoint_every,
        max_to_keep=keep_checkpoints,
        async_save=async_checkpoints,
        data_shard=checkpoints.DataShard(shard_index, num_shards, writer_proc),
        write_meta=write_meta,
    )
    state, state_shardings, data, resumed = loop.init_or_restore_state(
        ckpt,
        init_fn,
        tx,
        data_iterator=data,
        mesh=mesh,
        rules=rules,
        seed=seed,
        allow_data_reshuffle=allow_data_reshuffle,
        remake_data=lambda step: make(
            split=split, batch_size=local_batch, seed=seed + step, train=True
        ),
    )
    if not resumed and init_from:
        state, base_info = _warm_start(state, init_from, init_step, vqgan_config, freeze)

    lpips_params = {}
    eval_net = "vgg16" if size < MIN_ALEXNET_SIZE else loss_config.perceptual_net
    if loss_config.perceptual_weight > 0:
        lpips_params = jax.device_put(
            lpips.load_lpips_params(loss_config.perceptual_net),
            NamedSharding(mesh, PartitionSpec()),
        )
    eval_lpips = lpips_params
    if image_grid_every and (eval_net != loss_config.perceptual_net or not lpips_params):
        eval_lpips = jax.device_put(
            lpips.load_lpips_params(eval_net), NamedSharding(mesh, PartitionSpec())
        )
    step_fn = functools.partial(
        train_step,
        model=model,
        discriminator=discriminator,
        loss_config=loss_config,
        learning_rate_fn=optimizers.learning_rate_fn(generator_optimizer),
        freeze=freeze,
        dead_code_reinit=dead_code_reinit,
        dead_code_threshold=dead_code_threshold,
        nan_policy=nan_policy,
    )
    bsh = loop.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {"image": bsh}, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    eval_fn = None
    if image_grid_every:
        eval_fn = _make_eval_fn(
            model=model,
            images=_eval_images(
                functools.partial(
                    _make_pixels,
                    task=task,
                    data_factory=data_factory,
                    image_size=size,
                    shard_index=0,
                    num_shards=1,
                    seed=seed,
                ),
                split,
                eval_split,
                max(num_eval_images, num_grid_images),
            ),
            num_grid_images=num_grid_images,
            lpips_net=eval_net,
            lpips_params=eval_lpips,
            mesh=mesh,
            workdir=workdir_path,
        )

    throughput = metrics_lib.Throughput(
        examples_per_step=batch_size, tokens_per_step=tokens_per_step, num_devices=mesh.size
    )

    def final_eval(result: loop.LoopResult, writer: metrics_lib.MetricWriter) -> None:
        if eval_fn is not None and result.status == "done" and result.step % image_grid_every:
            scores = {f"eval/{k}": v for k, v in eval_fn(result.state, result.step).items()}
            writer.write(result.step, scores)

    result = loop.run_session(
        mesh=mesh,
        rules=rules,
        workdir=workdir_path,
        checkpointer=ckpt,
        tensorboard=tensorboard,
        finish=final_eval,
        train_step=BoundStep(jitted, lpips_params),
        state=state,
        data_iterator=data,
        batch_sharding=bsh,
        num_data_shards=num_shards,
        num_steps=num_steps,
        throughput=throughput,
        log_every=log_every,
        eval_every=image_grid_every,
        eval_fn=eval_fn,
        nan_policy=nan_policy,
    )
    final_hash = codebook_hash(_host_array(result.state.params[GENERATOR]["quantizer"]["codebook"]))
    return VQGANTrainResult(
        result.state, result.step, result.status, result.last_metrics, final_hash
    )
