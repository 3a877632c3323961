"""`parti-jax eval`: Run eval suites (PartiPrompts, shapes faithfulness, reconstruction, FID)."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Run eval suites (PartiPrompts, shapes faithfulness, reconstruction, FID)."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("eval", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `eval` stage is not built yet (tracked in issue 6); "
        "flags and gin config were parsed and are valid"
    )
