"""Checkpoints: orbax CheckpointManager with the data position, resume and warm starts.

Layout of a work directory:

    <workdir>/checkpoints/<step>/state/...                     TrainState arrays
    <workdir>/checkpoints/<step>/data/shard_<i>_of_<n>[...]    data iterator position

`Checkpointer` saves asynchronously (arrays are copied off the devices, then
written in the background), keeps the newest `max_to_keep`, and resumes the
newest intact step: orbax keeps no checksums, so a checkpoint is verified by
restoring it, data position included; a damaged one is reported in one line,
kept aside as `<step>.corrupt-<time>` (never deleted; orbax ignores the name)
and the next older one is tried, every process agreeing on the outcome.
Temporary folders of saves cut short by a kill are removed when the next run
starts. The work dir may be a URL (gs://bucket/run): orbax writes there through
TensorStore and finishes a save with `commit_success.txt` instead of a rename (a save
cut short is a `<step>` folder without it, removed the same way), and a step is kept
aside by a copy of its objects, then the originals' removal (`storage.move`).

Each data shard's iterator state is written by one process (the first process that
reads that shard) next to the arrays of the same step, so a resumed run neither
repeats nor skips examples; a resume with another number of data shards is refused
unless `allow_data_reshuffle=True`.

`restore_params_from` warm-starts parameters from another run: all of them or
those whose path matches a regex, converting the layer layout (scanned <->
unscanned) when the names say so, with an error naming the parameter when
shapes differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from parti_jax import storage
from parti_jax.train import distributed
from parti_jax.train.metrics import console
from parti_jax.train.optimizers import path_name
from parti_jax.train.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^shard_(\d+)_of_(\d+)")
# Replicated arrays are written by several replicas in parallel only when each
# replica's slice is at least this big: for small arrays the per-device slice
# programs orbax compiles on the first save cost more than they save.
MIN_REPLICA_SLICE_BYTES = 4 << 20
_HANDLERS_SET = False


def _configure_array_handler() -> None:
    """Registers orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES (once per process)."""
    global _HANDLERS_SET
    if _HANDLERS_SET:
        return
    from orbax.checkpoint import type_handlers

    handler = type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
    )
    type_handlers.register_type_handler(jax.Array, handler, override=True)
    _HANDLERS_SET = True


def flat_tree(tree: PyTree) -> dict[str, Any]:
    """{path name: leaf} of any pytree (dicts, optax states, lists)."""
    return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run (shapes, data shards, missing files)."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that cannot be read: a file missing, cut short or garbled."""


def _why(error: BaseException, local: str = "", where: Any = "") -> str:
    """One line saying what is wrong: the innermost message of the exception chain,
    without TensorStore's spec dump (a temporary copy's path `local` named as `where`)."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) and inner not in chain:
        chain.append(inner)
    error = next((e for e in reversed(chain) if str(e).strip()), error)
    text = str(error).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    text = re.sub(r'Error opening "\w+" driver: ', "", text.split(" [tensorstore_spec")[0])
    if local and local != os.fspath(where):
        text = text.replace(local, os.fspath(where))
    return text.rstrip(": ")


def process_max(value: int, barrier: str | None = None) -> int:
    """The largest `value` over all processes (a collective; `value` itself with one process).

    `barrier` first waits for every process at that name (the coordination service,
    which waits long; CPU collectives give up after 30 s while a process lags).
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    if barrier:
        distributed.barrier(barrier)
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int32))))


# ------------------------------------------------------------ data iterator item


class DataIteratorHandler(ocp.CheckpointHandler):
    """Writes/reads one data shard's iterator state per process (`it.save` / `it.restore`).

    An iterator is handed a local path prefix: in an object store's checkpoint (gs://)
    it saves into a local temporary folder whose files are then uploaded, and restores
    from a downloaded copy of its shard's files (`storage.staged` / `storage.fetched`),
    so iterators that know only local files (tf.train.Checkpoint) work there too.
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        if args.write:
            prefix = directory / f"shard_{args.shard_index}_of_{args.shard_count}"
            with storage.staged(prefix, kind="prefix") as local:
                args.iterator.save(local)

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> bool:
        """Restores the iterator; False when the shard count changed and reshuffle is allowed."""
        names = [p.name for p in directory.iterdir()]
        counts = sorted({int(m.group(2)) for n in names if (m := _SHARD_RE.match(n))})
        if not counts:
            raise DamagedCheckpointError(f"{directory}: no data position file (shard_*)")
        if counts != [args.shard_count]:
            if args.allow_reshuffle:
                log.warning(
                    "data position was saved for %s data shard(s), this run reads %d; "
                    "starting a fresh data order (allow_data_reshuffle=True)",
                    counts,
                    args.shard_count,
                )
                return False
            raise CheckpointError(
                f"{directory}: the data position was saved for {counts} data shard(s) but this "
                f"run reads {args.shard_count}; resume on a mesh with the same number of data "
                "shards, or pass allow_data_reshuffle=True to start a fresh data order"
            )
        path = directory / f"shard_{args.shard_index}_of_{args.shard_count}"
        if not [n for n in names if n.startswith(path.name)]:
            raise DamagedCheckpointError(f"{path}: no saved data position for this data shard")
        with storage.fetched(path, kind="prefix") as local:
            try:
                args.iterator.restore(local)
            except ValueError as e:  # data settings that differ are not damage; garbled are
                if not isinstance(e, json.JSONDecodeError | UnicodeDecodeError):
                    raise
                raise DamagedCheckpointError(f"{path}: {_why(e, local, path)}") from e
            except Exception as e:  # noqa: BLE001 - a file missing or cut short
                raise DamagedCheckpointError(f"{path}: {_why(e, local, path)}") from e
        return True

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any
    shard_index: int
    shard_count: int
    write: bool


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any
    shard_index: int
    shard_count: int
    allow_reshuffle: bool = False


def _has_position(iterator: Any) -> bool:
    return iterator is not None and callable(getattr(iterator, "save", None))


# -------------------------------------------------------------- the manager


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's data shard and whether it writes that shard's position."""

    index: int = 0
    count: int = 1
    writer: bool = True


class Checkpointer:
    """Saves/restores TrainState plus the data position under `<workdir>/checkpoints`."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        data_shard: DataShard = DataShard(),
    ) -> None:
        _configure_array_handler()
        self.directory = epath.Path(_absolute(workdir)) / "checkpoints"
        self.data_shard = data_shard
        self.save_interval_steps = save_interval_steps
        self._last_saved: int | None = None
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # of saves cut short (kill -9): go before the next
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataIteratorHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self.manager.all_steps()

    def should_save(self, step: int) -> bool:
        """Every `save_interval_steps` steps (absolute step numbers, so resumes align)."""
        return self.save_interval_steps > 0 and step % self.save_interval_steps == 0

    def save(self, step: int, state: TrainState, data_iterator: Any = None) -> bool:
        """Starts an (async) save of `state` and the data position; True if one started."""
        if step == self._last_saved or step in self.manager.all_steps():
            return False
        self._last_saved = step
        items = {"state": ocp.args.StandardSave(state.checkpoint_items())}
        if _has_position(data_iterator):
            items["data"] = DataIteratorSave(
                data_iterator,
                self.data_shard.index,
                self.data_shard.count,
                self.data_shard.writer,
            )
        # The caller decides when to save (see should_save); orbax's own policy is bypassed.
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self,
        state: TrainState,
        *,
        step: int | None = None,
        data_iterator: Any = None,
        allow_data_reshuffle: bool = False,
    ) -> tuple[TrainState, bool]:
        """Restores the newest intact checkpoint, or `step`, onto the shapes/dtypes/shardings
        of `state` (concrete or abstract).

        `state`'s shardings decide where arrays land, so a checkpoint saved on
        one mesh restores onto another. Verifying a step means restoring it
        (arrays and data position); one that is damaged on any process is
        reported in one line and the next older one is tried; once one
        restores, the damaged newer ones are set aside as `<step>.corrupt-<time>`.
        A `step` chosen by hand must be there and intact; checkpoints newer
        than it are set aside as `<step>.replaced-<time>`, so a later resume
        does not return to them. Returns (state, data_restored): data_restored
        is False when the data position was not restored (an iterator without
        one, or a reshuffle was allowed).
        """
        steps = self._agreed_steps()
        if step is not None and step not in steps:
            raise CheckpointError(
                f"{self.directory}: no checkpoint for step {step}; steps there are {steps}"
            )
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(_abstract, state.checkpoint_items())
        damaged: list[int] = []
        for s in [step] if step is not None else steps[::-1]:
            restored = self._try_restore(s, target, data_iterator, allow_data_reshuffle)
            if restored is not None:
                break
            damaged.append(s)
            if step is not None:
                raise DamagedCheckpointError(
                    f"{self.directory / str(s)} is damaged (see above); restore another step "
                    f"(steps there are {steps}) or leave the step out for the newest intact one"
                )
        else:
            raise DamagedCheckpointError(
                f"{self.directory}: no intact checkpoint; tried steps {damaged}, each damaged "
                "(see above); restore a copy, or move the folder away to start afresh"
            )
        self._set_aside(damaged, "corrupt")
        self._set_aside([t for t in steps if t > s and t not in damaged], "replaced")
        return state.replace_checkpoint_items(restored[0]), restored[1]

    def _agreed_steps(self) -> list[int]:
        """The committed steps, as process 0 lists them (broadcast to every process)."""
        steps = sorted(self.manager.all_steps())
        if jax.process_count() == 1:
            return steps
        from jax.experimental import multihost_utils

        distributed.barrier("restore_list_steps")
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
        if n == 0:
            return []
        mine = np.asarray(steps if jax.process_index() == 0 else [0] * n, np.int32)
        return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]

    def _try_restore(
        self, step: int, target: PyTree, data_iterator: Any, allow_reshuffle: bool
    ) -> tuple[PyTree, bool] | None:
        """(state items, data restored) of `step`, or None when it is damaged on any process.

        Errors that are not damage (a checkpoint that does not fit this run)
        are raised on every process; the processes agree before anyone raises.
        """
        step_dir = self.directory / str(step)
        outcome: Any = None
        try:
            outcome = self._read(step_dir, target, data_iterator, allow_reshuffle)
            status = 0
        except DamagedCheckpointError as e:
            report(f"checkpoint {step_dir} is damaged: {str(e).replace(f'{step_dir}/', '')}")
            status = 1
        except Exception as e:  # noqa: BLE001 - raised below, once every process knows
            outcome, status = e, 2
        agreed = process_max(status, barrier=f"restore_{step}")
        if agreed == 2:
            if isinstance(outcome, Exception):
                raise outcome
            raise CheckpointError(
                f"{step_dir}: cannot be restored on another process (see its log)"
            )
        if agreed == 1 and status == 0:
            report(f"checkpoint {step_dir} is damaged on another process (see its log)")
        return outcome if agreed == 0 else None

    def _read(
        self, step_dir: epath.Path, target: PyTree, data_iterator: Any, allow_reshuffle: bool
    ) -> tuple[PyTree, bool]:
        """Reads one step (without orbax's cross-process barriers: a damaged file may fail
        on one process only); raises DamagedCheckpointError naming what is wrong."""
        _quiet_abandoned_reads()
        if not (step_dir / "state" / "_METADATA").exists():
            raise DamagedCheckpointError(f"{step_dir / 'state' / '_METADATA'} is missing")
        self._check_shapes(step_dir, target)
        try:
            items = ocp.StandardCheckpointHandler().restore(
                step_dir / "state", args=ocp.args.StandardRestore(target)
            )
        except Exception as e:  # noqa: BLE001 - shapes are checked: a read error is damage
            raise DamagedCheckpointError(_why(e)) from e
        if not _has_position(data_iterator):
            return items, False
        if not (step_dir / "data").exists():  # saved with every position, so it was lost
            raise DamagedCheckpointError(f"{step_dir / 'data'} (the data position) is missing")
        shard = self.data_shard
        args = DataIteratorRestore(data_iterator, shard.index, shard.count, allow_reshuffle)
        return items, DataIteratorHandler().restore(step_dir / "data", args)

    def _set_aside(self, steps: list[int], why: str) -> None:
        """Renames each `<step>` folder to `<step>.<why>-<time>` (process 0; a copy, then the
        original removed, on object stores); every process then re-lists the steps."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for s in steps:
                src, dst = self.directory / str(s), self.directory / f"{s}.{why}-{stamp}"
                _move(src, dst)
                console(f"kept {src} aside as {dst.name} ({why}; nothing deleted)")
        if jax.process_count() > 1:
            distributed.barrier(f"set_aside_{why}")
        self.manager.reload()

    def _check_shapes(self, step_dir: epath.Path, target: PyTree) -> None:
        meta = state_metadata(step_dir / "state")
        if meta is None:
            return
        flat_meta = flat_tree(meta)
        missing = []
        for name, t in flat_tree(target).items():
            m = flat_meta.get(name)
            if m is None:
                missing.append(name)
                continue
            if tuple(getattr(m, "shape", ())) != tuple(t.shape):
                raise CheckpointError(
                    f"{step_dir}: {name} has shape {tuple(m.shape)} in the "
                    f"checkpoint but {tuple(t.shape)} in this model; restore a checkpoint of the "
                    "same model config (or use restore_from for a partial warm start)"
                )
        if missing:
            raise CheckpointError(
                f"{step_dir}: the checkpoint has no {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; it was written by a different model "
                "or optimizer (use restore_from to warm-start parameters only)"
            )

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _quiet_abandoned_reads() -> None:
    """Drops the echoes of a failed read: orbax closes its event loop while TensorStore's
    other reads of the step are in flight, and each then reports 'Event loop is closed'
    (dozens of tracebacks) or an unretrieved future or task. Other reports pass as before."""
    if getattr(sys.unraisablehook, "quiet_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (
            isinstance(unraisable.exc_value, RuntimeError)
            and "loop is closed" in str(unraisable.exc_value)
        ):
            previous(unraisable)

    hook.quiet_abandoned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda r: not str(r.msg).startswith(("Future exception", "Task exception"))
    )


def report(message: str) -> None:
    """A line on the console of process 0, or in this process's log on another process."""
    if jax.process_index() == 0:
        console(message)
    else:
        print(f"process {jax.process_index()}: {message}", flush=True)


def _move(src: epath.Path, dst: epath.Path) -> None:
    """Renames a folder; object stores (no folder rename) get a copy of every file, then
    the original goes (storage.move)."""
    storage.move(src, dst)


def _absolute(path: str | os.PathLike) -> str:
    """orbax needs absolute paths; URLs (gs://...) are kept as they are."""
    return os.fspath(storage.path(path))


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def state_metadata(state_dir: epath.Path) -> PyTree | None:
    """The saved TrainState's tree of array metadata (shape, dtype), or None."""
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(state_dir)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return getattr(meta, "tree", meta)


# ------------------------------------------------------------- warm starts


def resolve_checkpoint_dir(path: str | os.PathLike, step: int | None = None) -> epath.Path:
    """The `<step>` directory of a work directory, a checkpoints folder or a step folder."""
    p = epath.Path(_absolute(path))
    if (p / "state").exists():
        return p
    if (p / "checkpoints").exists():
        p = p / "checkpoints"
    steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit()) if p.exists() else []
    if not steps:
        raise CheckpointError(
            f"{path}: no checkpoint found (expected <workdir>/checkpoints/<step>/state)"
        )
    if step is None:
        return p / str(steps[-1])
    if step not in steps:
        raise CheckpointError(f"{path}: no checkpoint for step {step}; steps are {steps}")
    return p / str(step)


def restore_params_from(
    path: str | os.PathLike,
    params: PyTree,
    *,
    include: str | None = None,
    convert: Callable[[PyTree], PyTree] | None = None,
    step: int | None = None,
    fix: str = "change the model config to match or exclude it from restore_from",
) -> tuple[PyTree, list[str]]:
    """Warm-starts `params` (concrete, sharded) from another run's checkpoint.

    Args:
      path: a work directory, its `checkpoints` folder or one `<step>` folder.
      params: this model's initialised parameters; those not restored keep
        their values.
      include: regex searched in '/'-joined parameter paths
        (e.g. 'encoder/.*'); None restores every parameter the checkpoint has.
        Every parameter matching `include` must be in the checkpoint.
      convert: applied to the checkpoint's parameters (as numpy) before
        matching; None: `scan_to_unscanned` or `unscanned_to_scan` when that
        makes the checkpoint's names match this model's better (a scanned
        checkpoint into unrolled layers or back), else the same layout.
      step: which step (default: the latest).
      fix: how a shape mismatch is fixed (the end of its error message).

    Returns:
      (params, names of restored parameters).
    """
    step_dir = resolve_checkpoint_dir(path, step)
    meta = state_metadata(step_dir / "state")
    if meta is None or "params" not in meta:
        raise CheckpointError(f"{step_dir}: not a parti_jax checkpoint (no state/params)")
    pattern = re.compile(include) if include else None
    flat_target = flat_tree(params)
    wanted = [n for n in flat_target if pattern is None or pattern.search(n)]
    if not wanted:
        raise CheckpointError(f"restore_from include={include!r} matches no parameter")

    ckpt_meta = {"params": meta["params"]}
    convert = convert or _layout_converter(meta["params"], set(flat_target))
    if convert is None:
        # Same layout: restore only the wanted arrays, straight onto their shardings.
        flat_meta = flat_tree(meta["params"])
        _check_warm_start(step_dir, wanted, flat_target, flat_meta, include, fix)
        item = _subset_tree(meta["params"], set(wanted), flat_target)
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": item},
                restore_args={"params": jax.tree.map(_restore_args, item)},
                partial_restore=True,
            ),
        )["params"]
        flat_restored = flat_tree(restored)
    else:
        host = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ckpt_meta)
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item=host,
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), host),
                partial_restore=True,
            ),
        )["params"]
        converted = convert(restored)
        flat_conv = flat_tree(converted)
        _check_warm_start(step_dir, wanted, flat_target, flat_conv, include, fix)
        flat_restored = {
            n: jax.device_put(
                np.asarray(flat_conv[n], flat_target[n].dtype), _sharding(flat_target[n])
            )
            for n in wanted
            if n in flat_conv
        }

    names = [n for n in wanted if n in flat_restored]
    new_params = jax.tree_util.tree_map_with_path(
        lambda p, x: flat_restored.get(path_name(p), x), params
    )
    skipped = [n for n in flat_target if n not in flat_restored]
    log.info(
        "restore_from %s: restored %d parameter(s), kept %d initialised",
        step_dir,
        len(names),
        len(skipped),
    )
    return new_params, names


def _layout_converter(ckpt_params: PyTree, want: set[str]) -> Callable[[PyTree], PyTree] | None:
    """The layer-layout conversion that makes the checkpoint's names match `want` best."""
    from parti_jax.models.layers import scan_to_unscanned, unscanned_to_scan

    best, best_score = None, len(set(flat_tree(ckpt_params)) & want)
    if best_score == len(want):
        return None
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ckpt_params)
    for fn in (scan_to_unscanned, unscanned_to_scan):
        try:
            score = len(set(flat_tree(jax.eval_shape(fn, abstract))) & want)
        except Exception:  # noqa: BLE001 - this direction does not apply
            continue
        if score > best_score:
            best, best_score = fn, score
    return best


def _check_warm_start(step_dir, wanted, flat_target, flat_ckpt, include, fix) -> None:
    missing = [n for n in wanted if n not in flat_ckpt]
    if include is not None and missing:
        raise CheckpointError(
            f"{step_dir}: restore_from include={include!r} matches {', '.join(missing[:5])} "
            "which the checkpoint does not have (the layouts differ: scanned vs unscanned "
            "layers, or another model)"
        )
    if include is None and len(missing) == len(wanted):
        raise CheckpointError(
            f"{step_dir}: no parameter of this model is in the checkpoint (e.g. "
            f"{wanted[0]}); the layouts differ (scanned vs unscanned layers?)"
        )
    for n in wanted:
        if n in flat_ckpt:
            have = tuple(flat_ckpt[n].shape)
            want = tuple(flat_target[n].shape)
            if have != want:
                raise CheckpointError(
                    f"{step_dir}: parameter {n} has shape {have} in the checkpoint but "
                    f"{want} in this model; {fix}"
                )


def _subset_tree(tree: PyTree, names: set[str], flat_target: dict[str, Any]) -> PyTree:
    """Nested dict of target ShapeDtypeStructs (with shardings) for the chosen names."""

    def walk(node, prefix):
        out = {}
        for k, v in node.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                sub = walk(v, name)
                if sub:
                    out[k] = sub
            elif name in names:
                t = flat_target[name]
                out[k] = jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=_sharding(t))
        return out

    return walk(dict(tree), "")


def _sharding(x: Any) -> jax.sharding.Sharding | None:
    return getattr(x, "sharding", None)


def _restore_args(x: jax.ShapeDtypeStruct) -> ocp.RestoreArgs:
    if x.sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
