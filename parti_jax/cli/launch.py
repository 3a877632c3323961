"""`parti-jax launch`: Run a command on TPU VM pods, GKE, SLURM or local processes."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Run a command on TPU VM pods, GKE, SLURM or local processes."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("launch", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `launch` stage is not built yet (tracked in issue 7); "
        "flags and gin config were parsed and are valid"
    )
