"""The training loop shared by every trainer (encoder-decoder, VQGAN, upsampler).

A trainer supplies a pure step `step_fn(state, batch) -> (state, metrics)`;
this module jits it once with shardings and state donation, feeds it global
batches assembled from host-local numpy, and around it: metrics, periodic
evaluation, a profiler window, non-finite-loss handling, checkpoints every K
steps and at the end, and a final save when the job is told to stop (SIGTERM).

Pieces a step function can reuse: `accumulate_gradients` (micro-batches with
`lax.scan`), `keep_if_finite` (the 'skip' NaN policy without a host sync),
and `make_train_step` (all of it for a single-optimizer loss).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from parti_jax import partitioning
from parti_jax.train import distributed
from parti_jax.train import metrics as metrics_lib
from parti_jax.train.checkpoints import Checkpointer
from parti_jax.train.state import TrainState, create_sharded_train_state, train_state_shardings

PyTree = Any
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
NAN_POLICIES = ("stop", "skip")
# The VQGAN's and upsampler's default mesh: every device on 'data', parameters replicated.
DATA_PARALLEL_MESH = partitioning.MeshConfig(data=-1, fsdp=1, tensor=1, rules="data_parallel")


class NonFiniteLossError(RuntimeError):
    """Raised by the loop ('stop' policy) at the first step whose loss is NaN/Inf."""


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


def make_train_step(
    loss_fn: LossFn,
    *,
    num_micro_batches: int = 1,
    nan_policy: str = "stop",
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    rng_name: str = "dropout",
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
    """A pure `step(state, batch) -> (state, metrics)` for one optimizer.

    metrics: loss, grad_norm (before clipping), learning_rate (if a schedule
    is given), the loss_fn's aux values, and `skipped` (1 when the 'skip'
    policy dropped the update).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}: expected one of {NAN_POLICIES}")

    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        rng = state.step_rng(rng_name)
        loss, aux, grads = accumulate_gradients(
            loss_fn, state.params, batch, rng, num_micro_batches
        )
        grad_norm = optax.tree.norm(grads)
        new_state = state.apply_gradients(grads)
        out = {"loss": loss, "grad_norm": grad_norm, **aux}
        if learning_rate_fn is not None:
            out["learning_rate"] = learning_rate_fn(state.step)
        if nan_policy == "skip":
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_state = keep_if_finite(ok, new_state, state)
            out["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new_state, out

    return step


# --------------------------------------------------------- host-side pieces


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dim split over the mesh's batch axes ('data', 'fsdp')."""
    axes = tuple(a for a in partitioning.BATCH_MESH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding: NamedSharding, num_data_shards: int
) -> dict[str, jax.Array]:
    """Global jax arrays from this host's rows (`num_data_shards` hosts' worth of rows)."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * num_data_shards,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def resolve_mesh(
    mesh_config: Any, rules: Any, default: partitioning.MeshConfig
) -> tuple[jax.sharding.Mesh, tuple]:
    """A Mesh and rule table from a MeshConfig (or a ready Mesh) and a rule name/table/None.

    `default` is the trainer's MeshConfig when none is given; a ready Mesh
    without `rules` uses `default.rules`.
    """
    if isinstance(mesh_config, jax.sharding.Mesh):
        mesh = mesh_config
        rules = default.rules if rules is None else rules
    else:
        mesh_config = mesh_config or default
        mesh = partitioning.create_mesh(mesh_config)
        rules = mesh_config.rules if rules is None else rules
    if isinstance(rules, str):
        rules = partitioning.get_rules(rules)
    return mesh, tuple(tuple(r) for r in rules)


def init_or_restore_state(
    checkpointer: Checkpointer,
    init_fn: Callable,
    tx: Any,
    *,
    mesh: jax.sharding.Mesh,
    rules: Any,
    seed: int,
    data_iterator: Any,
    allow_data_reshuffle: bool = False,
    remake_data: Callable[[int], Any] | None = None,
) -> tuple[TrainState, TrainState, Any, bool]:
    """(state, state_shardings, data_iterator, resumed): the latest checkpoint, or a new state.

    A resume restores straight into the shardings (nothing is initialised
    first) along with the data position. When the data position could not be
    restored because the number of data shards changed and
    `allow_data_reshuffle` is set, `remake_data(step)` gives a fresh iterator.
    Parameters are drawn from `PRNGKey(seed)`, the state's key is its fold-in 1.
    """
    key = jax.random.PRNGKey(seed)
    init_kw = dict(mesh=mesh, rules=rules, rng=jax.random.fold_in(key, 1), init_rng=key)
    if checkpointer.latest_step() is None:
        state, state_shardings = create_sharded_train_state(init_fn, tx, **init_kw)
        return state, state_shardings, data_iterator, False
    abstract, state_shardings = train_state_shardings(init_fn, tx, **init_kw)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        state_shardings,
    )
    state, data_restored = checkpointer.restore(
        target, data_iterator=data_iterator, allow_data_reshuffle=allow_data_reshuffle
    )
    step = int(jax.device_get(state.step))
    if not data_restored and allow_data_reshuffle and remake_data is not None:
        data_iterator = remake_data(step)
    metrics_lib.console(f"resumed from {checkpointer.directory}/{step}")
    return state, state_shardings, data_iterator, True


def compile_step(
    step_fn: Callable,
    state_shardings: TrainState,
    batch_shardings: Any,
    *,
    donate: bool = True,
) -> Callable:
    """jit once with explicit in/out shardings; the state's buffers are donated."""
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
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
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    global _ALLGATHER_READY
    if not _ALLGATHER_READY:
        # First use compiles a small program; see `distributed.barrier`.
        distributed.barrier("any_process_first_use")
        _ALLGATHER_READY = True
    flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.max(flags))


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int
    status: str  # 'done' | 'preempted' | 'data_exhausted'
    last_metrics: dict[str, float]


def run(
    *,
    train_step: Callable[[TrainState, PyTree], tuple[TrainState, dict]],
    state: TrainState,
    data_iterator: Iterator[Mapping[str, np.ndarray]],
    batch_sharding: NamedSharding,
    num_data_shards: int,
    num_steps: int,
    workdir: str | Path,
    checkpointer: Checkpointer | None = None,
    writer: metrics_lib.MetricWriter | None = None,
    throughput: metrics_lib.Throughput | None = None,
    log_every: int = 50,
    eval_every: int | None = None,
    eval_fn: Callable[[TrainState, int], Mapping[str, float]] | None = None,
    profile_steps: tuple[int, int] | None = None,
    nan_policy: str = "stop",
    stop_check_every: int = 10,
    batch_hook: Callable[[int, Mapping[str, np.ndarray]], Mapping[str, float]] | None = None,
) -> LoopResult:
    """Runs `train_step` from `state.step` to `num_steps`.

    `train_step` is already jitted (see `compile_step`). Metrics of every
    step stay on device until a log point (every `log_every` steps, at
    checkpoints and at the end), where they are fetched together; the 'stop'
    policy then raises NonFiniteLossError naming the first bad step, before
    any checkpoint of a poisoned state is written. `batch_hook(step, local)`
    may add host-side scalars (e.g. a hash of the host-local batch).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}: expected one of {NAN_POLICIES}")
    step = int(jax.device_get(state.step))
    start_step = step
    pending: list[tuple[int, dict, dict]] = []
    last: dict[str, float] = {}
    skipped_total = 0
    profiling = False
    status = "done"
    if throughput is not None:
        throughput.reset(step)
    t_start = time.perf_counter()

    def flush() -> None:
        nonlocal pending, last, skipped_total
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _ in pending])
        for (s, _, _), m in zip(pending, fetched):
            loss = float(m.get("loss", 0.0))
            if not math.isfinite(loss) and nan_policy == "stop":
                raise NonFiniteLossError(
                    f"step {s}: loss is {loss}; stopping (nan_policy='stop'; use "
                    "nan_policy='skip' to drop such updates, or lower the learning rate)"
                )
            skipped_total += int(round(float(m.get("skipped", 0.0))))
        s_last, _, host_last = pending[-1]
        scalars = {k: float(v) for k, v in fetched[-1].items()}
        scalars.update(host_last)
        if nan_policy == "skip":
            scalars["skipped_steps"] = float(skipped_total)
        if throughput is not None:
            scalars.update(throughput.measure(s_last))
        eta = None
        if "seconds_per_step" in scalars:
            eta = scalars["seconds_per_step"] * (num_steps - s_last)
        if writer is not None:
            writer.write(s_last, scalars)
        metrics_lib.console(metrics_lib.progress_line(s_last, num_steps, scalars, eta))
        last = scalars
        pending = []

    with StopSignal() as stop:
        while step < num_steps:
            if profile_steps and step == profile_steps[0] and not profiling:
                jax.profiler.start_trace(str(Path(workdir) / "profile"))
                profiling = True
            try:
                local = next(data_iterator)
            except StopIteration:
                metrics_lib.console(f"step {step}: the data iterator is exhausted; stopping")
                status = "data_exhausted"
                break
            host_scalars = dict(batch_hook(step + 1, local)) if batch_hook else {}
            batch = make_global_batch(local, batch_sharding, num_data_shards)
            if step == start_step and jax.process_count() > 1 and hasattr(train_step, "lower"):
                # Compile ahead of the first run, then wait for every process,
                # so no process sits in a collective while another compiles.
                train_step = train_step.lower(state, batch).compile()
                distributed.barrier(f"step_compiled_{start_step}")
            state, step_metrics = train_step(state, batch)
            step += 1
            pending.append((step, step_metrics, host_scalars))

            if profiling and step >= profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
            will_save = checkpointer is not None and (
                checkpointer.should_save(step) or step == num_steps
            )
            if step % log_every == 0 or step == num_steps or will_save:
                flush()
            if eval_fn is not None and eval_every and step % eval_every == 0:
                flush()
                scores = {f"eval/{k}": float(v) for k, v in eval_fn(state, step).items()}
                if writer is not None:
                    writer.write(step, scores)
                metrics_lib.console(
                    f"step {step} eval: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items())
                )
            if will_save:
                checkpointer.save(step, state, data_iterator)
            check = jax.process_count() == 1 or step % stop_check_every == 0 or will_save
            if check and _any_process(stop.requested) and step < num_steps:
                flush()
                status = "preempted"
                if checkpointer is not None:
                    checkpointer.save(step, state, data_iterator)
                break
        flush()
        if profiling:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if checkpointer is not None:
            if status == "data_exhausted":
                checkpointer.save(step, state, data_iterator)
            checkpointer.wait_until_finished()
    if writer is not None:
        writer.flush()
    elapsed = time.perf_counter() - t_start
    metrics_lib.console(f"{status}: step {step} ({step - start_step} steps in {elapsed:.1f}s)")
    return LoopResult(state=state, step=step, status=status, last_metrics=last)


def run_session(
    *,
    mesh: jax.sharding.Mesh,
    rules: Any,
    workdir: str | Path,
    checkpointer: Checkpointer,
    tensorboard: bool | None = None,
    finish: Callable[[LoopResult, metrics_lib.MetricWriter], None] | None = None,
    **run_kwargs: Any,
) -> LoopResult:
    """`run` inside the mesh and its rules, with a metric writer; closes writer and checkpointer.

    The trainers' common frame: a `MetricWriter` on `workdir` (process 0
    writes), `run(**run_kwargs)`, then `finish(result, writer)` (e.g. a final
    evaluation) still inside the mesh; the writer and checkpointer are closed
    even when the run fails.
    """
    import flax.linen as nn

    writer = metrics_lib.MetricWriter(
        workdir, tensorboard=tensorboard, is_primary=jax.process_index() == 0
    )
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            result = run(workdir=workdir, checkpointer=checkpointer, writer=writer, **run_kwargs)
            if finish is not None:
                finish(result, writer)
    finally:
        writer.close()
        checkpointer.close()
    return result
