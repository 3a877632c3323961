"""`parti-jax` console script: dispatches to one module per subcommand.

Each subcommand is a function `main(argv)` of a module in `parti_jax/cli/`
(`module:function` where a module serves several). Modules are imported only
when their subcommand runs, so `parti-jax train` does not import TensorFlow
unless its input pipeline needs it.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train-vqgan": ("parti_jax.cli.train:main_vqgan", "train the ViT-VQGAN image tokenizer"),
    "precompute-codes": ("parti_jax.cli.precompute_codes", "encode a pixels task into code shards"),
    "train": ("parti_jax.cli.train", "train the text-to-image encoder-decoder"),
    "sample": ("parti_jax.cli.sample", "generate images from prompts"),
    "train-upsampler": ("parti_jax.cli.train:main_upsampler", "train the super-resolution network"),
    "train-contrastive": (
        "parti_jax.cli.train:main_contrastive",
        "train the contrastive image-text model (reranker, text-encoder warm start)",
    ),
    "eval": ("parti_jax.cli.eval", "run eval suites (PartiPrompts, shapes, FID, ...)"),
    "inspect": (
        "parti_jax.cli.inspect_model",
        "look inside a trained model: cross-attention, probabilities, probes",
    ),
    "export": ("parti_jax.cli.export", "write or inspect a self-contained inference bundle"),
    "launch": ("parti_jax.cli.launch", "run on TPU pods, GKE, SLURM or local processes"),
    "demo": ("parti_jax.cli.demo", "the whole pipeline on the shapes world, on CPU"),
    "benchmark": ("parti_jax.cli.benchmark", "speed of train step, sampling, VQGAN, input"),
    "serve": ("parti_jax.cli.serve", "a local web page: prompts -> reranked image grids"),
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
    return run_failing_fast(getattr(importlib.import_module(module), function or "main"), rest)


def run_failing_fast(fn: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """`flags.run_main(fn, argv)`; a process of a multi-process run that fails (an error, a
    non-zero exit other than a preemption's) ends all processes of the run within seconds
    (`distributed.stop_all_processes`) instead of hanging in jax's shutdown."""
    from parti_jax.cli import flags

    failure: list[str] = []

    def body(args: Sequence[str]) -> int | None:
        try:
            return fn(args)
        except Exception as e:
            failure.append(flags.one_line(e))
            raise

    try:
        code = flags.run_main(body, argv)
    except Exception:
        if not _multiprocess():
            raise
        traceback.print_exc()
        code = 1
    if (failure or code not in (0, flags.EXIT_PREEMPTED)) and _multiprocess():
        distributed = sys.modules["parti_jax.train.distributed"]
        distributed.stop_all_processes(failure[0] if failure else f"exit status {code}", code)
    return code


def _multiprocess() -> bool:
    # Loaded (with jax) only by commands that can run as several processes.
    distributed = sys.modules.get("parti_jax.train.distributed")
    return distributed is not None and distributed.is_multiprocess()


if __name__ == "__main__":
    sys.exit(main())
