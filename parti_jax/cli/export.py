"""`parti-jax export`: write or inspect a self-contained inference bundle.

    parti-jax export --workdir=/models/shapes --t2i /runs/t2i --vqgan /runs/vqgan \\
        --upsampler /runs/upsampler [--gin_file=runs/shapes_sample.gin] \\
        [--platforms=cpu,cuda,tpu] [--export_batch_size=16] [--no_jax_export] [--overwrite]
    parti-jax export --inspect /runs/t2i          # or a VQGAN / upsampler work dir, a bundle
    parti-jax export --inspect /models/shapes --json

Gin binds `export.*` (parti_jax.export.export_bundle): `export.t2i_path`,
`export.vqgan_path`, `export.upsampler_path` (the --t2i / --vqgan /
--upsampler flags override them), `export.sampling_config =
@SamplingConfig()` (Bundle.generate's default and what the jax.export
sampler compiles in), `export.vocab_path`, `export.t2i_step`. The bundle is
--workdir: it must be new or empty, or hold a bundle and --overwrite be given.
After the export the gin config is written into the bundle (config.gin,
operative_config.gin). Layout: docs/EXPORT.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from parti_jax.cli import flags

DESCRIPTION = "Write or inspect a self-contained inference bundle."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("export", DESCRIPTION)
    parser.add_argument(
        "--inspect", default=None, metavar="PATH",
        help="List parameter names, shapes, dtypes and totals of a bundle, a train / "
        "train-vqgan / train-upsampler work directory or a checkpoint, then exit.",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="With --inspect: print JSON.")
    parser.add_argument("--t2i", default=None, help="Encoder-decoder work directory.")
    parser.add_argument("--vqgan", default=None, help="VQGAN work directory.")
    parser.add_argument("--upsampler", default=None, help="Upsampler work directory.")
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
    if ns.inspect is not None:
        return _inspect(ns.inspect, as_json=ns.json)
    if not args.workdir:
        raise flags.UsageError(
            "--workdir is required (the bundle directory to write), or pass --inspect PATH"
        )
    flags.setup_gin(args)

    import gin
    from parti_jax import export

    out = Path(args.workdir).expanduser()
    kwargs: dict = {}
    for flag, name in (("t2i", "t2i_path"), ("vqgan", "vqgan_path"),
                       ("upsampler", "upsampler_path"), ("platforms", "platforms"),
                       ("export_batch_size", "export_batch_size")):  # fmt: skip
        if getattr(ns, flag) is not None:
            kwargs[name] = getattr(ns, flag)
    if ns.no_jax_export:
        kwargs["jax_export"] = False
    _check_required(set(kwargs))
    try:
        with flags.usage_errors(ValueError, FileNotFoundError):
            export.check_destination(out.absolute(), overwrite=ns.overwrite)
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


def _inspect(path: str, *, as_json: bool) -> int:
    from parti_jax import export

    with flags.usage_errors(ValueError, FileNotFoundError):
        report = export.inspect_path(path)
    print(json.dumps(report, indent=2) if as_json else export.format_inspection(report))
    return 0


def _check_required(given: set[str]) -> None:
    """t2i_path and vqgan_path must come from gin or a flag; names the missing ones."""
    missing = flags.missing_bindings(
        "export", [n for n in ("t2i_path", "vqgan_path") if n not in given]
    )
    if missing:
        raise flags.UsageError(
            "missing: " + ", ".join(missing) + " (pass --t2i / --vqgan or bind them in a gin file)"
        )
