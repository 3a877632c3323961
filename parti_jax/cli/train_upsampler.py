"""`parti-jax train-upsampler`: train the super-resolution network on VQGAN reconstructions.

    parti-jax train-upsampler --gin_file=runs/tiny_upsampler.gin --workdir=/tmp/tiny_upsampler
    parti-jax train-upsampler --gin_file=runs/shapes_upsampler.gin --workdir=/tmp/shapes_up \\
        --gin.train_upsampler.vqgan_path="'/tmp/shapes_vqgan'"

Gin binds `train_upsampler.*` (parti_jax.upsampler.train.train_upsampler) and
the config classes (`UpsamplerConfig`, `LossConfig`, `DiscriminatorConfig`,
`MeshConfig`, `OptimizerConfig`). Writes checkpoints, metrics.jsonl and
upsampler_meta.json into --workdir; a run told to stop (SIGTERM) saves and
exits with status 143; run the same command again to resume.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Train the super-resolution network on VQGAN reconstructions."
EXIT_PREEMPTED = 143


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train-upsampler", DESCRIPTION)
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0.")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    if not args.workdir:
        raise flags.UsageError("--workdir is required (checkpoints, metrics.jsonl, meta)")
    if not args.gin_files:
        raise flags.UsageError("pass --gin_file (e.g. --gin_file=runs/tiny_upsampler.gin)")

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
    from parti_jax.train import checkpoints, loop
    from parti_jax.upsampler import train as upsampler_train

    _check_required(upsampler_train.train_upsampler)
    train_fn = gin.config.get_configurable("train_upsampler")
    try:
        result = train_fn(workdir=str(workdir))
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
    """Required keyword arguments must be bound in gin; names the missing ones."""
    import gin

    missing = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.default is inspect.Parameter.empty and name != "workdir":
            try:
                gin.query_parameter(f"train_upsampler.{name}")
            except ValueError:
                missing.append(name)
    if missing:
        raise flags.UsageError(
            "missing gin binding(s): "
            + ", ".join(f"train_upsampler.{m}" for m in missing)
            + " (set them in the gin file or with --gin.train_upsampler.NAME=VALUE)"
        )


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
