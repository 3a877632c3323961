"""`parti-jax train-vqgan`: Train the ViT-VQGAN image tokenizer (or fine-tune its decoder)."""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Train the ViT-VQGAN image tokenizer (or fine-tune its decoder)."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train-vqgan", DESCRIPTION)
    args = flags.parse_args(parser, argv)
    flags.setup_gin(args)
    if args.workdir:
        flags.write_config(flags.check_workdir(args.workdir))
    raise flags.UsageError(
        "the `train-vqgan` stage is not built yet (tracked in issue 4); "
        "flags and gin config were parsed and are valid"
    )
