"""`parti-jax export`: Write or inspect a self-contained inference bundle."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Write or inspect a self-contained inference bundle."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("export", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `export` stage is not built yet (tracked in issue 7); "
        "flags and gin config were parsed and are valid"
    )
