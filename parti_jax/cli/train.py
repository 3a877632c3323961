"""`parti-jax train`: train the text-to-image encoder-decoder on precomputed codes.

    parti-jax train --gin_file=runs/tiny_train.gin --workdir=/tmp/tiny_train
    parti-jax train --gin_file=runs/shapes_train.gin --workdir=/tmp/shapes \\
        --gin.train.num_steps=2000 --restore_from=/tmp/other_run

Gin binds `train.*` (parti_jax.train.t2i.train) and the config classes
(`ModelConfig`, `MeshConfig`, `OptimizerConfig`). Several processes (a pod, a
SLURM job, `parti-jax launch`) are detected from the environment or given
with --coordinator_address / --num_processes / --process_id. A run that is
told to stop (SIGTERM) saves a checkpoint and exits with status 143; run the
same command again to resume.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Train the text-to-image encoder-decoder on precomputed codes."
EXIT_PREEMPTED = 143


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train", DESCRIPTION)
    parser.add_argument(
        "--restore_from",
        default=None,
        help="Warm-start parameters from another run's work directory or checkpoint "
        "(used only when --workdir has no checkpoint yet).",
    )
    parser.add_argument(
        "--restore_include",
        default=None,
        help="Regex of parameter paths to warm-start, e.g. 'encoder/.*' (default: all).",
    )
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0.")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    if not args.workdir:
        raise flags.UsageError("--workdir is required (checkpoints, metrics.jsonl, config)")
    if not args.gin_files:
        raise flags.UsageError("pass --gin_file (e.g. --gin_file=runs/tiny_train.gin)")

    # Before anything starts a jax backend.
    from parti_jax.train import distributed

    try:
        distributed.maybe_initialize_distributed(
            ns.coordinator_address, ns.num_processes, ns.process_id
        )
    except ValueError as e:
        raise flags.UsageError(str(e)) from e

    workdir = flags.check_workdir(args.workdir)
    flags.setup_gin(args)
    flags.write_config(workdir)

    import gin
    from parti_jax.train import checkpoints, loop, t2i

    train_fn = gin.config.get_configurable("train")
    _check_required(t2i.train)
    kwargs = {"workdir": str(workdir)}
    if ns.restore_from:
        kwargs["restore_from"] = ns.restore_from
    if ns.restore_include:
        kwargs["restore_include"] = ns.restore_include
    try:
        result = train_fn(**kwargs)
    except (
        ValueError,
        PermissionError,
        FileNotFoundError,
        checkpoints.CheckpointError,
        loop.NonFiniteLossError,
    ) as e:
        raise flags.UsageError(_one_line(e)) from e
    flags.write_config(workdir, operative=True)
    return EXIT_PREEMPTED if result.status == "preempted" else 0


def _check_required(fn) -> None:
    """Required keyword arguments of `train` must be bound in gin; name the missing ones."""
    import gin

    missing = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.default is inspect.Parameter.empty and name != "workdir":
            try:
                gin.query_parameter(f"train.{name}")
            except ValueError:
                missing.append(name)
    if missing:
        raise flags.UsageError(
            "missing gin binding(s): "
            + ", ".join(f"train.{m}" for m in missing)
            + " (set them in the gin file or with --gin.train.NAME=VALUE)"
        )


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
