"""`parti-jax precompute-codes`: encode a `*_pixels` task split with a trained VQGAN into code shards.

    parti-jax precompute-codes --gin_file=runs/shapes_precompute.gin \\
        --vqgan=/tmp/shapes_vqgan --output_dir=/tmp/shapes_codes --split=train --split=validation

Gin binds `precompute_codes.*` (parti_jax.vqgan.precompute.precompute_codes):
`task`, `batch_size`, `shard_size`, ...; the flags `--vqgan`, `--output_dir`
and `--split` (repeatable: with several splits each goes to
`<output_dir>/<split>`, the layout `register_codes_task(codes_dir=...)` reads)
override them. `--output_dir` may be a URL (gs://...; parti_jax/storage.py).
Interrupted runs resume: run the same command again. With
several processes (hosts), start it on every host; each writes its own shards
and process 0 writes codes_meta.json last.
"""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Encode a *_pixels task split with a trained VQGAN into code shards."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("precompute-codes", DESCRIPTION, workdir=False)
    parser.add_argument("--vqgan", default=None, help="train-vqgan work directory.")
    parser.add_argument("--vqgan_step", type=int, default=None, help="checkpoint step (latest).")
    parser.add_argument("--output_dir", default=None, help="codes folder to write (or resume).")
    parser.add_argument("--split", action="append", default=[], help="split to encode; repeatable.")
    flags.add_distributed_flags(parser)
    args = flags.parse_args(parser, argv)
    ns = args.namespace

    flags.init_distributed(ns)
    flags.setup_gin(args)

    import gin

    def bound(name: str, flag_value):
        name = f"precompute_codes.{name}"
        return flag_value or (gin.query_parameter(name) if flags.is_bound(name) else None)

    vqgan = bound("vqgan", ns.vqgan)
    output_dir = bound("output_dir", ns.output_dir)
    splits = ns.split or [bound("split", None) or "train"]
    if not vqgan:
        raise flags.UsageError("pass --vqgan=<train-vqgan work directory>")
    if not output_dir:
        raise flags.UsageError("pass --output_dir=<codes folder>")
    flags.check_required_bindings(
        "precompute_codes", ["task"], "e.g. precompute_codes.task = @register_shapes_task()"
    )
    from parti_jax import storage
    from parti_jax.train import checkpoints
    from parti_jax.vqgan import precompute

    flags.check_workdir(output_dir, "precompute-codes")
    out = storage.join(output_dir)  # as given, normalised: a URL keeps its scheme
    flags.write_config(out)

    fn = gin.config.get_configurable("precompute_codes")
    for split, folder in precompute.output_dirs(out, splits).items():
        kwargs = {"vqgan": vqgan, "output_dir": folder, "split": split}
        if ns.vqgan_step is not None:
            kwargs["vqgan_step"] = ns.vqgan_step
        with flags.usage_errors(
            ValueError, FileNotFoundError, RuntimeError, checkpoints.CheckpointError
        ):
            result = fn(**kwargs)
        if result.meta is not None:
            print(
                f"{split}: {result.meta['num_examples']} examples in "
                f"{len(result.meta['shards'])} shard(s) -> {folder} "
                f"(codebook {result.meta['codebook_hash']}, {result.status})"
            )
    flags.write_config(out, operative=True)
    return 0
