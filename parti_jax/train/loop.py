"""The one training loop: all four trainers (encoder-decoder, ViT-VQGAN, upsampler,
contrastive) run on it.

A trainer validates its own settings, then

    run = loop.start_run(workdir, batch_size=..., mesh_config=..., rules=..., where="train")
    task = loop.TrainTask(init=..., optimizer=..., step=..., data=..., batch_keys=...)
    return loop.run_training(run, task, loop_config)

`start_run` resolves the mesh, this host's data shard and the per-host batch;
the trainer builds its model, step and data with them. `run_training` owns
the rest: the checkpointer, init-or-restore (the data position included, and
a warm start for a fresh run), the step jitted once with shardings and state
donation, the NaN policy, metrics (metrics.jsonl, TensorBoard, Weights & Biases as
`LoopConfig.writers` chooses, the console),
periodic and final evaluation, a profiler window, checkpoints every K steps
and at the end, and the save when the job is told to stop (SIGTERM).
`LoopConfig` holds the loop's settings; gin binds it once per trainer, e.g.
`train.loop = @train/LoopConfig()` with `train/LoopConfig.num_steps = 1000`.

Pieces a step function reuses: `accumulate_gradients` (micro-batches under
`lax.scan`) and `keep_if_finite` (the 'skip' NaN policy without a host sync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from parti_jax import partitioning, storage
from parti_jax.train import distributed
from parti_jax.train import metrics as metrics_lib
from parti_jax.train.checkpoints import Checkpointer, DataShard, process_max
from parti_jax.train.state import TrainState, sharded_train_state
from parti_jax.workdir import claim_workdir

PyTree = Any
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
NAN_POLICIES = ("stop", "skip")
# The VQGAN's and upsampler's default mesh: every device on 'data', parameters replicated.
DATA_PARALLEL_MESH = partitioning.MeshConfig(data=-1, fsdp=1, tensor=1, rules="data_parallel")


class NonFiniteLossError(RuntimeError):
    """Raised by the loop ('stop' policy) at the first step whose loss is NaN/Inf."""


# ------------------------------------------------------------------ settings


def _check_int(where: str, value: Any, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        none = " or None" if optional else ""
        raise ValueError(f"{where}={value!r} must be an integer >= {low}{none}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long and how a trainer runs: steps, cadences, checkpoints, NaN policy, seed."""

    # Total optimizer steps; a resumed run continues up to it.
    num_steps: int
    # Parameters, dropout and data order are drawn from it.
    seed: int = 0
    # Metrics are fetched from the devices and written every this many steps.
    log_every: int = 50
    # Evaluate every this many steps (None: never; trainers without an eval ignore it).
    eval_every: int | None = None
    # Save a checkpoint every this many steps (and always at the end).
    checkpoint_every: int = 1000
    # Newest checkpoints kept (at least 2: a damaged newest one falls back to the one before).
    keep_checkpoints: int = 3
    # Resume from this step instead of the newest intact checkpoint (newer ones are kept aside).
    restore_step: int | None = None
    # Write checkpoints in the background while training goes on.
    async_checkpoints: bool = True
    # 'stop': raise naming the first step whose loss is not finite; 'skip': drop that update.
    nan_policy: str = "stop"
    # (first, last) step of a profiler trace written to <workdir>/profile.
    profile_steps: tuple[int, int] | None = None
    # TensorBoard event files in <workdir>/tensorboard (metrics.jsonl is always written);
    # False turns them off whatever `writers` says.
    tensorboard: bool = True
    # The metric writers besides metrics.jsonl (TensorBoard, Weights & Biases); None:
    # `WriterConfig()`, TensorBoard only. Gin: `LoopConfig.writers = @WriterConfig()`.
    writers: metrics_lib.WriterConfig | None = None
    # Resume with another number of data shards by starting a fresh data order.
    allow_data_reshuffle: bool = False
    # Write a hash of each host-local batch to data_hash.process_<i>.jsonl (data-order checks).
    log_data_hash: bool = False

    def __post_init__(self) -> None:
        _check_int("LoopConfig.num_steps", self.num_steps, 1)
        _check_int("LoopConfig.seed", self.seed, 0)
        _check_int("LoopConfig.log_every", self.log_every, 1)
        _check_int("LoopConfig.eval_every", self.eval_every, 1, optional=True)
        _check_int("LoopConfig.checkpoint_every", self.checkpoint_every, 1)
        _check_int("LoopConfig.keep_checkpoints", self.keep_checkpoints, 2)
        _check_int("LoopConfig.restore_step", self.restore_step, 0, optional=True)
        if self.writers is not None and not isinstance(self.writers, metrics_lib.WriterConfig):
            raise ValueError(
                f"LoopConfig.writers={self.writers!r} must be a WriterConfig "
                "(gin: LoopConfig.writers = @WriterConfig())"
            )
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"LoopConfig.nan_policy={self.nan_policy!r}: expected one of {NAN_POLICIES}"
            )
        if self.profile_steps is not None:
            p = tuple(self.profile_steps)
            if (
                len(p) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) for s in p)
                or (not 0 <= p[0] < p[1])
            ):
                raise ValueError(
                    f"LoopConfig.profile_steps={self.profile_steps!r} must be (first, last) "
                    "steps with 0 <= first < last"
                )
            object.__setattr__(self, "profile_steps", p)


# --------------------------------------------------------- step-side pieces


def split_micro_batches(batch: PyTree, num_micro_batches: int) -> PyTree:
    """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...

    Strided (not contiguous) rows, so each device's shard of the batch holds
    rows of every micro-batch and no data moves between devices.
    """

    def split(x):
        b = x.shape[0]
        if b % num_micro_batches:
            raise ValueError(
                f"batch size {b} is not divisible by num_micro_batches={num_micro_batches}"
            )
        x = x.reshape((b // num_micro_batches, num_micro_batches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    rng: jax.Array,
    num_micro_batches: int = 1,
) -> tuple[jax.Array, dict, PyTree]:
    """Mean loss, mean aux metrics and mean gradients over `num_micro_batches` slices.

    `loss_fn(params, batch, rng) -> (loss, aux)`; with k micro-batches it runs
    k times under `lax.scan` on [B/k] slices (rng folded with the slice
    index), so activation memory is that of one slice. Losses that must be
    exact over the whole batch (weighted means) should normalise by a
    whole-batch denominator times k; see parti_jax.train.t2i.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches <= 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return loss, aux, grads
    micro = split_micro_batches(batch, num_micro_batches)

    def body(carry, xs):
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        acc_loss, acc_aux, acc_grads = carry
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc_grads, grads)
        acc_aux = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc_aux, aux)
        return (acc_loss + loss, acc_aux, acc_grads), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda: loss_fn(params, first, rng)[1])
    zeros = (
        jnp.zeros([], jnp.float32),
        jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape),
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
    )
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro_batches), micro))
    k = float(num_micro_batches)
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
    return loss / k, jax.tree.map(lambda a: a / k, aux), grads


def keep_if_finite(ok: jax.Array, new_state: TrainState, old_state: TrainState) -> TrainState:
    """`new_state` where `ok`, else the old params/optimizer/model state (step still advances).

    A select inside the jitted step: skipping a poisoned batch costs no host sync.
    """

    def pick(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    return new_state.replace(
        params=pick(new_state.params, old_state.params),
        opt_state=pick(new_state.opt_state, old_state.opt_state),
        model_state=pick(new_state.model_state, old_state.model_state),
    )


# --------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Run:
    """Where a training run happens: work dir, mesh and rules, this host's data shard."""

    workdir: storage.Path  # a local folder or a URL (gs://bucket/run): parti_jax/storage.py
    mesh: jax.sharding.Mesh
    rules: tuple
    batch_size: int  # global, all hosts together
    shard: DataShard  # this host's data shard and whether it writes the shard's position

    @property
    def local_batch(self) -> int:
        """Rows this host reads per step."""
        return self.batch_size // self.shard.count

    @property
    def batch_sharding(self) -> NamedSharding:
        return partitioning.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def is_primary(self) -> bool:
        return jax.process_index() == 0

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global jax arrays from this host's rows."""
        sharding, n = self.batch_sharding, self.shard.count
        return {
            k: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), (np.shape(v)[0] * n, *np.shape(v)[1:])
            )
            for k, v in local.items()
        }

    def write_json(self, name: str, content: Any) -> None:
        """`<workdir>/<name>` from process 0, atomically (a reader sees it whole or not)."""
        if self.is_primary:
            storage.write_json(storage.join(self.workdir, name), content, default=str)


def start_run(
    workdir: str | os.PathLike,
    *,
    batch_size: int,
    mesh_config: Any = None,
    rules: Any = None,
    default_mesh: partitioning.MeshConfig = DATA_PARALLEL_MESH,
    where: str = "train",
) -> Run:
    """Claims the work dir (its kind, one writer), builds the mesh, finds this host's data shard.

    `mesh_config` is a MeshConfig or a ready Mesh (default `default_mesh`);
    `rules` a rule-table name or table (default the MeshConfig's). The global
    `batch_size` must divide over the data shards (hosts) and over the devices
    of the batch axes; the errors name `<where>.batch_size`.
    """
    _check_int(f"{where}.batch_size", batch_size, 1)
    if isinstance(mesh_config, jax.sharding.Mesh):
        mesh = mesh_config
    else:
        mesh = partitioning.create_mesh(mesh_config or default_mesh)
        default_mesh = mesh_config or default_mesh
    rules = default_mesh.rules if rules is None else rules
    rules = tuple(map(tuple, partitioning.get_rules(rules) if isinstance(rules, str) else rules))
    index, count, writer = distributed.data_shard(mesh)
    devices = partitioning.batch_devices(mesh)
    for n, what in ((count, "data shards (hosts)"), (devices, "data x fsdp devices")):
        if batch_size % n:
            raise ValueError(
                f"{where}.batch_size={batch_size} does not divide over the mesh's {n} {what}; "
                f"choose a multiple of {n}"
            )
    # The kind marker and the lock, before anything is written (re-entrant in a process).
    workdir = claim_workdir(workdir, where.replace("_", "-"))
    return Run(workdir, mesh, rules, batch_size, DataShard(index, count, writer))


@dataclasses.dataclass
class TrainTask:
    """What a trainer supplies to `run_training`; everything else is the loop's."""

    # key -> logically boxed variables (`model.init`); {group: variables} with several optimizers.
    init: Callable[[jax.Array], PyTree]
    # optax transformation, or {group: transformation} (one per parameter group).
    optimizer: Any
    # Pure `step(state, batch, *constants) -> (state, metrics)`; metrics hold 'loss' and
    # 'grad_norm' (the 'skip' NaN policy tests them).
    step: Callable[..., tuple[TrainState, dict]]
    # Keys of a batch that reach the device.
    batch_keys: tuple[str, ...]
    # seed -> iterator of host-local training batches (`run.local_batch` rows each).
    data: Callable[[int], Iterator[Mapping[str, np.ndarray]]] | None = None
    # Extra step arguments, replicated on every device (e.g. LPIPS weights).
    constants: tuple = ()
    # step -> learning rate, logged as 'learning_rate'.
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None
    # (state, step) -> {name: scalar, uint8 [H, W, 3] image, or 1-D array (a histogram)},
    # logged as eval/<name> every LoopConfig.eval_every steps.
    evaluate: Callable[[TrainState, int], Mapping[str, float]] | None = None
    # (state, step) -> {name: 1-D values}, written as histograms at every log point
    # (process 0, when TensorBoard or W&B is on), e.g. the VQGAN's per-code usage counts.
    histograms: Callable[[TrainState, int], Mapping[str, np.ndarray]] | None = None
    # Also evaluate after the last step when that step is off the eval cadence.
    evaluate_at_end: bool = False
    # Applied to a freshly initialised state (never on resume), e.g. a warm start.
    warm_start: Callable[[TrainState], TrainState] | None = None
    # Called on every process whenever a checkpoint save starts (e.g. to rewrite a meta file).
    on_save: Callable[[int, TrainState], None] | None = None
    # For throughput and MFU: rows per step is the batch size; tokens and FLOPs per step.
    tokens_per_step: int = 0
    flops_per_step: float | None = None
    peak_flops: float | None = None


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    status: str  # 'done' | 'preempted' | 'data_exhausted'
    last_metrics: dict[str, float]
    records: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. a codebook hash


def run_training(run: Run, task: TrainTask, config: LoopConfig) -> TrainResult:
    """Trains `task` from its latest checkpoint in `run.workdir` (or from scratch) to
    `config.num_steps`; see the module docstring."""
    checkpointer = Checkpointer(
        run.workdir,
        save_interval_steps=config.checkpoint_every,
        max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpoints,
        data_shard=run.shard,
    )
    writer = None
    try:
        data = task.data(config.seed)
        state, shardings, data = _init_or_restore(run, task, config, checkpointer, data)
        # A resumed run logs the steps after its checkpoint again: their old lines go.
        writer = metrics_lib.MetricWriter(
            run.workdir,
            tensorboard=config.tensorboard,
            writers=config.writers,
            is_primary=run.is_primary,
            start_step=int(jax.device_get(state.step)),
            run_config={"loop": dataclasses.asdict(config), "batch_size": run.batch_size},
        )
        step_fn = compile_step(task, shardings, config.nan_policy)
        with partitioning.with_sharding_rules(run.mesh, run.rules):
            return _loop(run, task, config, checkpointer, writer, state, step_fn, data)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()


def _init_or_restore(
    run: Run, task: TrainTask, config: LoopConfig, checkpointer: Checkpointer, data: Any
) -> tuple[TrainState, TrainState, Any]:
    """(state, state shardings, data): the newest intact checkpoint (or
    `config.restore_step`), or a new (warm-started) state.

    A resume restores straight into the shardings (nothing is initialised
    first) along with the data position; when that position was saved for
    another number of data shards and `allow_data_reshuffle` is set, the data
    starts a fresh order seeded by the step. Parameters are drawn from
    `PRNGKey(seed)`, the state's key is its fold-in 1.
    """
    key = jax.random.PRNGKey(config.seed)
    fresh = checkpointer.latest_step() is None and config.restore_step is None
    state, shardings = sharded_train_state(
        task.init,
        task.optimizer,
        mesh=run.mesh,
        rules=run.rules,
        rng=jax.random.fold_in(key, 1),
        init_rng=key,
        abstract=not fresh,
    )
    if fresh:
        if task.warm_start is not None:
            state = task.warm_start(state)
        return state, shardings, data
    state, data_restored = checkpointer.restore(
        state,
        step=config.restore_step,
        data_iterator=data,
        allow_data_reshuffle=config.allow_data_reshuffle,
    )
    step = int(jax.device_get(state.step))
    if not data_restored and config.allow_data_reshuffle:
        data = task.data(config.seed + step)
    metrics_lib.console(f"resumed from {checkpointer.directory}/{step}")
    return state, shardings, data


def compile_step(task: TrainTask, shardings: TrainState, nan_policy: str = "stop") -> Any:
    """The task's step with the learning rate and the NaN policy, jitted with explicit
    shardings (the batch on the mesh's batch axes, constants replicated); the state's
    buffers are donated. The trainers, the memory planner and the benchmark use it."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: PyTree, *constants: Any) -> tuple[TrainState, dict]:
        new_state, metrics = task.step(state, batch, *constants)
        metrics = dict(metrics)
        if task.learning_rate_fn is not None:
            metrics["learning_rate"] = task.learning_rate_fn(state.step)
        if nan_policy == "skip":
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new_state = keep_if_finite(ok, new_state, state)
            metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new_state, metrics

    batch = {k: partitioning.batch_sharding(mesh) for k in task.batch_keys}
    return jax.jit(
        step,
        in_shardings=(shardings, batch, *(replicated,) * len(task.constants)),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


class StopSignal:
    """Turns SIGTERM into a flag the loop checks (save, wait, exit) instead of dying."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.requested = False
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested = True
        metrics_lib.console(f"received signal {signum}: saving a checkpoint and stopping")

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


_ALLGATHER_READY = False


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (a collective; only when multi-process)."""
    global _ALLGATHER_READY
    # First use compiles a small program: every process waits for the others first.
    first, _ALLGATHER_READY = not _ALLGATHER_READY, True
    return process_max(int(flag), barrier="any_process_first_use" if first else None) > 0


def batch_hash(local: Mapping[str, np.ndarray]) -> int:
    """CRC of a host-local batch (24 bits: exactly representable in metrics.jsonl)."""
    h = 0
    for k in sorted(local):
        h = zlib.crc32(np.ascontiguousarray(local[k]).tobytes(), h)
    return h & 0xFFFFFF


def _loop(
    run: Run,
    task: TrainTask,
    config: LoopConfig,
    checkpointer: Checkpointer,
    writer: metrics_lib.MetricWriter,
    state: TrainState,
    step_fn: Any,
    data: Iterator[Mapping[str, np.ndarray]],
) -> TrainResult:
    """Runs the jitted step from `state.step` to `num_steps`.

    Metrics of every step stay on the devices until a log point (every
    `log_every` steps, at checkpoints and at the end), where they are fetched
    together; the 'stop' policy then raises NonFiniteLossError naming the
    first bad step, before any checkpoint of a poisoned state is written.
    """
    num_steps, workdir = config.num_steps, run.workdir
    step = start_step = int(jax.device_get(state.step))
    pending: list[tuple[int, dict, dict]] = []
    last: dict[str, float] = {}
    skipped_total = 0
    profiling = False
    status = "done"
    throughput = metrics_lib.Throughput(
        examples_per_step=run.batch_size,
        tokens_per_step=task.tokens_per_step,
        flops_per_step=task.flops_per_step,
        num_devices=run.mesh.size,
        peak_flops=metrics_lib.device_peak_flops(jax.devices()[0].device_kind, task.peak_flops),
    )
    throughput.reset(step)
    t_start = time.perf_counter()
    hash_file = None
    if config.log_data_hash:
        name = storage.join(workdir, f"data_hash.process_{jax.process_index()}.jsonl")
        metrics_lib.drop_lines_after(name, start_step)
        hash_file = storage.Appender(name)
    profile = contextlib.ExitStack()  # the trace's folder: staged locally for a URL
    constants = tuple(jax.device_put(c, run.replicated) for c in task.constants)

    def flush() -> None:
        nonlocal pending, last, skipped_total
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _ in pending])
        for (s, _, _), m in zip(pending, fetched):
            loss = float(m.get("loss", 0.0))
            if not math.isfinite(loss) and config.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"step {s}: loss is {loss}; stopping (LoopConfig.nan_policy='stop'; use "
                    "nan_policy='skip' to drop such updates, or lower the learning rate)"
                )
            skipped_total += int(round(float(m.get("skipped", 0.0))))
        s_last, _, host_last = pending[-1]
        scalars = {k: float(v) for k, v in fetched[-1].items()}
        scalars.update(host_last)
        if config.nan_policy == "skip":
            scalars["skipped_steps"] = float(skipped_total)
        scalars.update(throughput.measure(s_last))
        eta = scalars.get("seconds_per_step", math.nan) * (num_steps - s_last)
        writer.write_scalars(s_last, scalars)
        if task.histograms is not None and writer.writes_summaries:  # process 0 only
            for name, values in task.histograms(state, s_last).items():
                writer.write_histogram(s_last, name, values)
        metrics_lib.console(metrics_lib.progress_line(s_last, num_steps, scalars, eta))
        last = scalars
        pending = []

    def evaluate(at: int) -> None:
        flush()
        out = task.evaluate(state, at)
        writer.write_images(at, {f"eval/{k}": v for k, v in out.items() if np.ndim(v) == 3})
        for k, v in out.items():
            if np.ndim(v) == 1:
                writer.write_histogram(at, f"eval/{k}", v)
        scores = {f"eval/{k}": float(v) for k, v in out.items() if np.ndim(v) == 0}
        writer.write_scalars(at, scores)
        metrics_lib.console(
            f"step {at} eval: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items())
        )

    def save(at: int) -> None:
        # The logs reach the work dir before the checkpoint does: a resume from it finds
        # every line up to its step (on an object store they are written at flushes).
        writer.flush()
        if hash_file is not None:
            hash_file.flush()
        if checkpointer.save(at, state, data) and task.on_save is not None:
            task.on_save(at, state)

    try:
        with StopSignal() as stop:
            while step < num_steps:
                if config.profile_steps and step == config.profile_steps[0] and not profiling:
                    trace_dir = storage.join(workdir, "profile")
                    jax.profiler.start_trace(profile.enter_context(storage.staged(trace_dir)))
                    profiling = True
                try:
                    local = next(data)
                except StopIteration:
                    metrics_lib.console(f"step {step}: the data iterator is exhausted; stopping")
                    status = "data_exhausted"
                    break
                missing = [k for k in task.batch_keys if k not in local]
                if missing:
                    raise ValueError(
                        f"the data iterator's batch lacks {missing}; expected {task.batch_keys}"
                    )
                local = {k: local[k] for k in task.batch_keys}
                host_scalars = {}
                if hash_file is not None:
                    h = batch_hash(local)
                    record = {"step": step + 1, "data_hash": h, "shard": run.shard.index}
                    hash_file.write(json.dumps(record) + "\n")
                    host_scalars["data_hash"] = float(h)
                batch = run.global_batch(local)
                if step == start_step and jax.process_count() > 1:
                    # Compile ahead of the first run, then wait for every process,
                    # so no process sits in a collective while another compiles.
                    step_fn = step_fn.lower(state, batch, *constants).compile()
                    distributed.barrier(f"step_compiled_{start_step}")
                state, step_metrics = step_fn(state, batch, *constants)
                step += 1
                pending.append((step, step_metrics, host_scalars))

                if profiling and step >= config.profile_steps[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profile.close()  # uploads the trace (a URL)
                    profiling = False
                will_save = checkpointer.should_save(step) or step == num_steps
                if step % config.log_every == 0 or will_save:
                    flush()
                if (
                    task.evaluate is not None
                    and config.eval_every
                    and step % config.eval_every == 0
                ):
                    evaluate(step)
                if will_save:
                    save(step)
                check = jax.process_count() == 1 or step % 10 == 0 or will_save
                if check and _any_process(stop.requested) and step < num_steps:
                    flush()
                    status = "preempted"
                    save(step)
                    break
            flush()
            if profiling:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profile.close()
            if status == "data_exhausted":
                save(step)
            if (
                task.evaluate is not None
                and task.evaluate_at_end
                and status == "done"
                and not (config.eval_every and step % config.eval_every == 0)
            ):
                evaluate(step)
            checkpointer.wait_until_finished()
    finally:
        if hash_file is not None:
            hash_file.close()
        profile.close()  # after an error too: what was traced is kept
    writer.flush()
    elapsed = time.perf_counter() - t_start
    metrics_lib.console(f"{status}: step {step} ({step - start_step} steps in {elapsed:.1f}s)")
    return TrainResult(state=state, step=step, status=status, last_metrics=last)


def evaluate_sums(
    run: Run,
    sums_fn: Callable[[PyTree, dict[str, jax.Array]], Mapping[str, jax.Array]],
    params: PyTree,
    batches: Iterator[Mapping[str, np.ndarray]],
    num_batches: int,
) -> dict[str, float]:
    """Totals of `sums_fn(params, global batch)` over up to `num_batches` batches."""
    totals: dict[str, float] = {}
    for _ in range(num_batches):
        try:
            local = next(batches)
        except StopIteration:
            break
        for k, v in jax.device_get(sums_fn(params, run.global_batch(local))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals
