"""`parti-jax benchmark`: Benchmarks: train step, sampling, VQGAN, input pipeline."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Benchmarks: train step, sampling, VQGAN, input pipeline."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("benchmark", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `benchmark` stage is not built yet (tracked in issue 8); "
        "flags and gin config were parsed and are valid"
    )
