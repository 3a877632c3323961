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
from parti_jax.cli.train import EXIT_PREEMPTED, _one_line

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
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0.")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    if not args.workdir:
        raise flags.UsageError("--workdir is required (checkpoints, vqgan_meta.json, metrics)")
    if not args.gin_files:
        raise flags.UsageError("pass --gin_file (e.g. --gin_file=runs/tiny_vqgan.gin)")

    from parti_jax.train import distributed

    try:
        distributed.maybe_initialize_distributed(
            ns.coordinator_address, ns.num_processes, ns.process_id
        )
    except ValueError as e:
        raise flags.UsageError(str(e)) from e

    workdir = flags.check_workdir(args.workdir)
    flags.setup_gin(args)
    flags.write_config(workdir)

    import gin
    from parti_jax.train import checkpoints, loop

    missing = []
    for name in REQUIRED:
        try:
            gin.query_parameter(f"train_vqgan.{name}")
        except ValueError:
            missing.append(f"train_vqgan.{name}")
    if missing:
        raise flags.UsageError(
            f"missing gin binding(s): {', '.join(missing)} (set them in the gin file or with "
            "--gin.train_vqgan.NAME=VALUE)"
        )
    kwargs = {"workdir": str(workdir)}
    if ns.init_from:
        kwargs["init_from"] = ns.init_from
    train_fn = gin.config.get_configurable("train_vqgan")
    try:
        result = train_fn(**kwargs)
    except (
        ValueError,
        PermissionError,
        FileNotFoundError,
        checkpoints.CheckpointError,
        loop.NonFiniteLossError,
    ) as e:
        raise flags.UsageError(_one_line(e)) from e
    flags.write_config(workdir, operative=True)
    print(f"codebook hash {result.codebook_hash} at step {result.step} ({result.status})")
    return EXIT_PREEMPTED if result.status == "preempted" else 0
