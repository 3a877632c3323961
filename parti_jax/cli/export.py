"""`parti-jax export`: write or inspect a self-contained inference bundle.

    parti-jax export --workdir=/models/shapes --t2i /runs/t2i --vqgan /runs/vqgan \\
        --upsampler /runs/upsampler [--contrastive /runs/clip] \\
        [--gin_file=runs/shapes_sample.gin] [--platforms=cpu,cuda,tpu] \\
        [--export_batch_size=16] [--no_jax_export] [--overwrite]
    parti-jax export --inspect /runs/t2i          # or a VQGAN / upsampler work dir, a bundle
    parti-jax export --inspect /models/shapes --json

Gin binds `export.*` (parti_jax.export.export_bundle): `export.t2i_path`,
`export.vqgan_path`, `export.upsampler_path`, `export.contrastive_path` (the
--t2i / --vqgan / --upsampler / --contrastive flags override them; a
contrastive model makes the bundle rerank with scorer='contrastive'),
`export.sampling_config =
@SamplingConfig()` (Bundle.generate's default and what the jax.export
sampler compiles in), `export.vocab_path`, `export.t2i_step`. The bundle is
--workdir (a folder or a URL such as gs://bucket/bundles/shapes): it must be
new or empty, or hold a bundle and --overwrite be given.
After the export the gin config is written into the bundle (config.gin,
operative_config.gin). Layout: docs/EXPORT.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Write or inspect a self-contained inference bundle."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("export", DESCRIPTION)
    parser.add_argument(
        "--inspect", default=None, metavar="PATH",
        help="List parameter names, shapes, dtypes and totals of a bundle, a train / "
        "train-vqgan / train-upsampler / train-contrastive work directory or a checkpoint, "
        "then exit.",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="With --inspect: print JSON.")
    flags.add_model_dir_flags(parser)
    parser.add_argument(
        "--contrastive", default=None,
        help="Contrastive model work directory (`parti-jax train-contrastive`): bundled for "
        "scorer='contrastive'.",
    )  # fmt: skip
    parser.add_argument(
        "--platforms", default=None,
        help="jax.export lowering platforms, comma separated (default cpu,cuda,tpu).",
    )  # fmt: skip
    parser.add_argument(
        "--export_batch_size", type=int, default=None,
        help="Rows of the exported sampler (default SamplingConfig.num_samples).",
    )  # fmt: skip
    parser.add_argument("--no_jax_export", action="store_true", help="Skip the jax.export sampler.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a bundle already at --workdir."
    )
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    from parti_jax import export

    if ns.inspect is not None:
        with flags.usage_errors(ValueError, FileNotFoundError):
            report = export.inspect_path(ns.inspect)
        print(json.dumps(report, indent=2) if ns.json else export.format_inspection(report))
        return 0
    if not args.workdir:
        raise flags.UsageError(
            "--workdir is required (the bundle directory to write), or pass --inspect PATH"
        )
    flags.setup_gin(args)

    import gin
    from parti_jax import storage

    out = storage.path(args.workdir)  # a URL keeps its scheme
    kwargs = flags.model_dir_kwargs(ns, "platforms", "export_batch_size")
    if ns.contrastive is not None:
        kwargs["contrastive_path"] = ns.contrastive
    if ns.no_jax_export:
        kwargs["jax_export"] = False
    flags.check_required_bindings(
        "export",
        flags.required_parameters(export.export_bundle, {"out_dir", *kwargs}),
        "pass --t2i / --vqgan or bind them in a gin file",
    )
    try:
        with flags.usage_errors(ValueError, FileNotFoundError):
            export.check_destination(out, overwrite=ns.overwrite)
            info = gin.get_configurable("export")(out, overwrite=ns.overwrite, **kwargs)
    except OSError as e:
        raise flags.UsageError(
            f"{out}: cannot write the bundle ({e.strerror or e}); pass a --workdir you can write to"
        ) from e
    flags.write_config(out)
    flags.write_config(out, operative=True)
    total = sum(f["bytes"] for f in info["files"].values())
    exported = info.get("jax_export")
    print(
        f"wrote bundle {out} ({len(info['files'])} files, {total:,} bytes"
        + (f", jax.export for {','.join(exported['platforms'])}" if exported else "")
        + ")"
    )
    return 0
