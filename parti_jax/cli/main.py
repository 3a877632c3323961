"""`parti-jax` console script: dispatches to one module per subcommand.

Each subcommand is a function `main(argv)` of a module in `parti_jax/cli/`
(`module:function` where a module serves several). Modules are imported only
when their subcommand runs, so `parti-jax train` does not import TensorFlow
unless its input pipeline needs it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train-vqgan": ("parti_jax.cli.train:main_vqgan", "train the ViT-VQGAN image tokenizer"),
    "precompute-codes": ("parti_jax.cli.precompute_codes", "encode a pixels task into code shards"),
    "train": ("parti_jax.cli.train", "train the text-to-image encoder-decoder"),
    "sample": ("parti_jax.cli.sample", "generate images from prompts"),
    "train-upsampler": ("parti_jax.cli.train:main_upsampler", "train the super-resolution network"),
    "eval": ("parti_jax.cli.eval", "run eval suites (PartiPrompts, shapes, FID, ...)"),
    "export": ("parti_jax.cli.export", "write or inspect a self-contained inference bundle"),
    "launch": ("parti_jax.cli.launch", "run on TPU pods, GKE, SLURM or local processes"),
    "demo": ("parti_jax.cli.demo", "the whole pipeline on the shapes world, on CPU"),
    "benchmark": ("parti_jax.cli.benchmark", "speed of train step, sampling, VQGAN, input"),
    "train-vocab": ("parti_jax.cli.train_vocab", "train the SentencePiece text vocabulary"),
}


def usage() -> str:
    lines = ["usage: parti-jax <command> [--gin_file=F ...] [--gin.NAME=VALUE ...] [flags]"]
    lines += ["", "commands:", *(f"  {n:<18} {h}" for n, (_, h) in SUBCOMMANDS.items()), ""]
    lines.append("Run `parti-jax <command> --help` for the flags of one command.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"parti-jax: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, _, function = SUBCOMMANDS[command][0].partition(":")
    from parti_jax.cli import flags

    return flags.run_main(getattr(importlib.import_module(module), function or "main"), rest)


if __name__ == "__main__":
    sys.exit(main())
