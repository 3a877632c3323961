"""`parti-jax precompute-codes`: Encode a *_pixels task split with a trained VQGAN into code shards."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Encode a *_pixels task split with a trained VQGAN into code shards."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("precompute-codes", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `precompute-codes` stage is not built yet (tracked in issue 4); "
        "flags and gin config were parsed and are valid"
    )
