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

from collections.abc import Sequence

from parti_jax.cli import flags
from parti_jax.cli.flags import EXIT_PREEMPTED

DESCRIPTION = "Train the text-to-image encoder-decoder on precomputed codes."


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
    flags.add_distributed_flags(parser)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    workdir = flags.start_distributed_run(
        args, workdir_holds="checkpoints, metrics.jsonl, config", gin_example="runs/tiny_train.gin"
    )

    import gin
    from parti_jax.train import t2i

    train_fn = gin.config.get_configurable("train")
    flags.check_required_bindings("train", flags.required_parameters(t2i.train))
    kwargs = {"workdir": str(workdir)}
    if ns.restore_from:
        kwargs["restore_from"] = ns.restore_from
    if ns.restore_include:
        kwargs["restore_include"] = ns.restore_include
    with flags.training_usage_errors():
        result = train_fn(**kwargs)
    flags.write_config(workdir, operative=True)
    return EXIT_PREEMPTED if result.status == "preempted" else 0
