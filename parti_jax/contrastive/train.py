"""`train_contrastive` (`parti-jax train-contrastive`): the dual encoder on the training loop.

The fourth trainer: it supplies init, optimizer, step and data, and the loop
(`parti_jax.train.loop`) does the rest (resume, SIGTERM, NaN policy, metrics,
checkpoints, sharding, several hosts). Data: the shapes world (built in, with
optional hard negatives from its near-miss captions) or any seqio
`<name>_pixels` task (images and captions; captions tokenized with the
vocabulary). The periodic evaluation measures, on held-out batches, in-batch
retrieval both ways and, on the shapes world, near-miss R-precision: how often
an image's own caption scores above all of its near misses. It returns scalars
only: a dual encoder makes no images, so it writes no image summaries (the other
three trainers return an image grid from their evaluation).

`contrastive_meta.json` records the config, the vocabulary and the text length:
what `load_contrastive` (the scorer, the eval suites, a warm start) needs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parti_jax import loading
from parti_jax.contrastive.data import CaptionBatches, ShapesCaptionsIterator
from parti_jax.contrastive.model import ContrastiveConfig, DualEncoder, contrastive_loss
from parti_jax.models.config import check_counts
from parti_jax.train import loop as loop_lib
from parti_jax.train import optimizers
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import TrainState

PyTree = Any
META_VERSION = 1
SHAPES_WORLD = "shapes_world"
# The near misses a shapes caption can have (two objects: all six).
MAX_HARD_NEGATIVES = 6


def _loss(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array, *, model: DualEncoder,
          enable_dropout: bool, freeze_text: bool = False) -> tuple[jax.Array, dict]:  # fmt: skip
    rngs = {"dropout": rng} if enable_dropout else None
    if freeze_text:  # no backward pass through the text tower
        params = dict(params, text_encoder=jax.lax.stop_gradient(params["text_encoder"]))
    out = model.apply({"params": params}, batch["image"], batch["text"], batch.get("negatives"),
                      enable_dropout, rngs=rngs)  # fmt: skip
    return contrastive_loss(out["image"], out["text"], out["scale"], out.get("negatives"))


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], *, model: DualEncoder,
    freeze_text: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:  # fmt: skip
    """One optimizer step on the symmetric InfoNCE loss; pure, jitted once by the loop."""
    loss_fn = functools.partial(_loss, model=model, enable_dropout=True, freeze_text=freeze_text)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, state.step_rng("dropout")
    )
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state.apply_gradients(grads), metrics


def eval_step(params: PyTree, batch: Mapping[str, jax.Array], *, model: DualEncoder) -> dict:
    """Sums over a held-out batch: loss, retrieval hits both ways, near-miss hits, count."""
    _, m = _loss(params, batch, jax.random.key(0), model=model, enable_dropout=False)
    n = jnp.asarray(batch["image"].shape[0], jnp.float32)
    out = {k: m[k] * n for k in ("loss", "image_to_text_accuracy", "text_to_image_accuracy")}
    if "near_miss_accuracy" in m:
        out["near_miss_accuracy"] = m["near_miss_accuracy"] * n
    return {**out, "count": n}


def make_data(
    task: Any,
    *,
    tokenizer: Any,
    image_size: int,
    text_length: int,
    batch_size: int,
    shard_index: int,
    num_shards: int,
    seed: int,
    split: str,
    hard_negatives: int,
    swap_negatives: bool = False,
    data_factory: Callable[..., Iterator] | None = None,
) -> Iterator[Mapping[str, np.ndarray]]:
    """Host-local batches of {'image', 'text'[, 'negatives']} for `split`."""
    kw = dict(batch_size=batch_size, shard_index=shard_index, num_shards=num_shards)
    train = split == "train"
    if data_factory is not None:
        return data_factory(**kw, seed=seed, split=split)
    if task in (None, SHAPES_WORLD):
        return ShapesCaptionsIterator(
            tokenizer=tokenizer, image_size=image_size, text_length=text_length, split=split,
            hard_negatives=hard_negatives, swap_negatives=swap_negatives, seed=seed, **kw,
        )  # fmt: skip
    from parti_jax.data import pipeline  # TensorFlow: only for seqio tasks

    source = pipeline.make_pixels_iterator(
        task, **kw, split=split, image_size=image_size, text_length=text_length, seed=seed,
        shuffle=train, repeat=train, drop_remainder=True,
    )  # fmt: skip
    return CaptionBatches(source, tokenizer, text_length)


def train_contrastive(
    *,
    workdir: str,
    config: ContrastiveConfig,
    batch_size: int,
    loop: loop_lib.LoopConfig,
    optimizer_config: OptimizerConfig | None = None,
    task: Any = SHAPES_WORLD,
    data_factory: Callable[..., Iterator] | None = None,
    vocab_path: str | None = None,
    text_length: int = 64,
    hard_negatives: int = 0,
    mesh_config: Any = None,
    rules: Any = None,
    eval_steps: int = 4,
    eval_split: str = "validation",
    text_tower_from: str | None = None,
    freeze_text_tower: bool = False,
    swap_negatives: bool = False,
) -> loop_lib.TrainResult:
    """Trains the dual encoder; resumes from `<workdir>/checkpoints` when present.

    Args:
      workdir: checkpoints, metrics.jsonl, contrastive_meta.json.
      config: the towers (ContrastiveConfig; `config.text` is a ModelConfig).
      batch_size: global batch (all hosts): the in-batch negatives of each row.
      loop: steps, cadences, checkpoints, NaN policy, seed (LoopConfig).
      optimizer_config: default AdamW (OptimizerConfig.adamw_defaults()).
      task: 'shapes_world' (built in, TensorFlow-free) or a registered seqio
        `<name>_pixels` task (name or object) whose images are
        `config.image_size` pixels.
      data_factory: instead of `task`: f(batch_size=, shard_index=,
        num_shards=, seed=, split=) -> iterator of {'image', 'text' ids[,
        'negatives' ids [B, K, L]]} host-local batches.
      vocab_path: the SentencePiece model (default: the shipped shapes vocabulary);
        a warm start needs the encoder-decoder's.
      text_length: caption tokens (<= config.text.max_text_length).
      hard_negatives: near-miss captions per image (shapes world only; 0: none,
        at most 6): each joins that image's softmax over captions.
      mesh_config, rules: as for the other trainers (default: all devices on 'data').
      eval_steps, eval_split: held-out batches of the periodic evaluation.
      text_tower_from: a `parti-jax train` work dir: a fresh run starts its text tower
        from that encoder-decoder's text encoder (the same ModelConfig encoder fields,
        checked: the error names what differs; pass its vocabulary as vocab_path),
        a tower that already reads captions: only the image side and the
        projections start from scratch.
      freeze_text_tower: keep the text tower as it starts (LiT's locked tower, here
        the text side): no gradient through it, no update, no optimizer state.
        With `text_tower_from`, the image tower learns to meet the encoder-
        decoder's own reading of captions, and a step costs about half.
      swap_negatives: on the shapes world, the first hard negative of a caption
        that names two objects is the caption with the two swapped ("a red
        circle above a blue square" -> "a blue square above a red circle"):
        the minimal pair of a relation.
    """
    from parti_jax.data.vocab import default_vocab_path

    optimizer_config = optimizer_config or OptimizerConfig.adamw_defaults()
    check_counts("train_contrastive", text_length=text_length, eval_steps=eval_steps)
    check_counts("train_contrastive", low=0, hard_negatives=hard_negatives)
    if hard_negatives > MAX_HARD_NEGATIVES:
        raise ValueError(
            f"train_contrastive.hard_negatives={hard_negatives}: a shapes caption has at most "
            f"{MAX_HARD_NEGATIVES} near misses"
        )
    if hard_negatives and (data_factory is not None or task not in (None, SHAPES_WORLD)):
        raise ValueError(
            "train_contrastive.hard_negatives needs task='shapes_world' (near misses come from "
            "the world's scene specs); set it to 0 for other data"
        )
    if swap_negatives and not hard_negatives:
        raise ValueError(
            "train_contrastive.swap_negatives=True puts the swapped caption among the hard "
            "negatives: set train_contrastive.hard_negatives >= 1"
        )
    if text_length > config.text.max_text_length:
        raise ValueError(
            f"train_contrastive.text_length={text_length} exceeds the text tower's "
            f"ModelConfig.max_text_length={config.text.max_text_length}"
        )
    vocab_path = str(vocab_path or default_vocab_path())
    tokenizer = loading.read_vocabulary(vocab_path)
    if tokenizer.vocab_size > config.text.text_vocab_size:
        raise ValueError(
            f"{vocab_path}: {tokenizer.vocab_size} pieces, more than the text tower's "
            f"ModelConfig.text_vocab_size={config.text.text_vocab_size}"
        )
    warm_start = None  # checked before the work dir is claimed
    if text_tower_from is not None:
        warm_start = tower_from_encoder(text_tower_from, config)
    run = loop_lib.start_run(
        workdir, batch_size=batch_size, mesh_config=mesh_config, rules=rules,
        where="train_contrastive",
    )  # fmt: skip
    data = functools.partial(
        make_data, task, tokenizer=tokenizer, image_size=config.image_size,
        text_length=text_length, batch_size=run.local_batch, shard_index=run.shard.index,
        num_shards=run.shard.count, data_factory=data_factory,
    )  # fmt: skip
    model = DualEncoder(config)

    def init(key):
        images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        return model.init({"params": key}, images, jnp.ones((1, text_length), jnp.int32))

    task_name = getattr(task, "name", task) if data_factory is None else "data_factory"
    run.write_json(
        loading.CONTRASTIVE.file,
        {
            "format_version": META_VERSION,
            "config": config.to_json(),
            "text_length": text_length,
            "vocab_path": os.fspath(vocab_path),
            "vocab_sha256": tokenizer.fingerprint,
            "task": str(task_name or SHAPES_WORLD),
            "batch_size": batch_size,
            "hard_negatives": hard_negatives,
            "text_tower_from": None if text_tower_from is None else os.fspath(text_tower_from),
            "freeze_text_tower": bool(freeze_text_tower),
            "swap_negatives": bool(swap_negatives),
            "optimizer_config": dataclasses.asdict(optimizer_config),
        },
    )
    optimizer = optimizers.make_optimizer(optimizer_config)
    if freeze_text_tower:
        optimizer = optimizers.freeze(optimizer, r"^text_encoder/")
    eval_jit = jax.jit(functools.partial(eval_step, model=model))
    # The evaluation always asks for near misses on the shapes world (its R-precision).
    eval_negatives = 5 if data_factory is None and task in (None, SHAPES_WORLD) else 0

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        batches = data(seed=loop.seed, split=eval_split, hard_negatives=eval_negatives)
        totals = loop_lib.evaluate_sums(run, eval_jit, state.params, batches, eval_steps)
        n = max(totals.pop("count", 0.0), 1.0)
        return {k: v / n for k, v in totals.items()}

    batch_keys = ("image", "text", "negatives") if hard_negatives else ("image", "text")
    return loop_lib.run_training(
        run,
        loop_lib.TrainTask(
            init=init,
            optimizer=optimizer,
            step=functools.partial(train_step, model=model, freeze_text=freeze_text_tower),
            batch_keys=batch_keys,
            data=lambda seed: data(
                seed=seed,
                split="train",
                hard_negatives=hard_negatives,
                swap_negatives=swap_negatives,
            ),
            learning_rate_fn=optimizers.learning_rate_fn(optimizer_config),
            evaluate=evaluate,
            evaluate_at_end=True,
            warm_start=warm_start,
        ),
        loop,
    )


def tower_from_encoder(
    t2i_dir: str | os.PathLike, config: ContrastiveConfig
) -> Callable[[TrainState], TrainState]:
    """`TrainState -> TrainState`: the text tower ('text_encoder') from a `parti-jax train`
    work dir's encoder ('encoder'); the fit is checked now."""
    from parti_jax.models.layers import scan_to_unscanned, unscanned_to_scan
    from parti_jax.train import checkpoints, t2i

    where = f"train_contrastive.text_tower_from={os.fspath(t2i_dir)}"
    record = loading.t2i_record(*loading.read_record(t2i_dir, loading.T2I))
    t2i.check_text_encoder_fit(config.text, record.config, where)
    relayout = None
    if record.config.scan_layers != config.text.scan_layers:
        relayout = unscanned_to_scan if config.text.scan_layers else scan_to_unscanned
    step_dir = checkpoints.resolve_checkpoint_dir(t2i_dir)
    return t2i.TextEncoderWarmStart(
        os.fspath(t2i_dir), str(step_dir), None, relayout,
        source="encoder", target="text_encoder",
    )  # fmt: skip
