"""The text-to-image encoder-decoder task: loss, steps, FLOPs and `train`.

Loss: mean cross-entropy of the image tokens, weighted by
`decoder_loss_weights`, on float32 logits, plus an optional z-loss
(z_loss * log(Z)^2, PaLM style) that keeps the softmax normaliser near 1.
`train_step` and `eval_step` are top-level pure functions; `train` is the
library entry point that `parti-jax train` wraps with gin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from parti_jax import decoding, partitioning, storage
from parti_jax.models.chunked import check_loss_chunk_size, chunked_token_sums
from parti_jax.models.config import ModelConfig, check_counts
from parti_jax.models.layers import conv_sparse_mask
from parti_jax.models.transformer import (
    EncoderDecoder,
    dropout_key,
    make_tokens_to_logits,
    sampler_options,
)
from parti_jax.train import checkpoints, optimizers
from parti_jax.train import loop as loop_lib
from parti_jax.train import metrics as metrics_lib
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import TrainState
from parti_jax.train.synthetic import SyntheticCodesIterator

PyTree = Any
Batch = Mapping[str, jax.Array]
BATCH_KEYS = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)


# ------------------------------------------------------------------- loss


def cross_entropy_sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0
) -> dict[str, jax.Array]:
    """Weighted sums over tokens: cross-entropy, z-loss, correct predictions, weight."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - target_logit
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    return {
        "ce": jnp.sum(ce * weights),
        "z_loss": z_loss * jnp.sum(jnp.square(log_z) * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
    }


def _token_sums(
    model: EncoderDecoder,
    params: PyTree,
    batch: Batch,
    *,
    z_loss: float = 0.0,
    loss_chunk_size: int | None = None,
    **apply_kw: Any,
) -> dict[str, jax.Array]:
    """Cross-entropy sums of a batch: whole logits, or chunked (`chunked_token_sums`)."""
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    variables = {"params": params}
    if loss_chunk_size is None:
        logits = model.apply(variables, enc, dec, **apply_kw)
        return cross_entropy_sums(logits, targets, weights, z_loss)
    hidden = model.apply(variables, enc, dec, method=EncoderDecoder.hidden_states, **apply_kw)

    def project(h: jax.Array) -> jax.Array:
        return model.apply(variables, h, method=EncoderDecoder.logits_from_hidden)

    sums = functools.partial(cross_entropy_sums, z_loss=z_loss)
    return chunked_token_sums(hidden, project, (targets, weights), sums, loss_chunk_size)


def _loss_fn(params, batch, rng, *, model, z_loss, scale, loss_chunk_size=None):
    """Loss of a (micro-)batch, normalised by `scale` = whole-batch weight / micro-batches."""
    if isinstance(model, EncoderDecoder):  # (tests pass stand-ins without a config)
        rng = dropout_key(model.config, rng)
    sums = _token_sums(
        model,
        params,
        batch,
        z_loss=z_loss,
        loss_chunk_size=loss_chunk_size,
        enable_dropout=True,
        rngs={"dropout": rng},
    )
    loss = (sums["ce"] + sums["z_loss"]) / scale
    aux = {
        "cross_entropy": sums["ce"] / scale,
        "z_loss": sums["z_loss"] / scale,
        "accuracy": sums["correct"] / scale,
    }
    return loss, aux


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: EncoderDecoder,
    z_loss: float = 0.0,
    num_micro_batches: int = 1,
    loss_chunk_size: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Pure; the loop jits it once with shardings and donation
    (and adds the learning rate and the NaN policy).

    The weighted mean is exact under gradient accumulation: each micro-batch
    normalises by the whole batch's weight (times the number of slices).
    `loss_chunk_size` computes the loss that many image tokens at a time
    (`chunked_token_sums`): same loss and gradients, without the
    whole [B, N, V] float32 logits in memory.
    """
    weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)
    scale = weight / num_micro_batches
    loss_fn = functools.partial(
        _loss_fn, model=model, z_loss=z_loss, scale=scale, loss_chunk_size=loss_chunk_size
    )
    loss, aux, grads = loop_lib.accumulate_gradients(
        loss_fn, state.params, batch, state.step_rng("dropout"), num_micro_batches
    )
    grad_norm = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads)
    metrics = {
        "loss": aux["cross_entropy"],
        "total_loss": loss,
        "z_loss": aux["z_loss"],
        "accuracy": aux["accuracy"],
        "perplexity": jnp.exp(aux["cross_entropy"]),
        "grad_norm": grad_norm,
        "tokens": weight,
    }
    return new_state, metrics


def eval_step(
    params: PyTree, batch: Batch, *, model: EncoderDecoder, loss_chunk_size: int | None = None
) -> dict[str, jax.Array]:
    """Weighted sums (ce, correct, weight) of one batch, without dropout."""
    sums = _token_sums(model, params, batch, loss_chunk_size=loss_chunk_size)
    return {k: sums[k] for k in ("ce", "correct", "weight")}


# ------------------------------------------------------------------ FLOPs


def t2i_flops_per_step(config: ModelConfig, batch_size: int, text_len: int) -> float:
    """Useful training FLOPs of one step, counted per stack (docs/DESIGN.md §6).

    Encoder weights see the text tokens; decoder self-attention and MLP
    weights the image tokens; cross-attention K/V projections the text
    tokens and Q/O the image tokens; plus attention scores over the keys each
    query sees (causal for the decoder's self-attention, the conv window's
    cells for 'conv_sparse'); logits projection on image tokens; embedding
    lookups excluded; x3 for forward + backward (remat not counted).
    """
    d = config.d_model
    attn = config.num_heads * config.kv_dim
    n_img = config.num_image_tokens
    mlp_mats = 3 if config.mlp_activation in ("gated_gelu", "swiglu") else 2
    mlp = 2 * mlp_mats * d * config.mlp_dim  # per token
    qkvo = 2 * 4 * d * attn
    enc_attention = text_len * qkvo + 2 * 2 * text_len * text_len * attn
    enc_layer = text_len * mlp + (enc_attention if config.encoder_attention else 0)
    if config.decoder_attention == "conv_sparse":
        seen = float(conv_sparse_mask(config.image_grid, config.conv_kernel_size).sum())
    else:
        seen = n_img * (n_img + 1) / 2  # causal
    dec_layer = (
        n_img * (qkvo + mlp)  # self-attention projections + MLP
        + 2 * 2 * attn * seen  # self-attention scores and weighted values
        + n_img * 2 * 2 * d * attn  # cross-attention Q, O
        + text_len * 2 * 2 * d * attn  # cross-attention K, V
        + 2 * 2 * n_img * text_len * attn  # cross-attention scores
    )
    logits = n_img * 2 * d * config.decoder_vocab_size
    forward = config.num_encoder_layers * enc_layer + config.num_decoder_layers * dec_layer + logits
    return 3.0 * forward * batch_size


# --------------------------------------------------------------- helpers


def _make_iterator(
    *,
    task: Any,
    data_factory: Callable[..., Iterator] | None,
    config: ModelConfig,
    local_batch: int,
    text_length: int,
    shard_index: int,
    num_shards: int,
    seed: int,
    split: str,
    conditioning_dropout_rate: float,
) -> Iterator:
    if data_factory is not None:
        return data_factory(
            batch_size=local_batch, shard_index=shard_index, num_shards=num_shards, seed=seed
        )
    if task is None or task == "synthetic":
        return SyntheticCodesIterator(
            batch_size=local_batch,
            text_length=text_length,
            text_vocab_size=config.text_vocab_size,
            codebook_size=config.codebook_size,
            image_grid=config.image_grid,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed + (0 if split == "train" else 1_000_003),
        )
    from parti_jax.data import pipeline

    train = split == "train"
    return pipeline.make_codes_iterator(
        task,
        batch_size=local_batch,
        split=split,
        feature_lengths={"inputs": text_length, "targets": config.num_image_tokens},
        shard_index=shard_index,
        num_shards=num_shards,
        seed=seed,
        shuffle=train,
        repeat=train,
        conditioning_dropout_rate=conditioning_dropout_rate if train else 0.0,
    )


# ------------------------------------------------- text encoder warm start
# The contrastive model's record (`parti-jax train-contrastive`); its 'config'
# holds the text tower's ModelConfig under 'text' (parti_jax/contrastive sits
# above this package, so the record is read here as plain JSON).
CONTRASTIVE_META = "contrastive_meta.json"
# ModelConfig fields that shape the encoder's parameters (a warm start needs them
# equal; scan_layers converts, head_dim compares as the width used).
ENCODER_FIELDS = (
    "text_vocab_size", "max_text_length", "text_positions", "d_model", "num_heads", "head_dim",
    "mlp_dim", "num_encoder_layers", "mlp_activation", "norm_type", "encoder_attention",
)  # fmt: skip


def check_text_encoder_fit(tower: ModelConfig, config: ModelConfig, where: str) -> None:
    """Raises ValueError naming every encoder field that differs between a contrastive
    text tower's ModelConfig and the encoder-decoder's, and the fix."""

    def value(c: ModelConfig, field: str) -> Any:
        return c.kv_dim if field == "head_dim" else getattr(c, field)

    diff = [
        f"{f}: tower {value(tower, f)!r} vs train {value(config, f)!r}"
        for f in ENCODER_FIELDS
        if value(tower, f) != value(config, f)
    ]
    if diff:
        raise ValueError(
            f"{where}: the contrastive text tower does not fit this encoder ({'; '.join(diff)}); "
            "train the contrastive model with ContrastiveConfig.text = the same ModelConfig "
            "(gin: ContrastiveConfig.text = @ModelConfig()) or change train's ModelConfig to "
            "match"
        )


@dataclasses.dataclass(frozen=True)
class TextEncoderWarmStart:
    """`TrainState -> TrainState`: the encoder-decoder's 'encoder' parameters set to a
    contrastive checkpoint's text tower ('text_encoder'); made by
    `text_encoder_warm_start`, which checks the fit and finds the checkpoint first.
    With source='encoder', target='text_encoder' it goes the other way: a contrastive
    model's text tower from an encoder-decoder's encoder (`train_contrastive`)."""

    contrastive_dir: str  # the work dir read from
    checkpoint: str  # the <step> folder whose text tower is used
    vocab_sha256: str | None  # the vocabulary the tower was trained with
    relayout: Callable[[PyTree], PyTree] | None = None  # scan <-> unrolled layers
    source: str = "text_encoder"  # the checkpoint's subtree
    target: str = "encoder"  # this model's subtree

    def record(self) -> dict[str, Any]:
        """model_config.json's 'text_encoder_from'."""
        return {"workdir": self.contrastive_dir, "checkpoint": self.checkpoint,
                "step": int(storage.path(self.checkpoint).name),
                "vocab_sha256": self.vocab_sha256}  # fmt: skip

    def _convert(self, params: PyTree) -> PyTree:
        tower = params[self.source]
        return {self.target: self.relayout(tower) if self.relayout else tower}

    def __call__(self, state: TrainState) -> TrainState:
        params, names = checkpoints.restore_params_from(
            self.checkpoint, state.params, include=f"^{self.target}/", convert=self._convert,
            fix="give the text tower and the encoder-decoder the same encoder ModelConfig",
        )  # fmt: skip
        metrics_lib.console(
            f"warm start: '{self.target}' ({len(names)} arrays) from '{self.source}' of "
            f"{self.checkpoint}"
        )
        return state.replace(params=params)


def text_encoder_warm_start(
    contrastive_dir: str, model_config: ModelConfig, *, step: int | None = None
) -> TextEncoderWarmStart:
    """The warm start of the encoder from a `parti-jax train-contrastive` work dir's text
    tower (latest or `step` checkpoint). Reads its contrastive_meta.json and checks the
    tower's fit (ValueError naming each differing field) and that a checkpoint exists
    (CheckpointError): nothing is restored or compiled yet."""
    from parti_jax.models.layers import scan_to_unscanned, unscanned_to_scan

    where = f"train.text_encoder_from={contrastive_dir}"
    file = storage.join(contrastive_dir, CONTRASTIVE_META)
    try:
        meta = json.loads(storage.read_text(file))
        text = meta["config"]["text"]
        tower = ModelConfig(**dict(text, image_grid=tuple(text["image_grid"])))
    except FileNotFoundError:
        raise ValueError(
            f"{where}: no {CONTRASTIVE_META}; pass the --workdir of `parti-jax train-contrastive`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{file}: not a readable contrastive record ({type(e).__name__}: {e}); pass the "
            "--workdir of `parti-jax train-contrastive`"
        ) from None
    check_text_encoder_fit(tower, model_config, where)
    relayout = None
    if tower.scan_layers != model_config.scan_layers:
        relayout = unscanned_to_scan if model_config.scan_layers else scan_to_unscanned
    step_dir = checkpoints.resolve_checkpoint_dir(contrastive_dir, step)
    return TextEncoderWarmStart(
        str(contrastive_dir), str(step_dir), meta.get("vocab_sha256"), relayout
    )


def _tower_record(run: loop_lib.Run, tower: Any) -> dict[str, Any] | None:
    """model_config.json's 'text_encoder_from': the tower's workdir and checkpoint. A
    resumed run keeps its first launch's record (the warm start happened then, or not
    at all: the contrastive work dir may have newer checkpoints since, and a warm start
    added on a resume is not applied)."""
    record = None if tower is None else tower.record()
    try:
        checkpoints.resolve_checkpoint_dir(run.workdir)  # raises on a fresh run
        previous = json.loads(storage.read_text(storage.join(run.workdir, "model_config.json")))
    except (OSError, ValueError):
        return record
    return previous.get("text_encoder_from") if isinstance(previous, dict) else record


# ------------------------------------------------------- eval sample grid
CodeDecoder = Callable[[np.ndarray], np.ndarray]  # codes int [B, h, w] -> float32 [B, H, W, 3]
# codes_meta.json -> the decoder of the VQGAN that made the codes (raises ValueError or
# OSError when it cannot). parti_jax.vqgan sits a layer above train, so the caller passes
# it (the CLI and the demo: parti_jax.vqgan.tokenizer.code_decoder).
CodeDecoderLoader = Callable[[Mapping[str, Any]], CodeDecoder]


@contextlib.contextmanager
def outside_training_mesh() -> Iterator[None]:
    """No mesh and no logical rules around the body: the VQGAN loads and runs on its own
    (local) mesh, not under the training loop's."""
    with jax.set_mesh(None), nn.logical_axis_rules(()):
        yield


class EvalSampleGrid:
    """At each evaluation: greedy samples for the first `num` captions of the eval split,
    decoded by the VQGAN that made the codes, above those captions' own images: one uint8
    [H, W, 3] grid, returned as eval/samples for the loop's image writers.

    Set up at the first evaluation (the captions, the jitted sampler, the VQGAN on
    process 0). Every process draws (a collective on the training mesh); process 0
    decodes. When the VQGAN cannot be loaded, or drawing fails, one line says so and the
    grid is off for the rest of the run: a picture never stops training.
    """

    def __init__(
        self, run: loop_lib.Run, model: EncoderDecoder, codes_meta: Mapping[str, Any], num: int,
        load_decoder: CodeDecoderLoader,
    ) -> None:  # fmt: skip
        self.run, self.config, self.codes_meta, self.num = run, model.config, codes_meta, num
        self.load_decoder = load_decoder
        self.on: bool | None = None  # None: not set up yet
        self.decode: CodeDecoder | None = None
        self.text: jax.Array | None = None
        self.references: np.ndarray | None = None
        cfg = model.config

        def draw(params: PyTree, text: jax.Array) -> jax.Array:
            tokens_to_logits, cache = make_tokens_to_logits(model, params, text)
            rows = text.shape[0]
            return decoding.sample(
                tokens_to_logits, cache, num_steps=cfg.num_image_tokens,
                prompt_ids=jnp.arange(rows, dtype=jnp.int32),
                sample_indices=jnp.zeros((rows,), jnp.int32), seed=0, temperature=0.0,
                num_valid_tokens=cfg.codebook_size + 1, mesh=run.mesh, **sampler_options(cfg),
            ).tokens  # fmt: skip

        self._draw = jax.jit(draw, out_shardings=run.replicated)

    def _off(self, why: str) -> dict[str, np.ndarray]:
        metrics_lib.console(f"eval samples: off ({why})")
        self.on = False
        return {}

    def _set_up(self, batch: Mapping[str, np.ndarray]) -> None:
        """The captions (and their images' codes) of the eval split's first batch, padded
        to rows that split over the mesh's batch devices; the VQGAN on process 0."""
        run = self.run
        text = np.asarray(batch["encoder_input_tokens"])[: self.num]
        targets = np.asarray(batch["decoder_target_tokens"])[: len(text)]
        self.num = len(text)
        devices, hosts = partitioning.batch_devices(run.mesh), run.shard.count
        per_host = devices // hosts if devices % hosts == 0 else devices
        rows = -(-self.num // per_host) * per_host
        padded = np.concatenate([text, np.repeat(text[-1:], rows - self.num, axis=0)])
        self.text = run.global_batch({"text": padded})["text"]
        problem = ""
        if run.is_primary:
            try:
                with outside_training_mesh():
                    self.decode = self.load_decoder(self.codes_meta)
                    codes = decoding.tokens_to_codes(targets).reshape(-1, *self.config.image_grid)
                    self.references = self.decode(codes)
            except Exception as e:  # noqa: BLE001 - any reason: the run goes on without it
                problem = f"the VQGAN does not load: {type(e).__name__}: {e}".splitlines()[0]
        # Every process draws or none does (the draw is a collective).
        if checkpoints.process_max(int(bool(problem))):
            self._off(problem or "the VQGAN does not load on process 0")
        else:
            self.on = True

    def __call__(self, params: PyTree, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{'samples': grid} (process 0), {} elsewhere or when off; `batch`: the eval
        split's first batch (read at the first call only)."""
        if self.on is None:
            self._set_up(batch)
        if not self.on:
            return {}
        try:
            tokens = self._draw(params, self.text)
            tokens = np.asarray(tokens.addressable_data(0))[: self.num]
            if not self.run.is_primary:
                return {}
            codes = decoding.tokens_to_codes(tokens, self.config.codebook_size)
            with outside_training_mesh():
                samples = self.decode(codes.reshape(-1, *self.config.image_grid))
        except Exception as e:  # noqa: BLE001 - a picture never stops training
            return self._off(f"drawing failed: {type(e).__name__}: {e}".splitlines()[0])
        return {"samples": metrics_lib.image_grid([samples, self.references])}


# ------------------------------------------------------------------ train


def train_task(
    model_config: ModelConfig,
    *,
    optimizer_config: OptimizerConfig,
    text_length: int,
    **step_options: Any,
) -> loop_lib.TrainTask:
    """The encoder-decoder's init, optimizer and step: what `train` runs (with its data),
    and what the memory planner and the benchmark compile. `step_options` go to
    `train_step` (z_loss, num_micro_batches, loss_chunk_size)."""
    model = EncoderDecoder(model_config)

    def init(key):
        text = jnp.ones((1, text_length), jnp.int32)
        image = jnp.zeros((1, model_config.num_image_tokens), jnp.int32)
        return model.init({"params": key}, text, image)

    return loop_lib.TrainTask(
        init=init,
        optimizer=optimizers.make_optimizer(optimizer_config),
        step=functools.partial(train_step, model=model, **step_options),
        batch_keys=BATCH_KEYS,
        learning_rate_fn=optimizers.learning_rate_fn(optimizer_config),
    )


def train(
    *,
    workdir: str,
    model_config: ModelConfig,
    batch_size: int,
    loop: loop_lib.LoopConfig,
    mesh_config: Any = None,
    rules: Any = None,
    optimizer_config: OptimizerConfig | None = None,
    task: Any = None,
    data_factory: Callable[..., Iterator] | None = None,
    text_length: int = 128,
    conditioning_dropout_rate: float = 0.0,
    num_micro_batches: int = 1,
    z_loss: float = 0.0,
    loss_chunk_size: int | None = None,
    eval_steps: int = 10,
    eval_split: str = "validation",
    num_eval_samples: int | None = 4,
    code_decoder_loader: CodeDecoderLoader | None = None,
    restore_from: str | None = None,
    restore_include: str | None = None,
    text_encoder_from: str | None = None,
    codebook_hash: str | None = None,
    peak_flops: float | None = None,
) -> loop_lib.TrainResult:
    """Trains the encoder-decoder; resumes from `<workdir>/checkpoints` when present.

    Args:
      workdir: checkpoints, metrics.jsonl, model_config.json, profile/.
      model_config: the encoder-decoder (ModelConfig).
      batch_size: global batch (all hosts together).
      loop: steps, cadences, checkpoints, NaN policy, seed (LoopConfig).
      mesh_config: partitioning.MeshConfig (or a ready jax Mesh); None: the
        default MeshConfig (all devices on 'fsdp').
      rules: rule table name ('data_parallel', 'fsdp', 'fsdp_tp') or table;
        None: `mesh_config.rules`.
      optimizer_config: OptimizerConfig (None: the paper's Adafactor).
      task: a registered `<name>_codes` task or mixture (name or seqio
        object, e.g. from `register_codes_task`); None or 'synthetic':
        structured synthetic codes (no TensorFlow).
      data_factory: instead of `task`: f(batch_size=, shard_index=,
        num_shards=, seed=) -> iterator of host-local batches.
      text_length: encoder input length.
      conditioning_dropout_rate: share of captions replaced by [EOS] (for
        classifier-free guidance; codes tasks only).
      num_micro_batches: gradient accumulation slices per step.
      z_loss: weight of the log(Z)^2 term (0: off).
      loss_chunk_size: compute the loss this many image tokens at a time (a
        divisor of the grid's tokens) so the [B, N, V] float32 logits never
        exist whole; None: all at once (same values either way).
      eval_steps, eval_split: batches and split of the validation loss, every
        `loop.eval_every` steps.
      num_eval_samples: at each evaluation of a codes task, greedy samples for the
        first this many captions of `eval_split`, decoded by the VQGAN that made the
        codes (codes_meta.json's vqgan_checkpoint), above those captions' own images:
        the image eval/samples (TensorBoard, W&B). 0 or None: off; off with one line
        when that VQGAN does not load; synthetic codes and `data_factory` have none.
      code_decoder_loader: codes_meta -> that VQGAN's decoder (the CLI and the demo
        pass parti_jax.vqgan.tokenizer.code_decoder); None: no sample grid.
      restore_from: warm start (params only) from another run's work
        directory or checkpoint, when this workdir has no checkpoint yet;
        scanned/unscanned layouts are converted.
      restore_include: regex of parameter paths to warm-start (e.g. 'encoder/.*').
      text_encoder_from: a `parti-jax train-contrastive` work directory: when this
        workdir has no checkpoint yet, the text encoder starts from its latest
        checkpoint's text tower (after `restore_from`, when both are set, so the
        tower's encoder wins). The tower must have this ModelConfig's encoder
        fields (checked before anything compiles; scanned/unscanned layers are
        converted) and, for a codes task, the task's vocabulary.
      codebook_hash: expected codebook hash of the codes (checked when set).
      peak_flops: per-device peak FLOP/s for MFU (default: known devices).
    """
    optimizer_config = optimizer_config or OptimizerConfig()
    check_counts("train", text_length=text_length, eval_steps=eval_steps)
    check_counts("train", 0, num_eval_samples=num_eval_samples)
    if num_micro_batches < 1 or batch_size % num_micro_batches:
        raise ValueError(
            f"train.num_micro_batches={num_micro_batches} must be >= 1 and divide "
            f"train.batch_size={batch_size}"
        )
    try:
        check_loss_chunk_size(loss_chunk_size, model_config.num_image_tokens)
    except ValueError as e:
        raise ValueError(f"train.{e}") from None
    if text_length > model_config.max_text_length:
        raise ValueError(
            f"train.text_length={text_length} exceeds ModelConfig.max_text_length="
            f"{model_config.max_text_length}"
        )
    tower = None
    if text_encoder_from:  # checked before anything runs or compiles
        tower = text_encoder_warm_start(text_encoder_from, model_config)
    run = loop_lib.start_run(
        workdir,
        batch_size=batch_size,
        mesh_config=mesh_config,
        rules=rules,
        default_mesh=partitioning.MeshConfig(),
    )
    partitioning.check_mesh_compat(model_config, run.mesh, run.rules)  # before anything compiles
    codes_meta = {}
    if task not in (None, "synthetic") and data_factory is None:
        from parti_jax.data import codes as codes_lib  # noqa: PLC0415 - TensorFlow with the task

        codes_meta = codes_lib.check_codes_task(
            task,
            codebook_size=model_config.codebook_size,
            grid=model_config.image_grid,
            codebook_hash=codebook_hash,
            eval_split=eval_split if loop.eval_every else None,
            vocab_sha256=tower.vocab_sha256 if tower is not None else None,
            vocab_where=f"train.text_encoder_from={text_encoder_from}: its text tower",
            vocab_fix="train the contrastive model with train_contrastive.vocab_path = the "
            "codes task's vocabulary",
        )
    make_data = functools.partial(
        _make_iterator,
        task=task,
        data_factory=data_factory,
        config=model_config,
        local_batch=run.local_batch,
        text_length=text_length,
        shard_index=run.shard.index,
        num_shards=run.shard.count,
        conditioning_dropout_rate=conditioning_dropout_rate,
    )

    def warm_start(state: TrainState) -> TrainState:
        if restore_from:
            step_dir = checkpoints.resolve_checkpoint_dir(restore_from)
            params, names = checkpoints.restore_params_from(
                step_dir, state.params, include=restore_include
            )
            metrics_lib.console(f"warm start: {len(names)} parameter(s) from {step_dir}")
            state = state.replace(params=params)
        return tower(state) if tower is not None else state

    run.write_json(
        "model_config.json",
        {
            "model_config": dataclasses.asdict(model_config),
            "optimizer_config": dataclasses.asdict(optimizer_config),
            "batch_size": batch_size,
            "text_length": text_length,
            "task": getattr(task, "name", task) or "synthetic",
            "codes_meta": {k: v for k, v in codes_meta.items() if k != "shards"},
            "text_encoder_from": _tower_record(run, tower),
        },
    )
    task_spec = train_task(
        model_config,
        optimizer_config=optimizer_config,
        text_length=text_length,
        num_micro_batches=num_micro_batches,
        z_loss=z_loss,
        loss_chunk_size=loss_chunk_size,
    )
    model = EncoderDecoder(model_config)
    eval_jit = jax.jit(functools.partial(eval_step, model=model, loss_chunk_size=loss_chunk_size))

    samples = None
    wants_grid = num_eval_samples and code_decoder_loader is not None
    if wants_grid and task not in (None, "synthetic") and data_factory is None:
        samples = EvalSampleGrid(run, model, codes_meta, num_eval_samples, code_decoder_loader)

    def evaluate(state: TrainState, step: int) -> dict[str, Any]:
        batches = make_data(seed=loop.seed, split=eval_split)
        out: dict[str, Any] = {}
        if samples is not None:
            first = next(batches, None)  # the sample captions are its first rows
            if first is not None:
                batches = itertools.chain([first], batches)
                out.update(samples(state.params, first))
        totals = loop_lib.evaluate_sums(run, eval_jit, state.params, batches, eval_steps)
        w = max(totals.get("weight", 0.0), 1.0)
        out.update(loss=totals.get("ce", 0.0) / w, accuracy=totals.get("correct", 0.0) / w)
        return out

    task_spec = dataclasses.replace(
        task_spec,
        data=lambda seed: make_data(seed=seed, split="train"),
        evaluate=evaluate,
        warm_start=warm_start if restore_from or tower is not None else None,
        flops_per_step=t2i_flops_per_step(model_config, batch_size, text_length),
        tokens_per_step=batch_size * (text_length + model_config.num_image_tokens),
        peak_flops=peak_flops,
    )
    return loop_lib.run_training(run, task_spec, loop)
