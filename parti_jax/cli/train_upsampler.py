"""`parti-jax train-upsampler`: Train the super-resolution network on VQGAN reconstructions."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Train the super-resolution network on VQGAN reconstructions."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train-upsampler", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `train-upsampler` stage is not built yet (tracked in issue 5); "
        "flags and gin config were parsed and are valid"
    )
