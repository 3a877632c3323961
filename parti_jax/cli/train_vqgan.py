"""`parti-jax train-vqgan`: train the ViT-VQGAN image tokenizer, or fine-tune its decoder.

    parti-jax train-vqgan --gin_file=runs/tiny_vqgan.gin --workdir=/tmp/tiny_vqgan
    parti-jax train-vqgan --gin_file=runs/shapes_vqgan.gin --workdir=/tmp/shapes_vqgan
    parti-jax train-vqgan --gin_file=runs/vqgan_finetune_decoder.gin \\
        --workdir=/tmp/vqgan_ft --init_from=/tmp/vqgan_base

Gin binds `train_vqgan.*` (parti_jax.vqgan.train.train_vqgan) and the config
classes (`VQGANConfig`, `LossConfig`, `DiscriminatorConfig`, `MeshConfig`,
`OptimizerConfig`, or `adamw_optimizer` for the Adam-W defaults; scope them as
`generator/...` and `discriminator/...`). The work directory gets checkpoints,
`vqgan_meta.json`, `metrics.jsonl`, `images/step_<n>.png`, `config.gin` and
`operative_config.gin`. A run told to stop (SIGTERM) saves and exits with
status 143; run the same command again to resume.
"""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags
from parti_jax.cli.flags import EXIT_PREEMPTED

DESCRIPTION = "Train the ViT-VQGAN image tokenizer (or fine-tune its decoder)."
REQUIRED = ("vqgan_config", "batch_size", "num_steps")


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train-vqgan", DESCRIPTION)
    parser.add_argument(
        "--init_from",
        default=None,
        help="Base train-vqgan work directory to warm-start from (decoder fine-tuning: "
        "with train_vqgan.freeze='encoder_and_codebook'); used only when --workdir has no "
        "checkpoint yet.",
    )
    flags.add_distributed_flags(parser)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    workdir = flags.start_distributed_run(
        args,
        workdir_holds="checkpoints, vqgan_meta.json, metrics",
        gin_example="runs/tiny_vqgan.gin",
    )

    import gin

    flags.check_required_bindings("train_vqgan", REQUIRED)
    kwargs = {"workdir": str(workdir)}
    if ns.init_from:
        kwargs["init_from"] = ns.init_from
    train_fn = gin.config.get_configurable("train_vqgan")
    with flags.training_usage_errors():
        result = train_fn(**kwargs)
    flags.write_config(workdir, operative=True)
    print(f"codebook hash {result.codebook_hash} at step {result.step} ({result.status})")
    return EXIT_PREEMPTED if result.status == "preempted" else 0
