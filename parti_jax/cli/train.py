"""`parti-jax train`: Train the text-to-image encoder-decoder on precomputed codes."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Train the text-to-image encoder-decoder on precomputed codes."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `train` stage is not built yet (tracked in issue 3); "
        "flags and gin config were parsed and are valid"
    )
