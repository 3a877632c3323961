"""`parti-jax train-upsampler`: train the super-resolution network on VQGAN reconstructions.

    parti-jax train-upsampler --gin_file=runs/tiny_upsampler.gin --workdir=/tmp/tiny_upsampler
    parti-jax train-upsampler --gin_file=runs/shapes_upsampler.gin --workdir=/tmp/shapes_up \\
        --gin.train_upsampler.vqgan_path="'/tmp/shapes_vqgan'"

Gin binds `train_upsampler.*` (parti_jax.upsampler.train.train_upsampler) and
the config classes (`UpsamplerConfig`, `LossConfig`, `DiscriminatorConfig`,
`MeshConfig`, `OptimizerConfig`). Writes checkpoints, metrics.jsonl and
upsampler_meta.json into --workdir; a run told to stop (SIGTERM) saves and
exits with status 143; run the same command again to resume.
"""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags
from parti_jax.cli.flags import EXIT_PREEMPTED

DESCRIPTION = "Train the super-resolution network on VQGAN reconstructions."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("train-upsampler", DESCRIPTION)
    flags.add_distributed_flags(parser)
    args = flags.parse_args(parser, argv)
    workdir = flags.start_distributed_run(
        args,
        workdir_holds="checkpoints, metrics.jsonl, meta",
        gin_example="runs/tiny_upsampler.gin",
    )

    import gin
    from parti_jax.upsampler import train as upsampler_train

    flags.check_required_bindings(
        "train_upsampler", flags.required_parameters(upsampler_train.train_upsampler)
    )
    train_fn = gin.config.get_configurable("train_upsampler")
    with flags.training_usage_errors():
        result = train_fn(workdir=str(workdir))
    flags.write_config(workdir, operative=True)
    return EXIT_PREEMPTED if result.status == "preempted" else 0
