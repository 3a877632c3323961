"""`parti-jax train`, `train-vqgan`, `train-upsampler`, `train-contrastive`: four trainers, one loop.

    parti-jax train --gin_file=runs/tiny_train.gin --workdir=/tmp/tiny_train
    parti-jax train --gin_file=runs/shapes_train.gin --workdir=/tmp/shapes \\
        --gin.train/LoopConfig.num_steps=2000 --restore_from=/tmp/other_run
    parti-jax train --gin_file=runs/shapes_train.gin --workdir=/tmp/shapes \\
        --text_encoder_from=/tmp/tiny_clip
    parti-jax train-vqgan --gin_file=runs/tiny_vqgan.gin --workdir=/tmp/tiny_vqgan
    parti-jax train-vqgan --gin_file=runs/vqgan_finetune_decoder.gin \\
        --workdir=/tmp/vqgan_ft --init_from=/tmp/vqgan_base
    parti-jax train-upsampler --gin_file=runs/tiny_upsampler.gin --workdir=/tmp/tiny_up
    parti-jax train-contrastive --gin_file=runs/tiny_contrastive.gin --workdir=/tmp/tiny_clip

Gin binds the trainer's arguments (`train.*`, `train_vqgan.*`,
`train_upsampler.*`, `train_contrastive.*`), the config classes (`ModelConfig`,
`VQGANConfig`, `UpsamplerConfig`, `ContrastiveConfig`, `LossConfig`, `DiscriminatorConfig`, `MeshConfig`,
`OptimizerConfig` or `adamw_optimizer`, scoped `generator/...` and
`discriminator/...` where a trainer has two) and the loop, scoped by the
trainer's name: `train.loop = @train/LoopConfig()` with
`train/LoopConfig.num_steps = 1000`. Several processes (a pod, a SLURM job,
`parti-jax launch`) are detected from the environment or given with
--coordinator_address / --num_processes / --process_id. A run told to stop
(SIGTERM) saves a checkpoint and exits with status 143; run the same command
again to resume: from the newest intact checkpoint (a damaged one is kept
aside as `<step>.corrupt-<time>`), or from --restore_step=N. --workdir may be a
URL (gs://bucket/run): every file of the run goes there (parti_jax/storage.py),
nothing to the local disk but temporary staging folders.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence

from parti_jax.cli import flags
from parti_jax.cli.flags import EXIT_PREEMPTED


@dataclasses.dataclass(frozen=True)
class Trainer:
    command: str
    function: str  # 'module:name' of the library entry point, registered in gin as `name`
    description: str
    example: str  # a shipped gin file that runs it
    holds: str  # what --workdir gets
    flags: tuple[tuple[str, str], ...] = ()  # (flag, help): passed on when given


TRAINERS = {
    "train": Trainer(
        "train",
        "parti_jax.train.t2i:train",
        "Train the text-to-image encoder-decoder on precomputed codes.",
        "runs/tiny_train.gin",
        "checkpoints, metrics.jsonl, config",
        (
            (
                "restore_from",
                "Warm-start parameters from another run's work directory or checkpoint "
                "(used only when --workdir has no checkpoint yet).",
            ),
            ("restore_include", "Regex of parameter paths to warm-start, e.g. 'encoder/.*'."),
            (
                "text_encoder_from",
                "Start the text encoder from a `parti-jax train-contrastive` work directory's "
                "text tower (after --restore_from when both are given; used only when "
                "--workdir has no checkpoint yet).",
            ),
        ),
    ),
    "train-vqgan": Trainer(
        "train-vqgan",
        "parti_jax.vqgan.train:train_vqgan",
        "Train the ViT-VQGAN image tokenizer (or fine-tune its decoder).",
        "runs/tiny_vqgan.gin",
        "checkpoints, vqgan_meta.json, metrics",
        (
            (
                "init_from",
                "Base train-vqgan work directory to warm-start from (decoder fine-tuning: with "
                "train_vqgan.freeze='encoder_and_codebook'); used only when --workdir has no "
                "checkpoint yet.",
            ),
        ),
    ),
    "train-upsampler": Trainer(
        "train-upsampler",
        "parti_jax.upsampler.train:train_upsampler",
        "Train the super-resolution network on VQGAN reconstructions.",
        "runs/tiny_upsampler.gin",
        "checkpoints, metrics.jsonl, meta",
    ),
    "train-contrastive": Trainer(
        "train-contrastive",
        "parti_jax.contrastive.train:train_contrastive",
        "Train the contrastive image-text model (the reranker and text-encoder warm start).",
        "runs/tiny_contrastive.gin",
        "checkpoints, metrics.jsonl, contrastive_meta.json",
    ),
}


def run(trainer: Trainer, argv: Sequence[str]) -> int:
    parser = flags.make_parser(trainer.command, trainer.description)
    for name, help_text in trainer.flags:
        parser.add_argument(f"--{name}", default=None, help=help_text)
    parser.add_argument(
        "--restore_step",
        type=int,
        default=None,
        help="Resume from this checkpoint step instead of the newest intact one; newer "
        "checkpoints are kept aside as <step>.replaced-<time> (LoopConfig.restore_step). "
        "A one-off: leave it out when resuming later.",
    )
    flags.add_distributed_flags(parser)
    args = flags.parse_args(parser, argv)
    if args.namespace.restore_step is not None:
        args.gin_bindings.append(f"LoopConfig.restore_step = {args.namespace.restore_step}")
    workdir = flags.start_distributed_run(
        args, workdir_holds=trainer.holds, gin_example=trainer.example
    )

    import gin

    module, name = trainer.function.split(":")
    library_fn = getattr(importlib.import_module(module), name)
    flags.check_required_bindings(name, flags.required_parameters(library_fn))
    kwargs = {"workdir": str(workdir)}
    kwargs.update({f: getattr(args.namespace, f) for f, _ in trainer.flags})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if trainer.command == "train":  # the VQGAN decoder of the eval sample grid (a layer above)
        from parti_jax.vqgan.tokenizer import code_decoder

        kwargs["code_decoder_loader"] = code_decoder
    with flags.training_usage_errors():
        result = gin.config.get_configurable(name)(**kwargs)
    flags.write_config(workdir, operative=True)
    if "codebook_hash" in result.records:
        print(f"codebook hash {result.records['codebook_hash']} at step {result.step}")
    return EXIT_PREEMPTED if result.status == "preempted" else 0


def main(argv: Sequence[str]) -> int:
    return run(TRAINERS["train"], argv)


def main_vqgan(argv: Sequence[str]) -> int:
    return run(TRAINERS["train-vqgan"], argv)


def main_upsampler(argv: Sequence[str]) -> int:
    return run(TRAINERS["train-upsampler"], argv)


def main_contrastive(argv: Sequence[str]) -> int:
    return run(TRAINERS["train-contrastive"], argv)
