"""`parti-jax eval`: eval suites, side-by-side pages and vote aggregation.

    parti-jax eval --gin_file=runs/eval_shapes.gin --workdir=/tmp/eval \\
        --gin.eval.checkpoint_dir="'/tmp/shapes_train'" --gin.eval.vqgan_dir="'/tmp/vqgan'"
    parti-jax eval --gin_file=runs/eval_shapes.gin --workdir=/tmp/eval ... \\
        --gin.eval.contrastive_dir="'/tmp/contrastive'" --gin.shapes.num_samples=4 \\
        --gin.shapes.keep_top_k=4 --gin.shapes.scorer="'contrastive'"
    parti-jax eval --side_by_side /tmp/evalA/parti_prompts /tmp/evalB/parti_prompts \\
        --out /tmp/sbs.html [--name_a A --name_b B --seed 0]
    parti-jax eval --compare votes1.json votes2.json [--out_dir /tmp/compare]

The first form runs the suites named in `eval.suites` (parti_prompts, shapes,
reconstruction, fid, coco_fid; parti_jax/eval/suites.py), each into
`<workdir>/<suite>/` with metrics.json and a report, and prints the headline
numbers. With eval.contrastive_dir (a `parti-jax train-contrastive` work
directory) scorer='contrastive' reranks by that model and the generating
suites add its CLIP score and R-precision (shapes: also its agreement with
the judge). Prompts are split across processes (several hosts, or
--process_index/--process_count to split the work by hand) and a rerun
skips the prompts already generated. --workdir may be a URL (gs://...;
parti_jax/storage.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Run eval suites (PartiPrompts, shapes faithfulness, reconstruction, FID)."


def _compare(argv: list[str]) -> int:
    from parti_jax.eval import compare

    rest = [arg.removeprefix("--compare=") for arg in argv if arg != "--compare"]
    try:
        return compare.main_compare(rest)
    except compare.VotesError as e:
        raise flags.UsageError(str(e).splitlines()[0]) from None
    except OSError as e:
        raise flags.UsageError(f"--compare: cannot write the report ({e})") from None


def _side_by_side(argv: list[str]) -> int:
    import argparse

    from parti_jax.eval import records, side_by_side

    parser = argparse.ArgumentParser(
        prog="parti-jax eval --side_by_side",
        description="A blind side-by-side rating page for two eval folders.",
    )
    parser.add_argument("--side_by_side", nargs=2, metavar=("DIR_A", "DIR_B"), required=True)
    parser.add_argument("--out", required=True, help="the HTML page to write")
    parser.add_argument("--name_a", default=None, help="A's name in the exported votes")
    parser.add_argument("--name_b", default=None, help="B's name in the exported votes")
    parser.add_argument("--seed", type=int, default=0, help="draws the left/right sides")
    parser.add_argument("--max_images", type=int, default=None, help="images per side")
    parser.add_argument("--title", default="Side-by-side")
    ns = parser.parse_args(argv)
    dir_a, dir_b = ns.side_by_side
    try:
        options = {k: getattr(ns, k) for k in ("name_a", "name_b", "seed", "title", "max_images")}
        page = side_by_side.write_side_by_side(dir_a, dir_b, ns.out, **options)
    except (records.RecordError, ValueError, OSError) as e:
        raise flags.UsageError(f"--side_by_side: {str(e).splitlines()[0]}") from None
    print(f"wrote {page}")
    return 0


def _suites_main(argv: list[str]) -> int:
    parser = flags.make_parser("eval", DESCRIPTION)
    parser.add_argument(
        "--compare", nargs="+", metavar="VOTES", help="aggregate exported vote files (see above)"
    )
    parser.add_argument(
        "--side_by_side", nargs=2, metavar=("DIR_A", "DIR_B"), help="write a rating page"
    )
    parser.add_argument("--process_index", type=int, default=None, help="this process's share")
    parser.add_argument("--process_count", type=int, default=None, help="number of shares")
    flags.add_distributed_flags(parser)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    if (ns.process_index is None) != (ns.process_count is None):
        raise flags.UsageError("give --process_index and --process_count together")
    flags.start_distributed_run(
        args, workdir_holds="each suite writes a folder there", gin_example="runs/eval_shapes.gin"
    )

    import gin
    from parti_jax import storage
    from parti_jax.eval import runner
    from parti_jax.eval import suites as S

    workdir = storage.join(args.workdir)  # as given: a URL keeps its scheme
    eval_fn = gin.config.get_configurable("eval")
    suite_fns = {name: gin.config.get_configurable(name) for name in S.SUITE_NAMES}
    try:
        with flags.usage_errors(ValueError, FileNotFoundError, PermissionError):
            results = eval_fn(
                workdir=workdir,
                suite_fns=suite_fns,
                process_index=ns.process_index,
                process_count=ns.process_count,
            )
    except TypeError as e:
        if "suites" in str(e):
            raise flags.UsageError(
                "eval.suites is not bound: set it in the gin file, e.g. eval.suites = ['shapes']"
            ) from None
        raise
    flags.write_config(workdir, operative=True)
    for name, metrics in results.items():
        numbers = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in runner.headline(name, metrics)
        )
        print(f"{name}: {numbers}")
    print(f"report: {storage.join(workdir, 'index.html')}")
    return 0


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if any(a == "--compare" or a.startswith("--compare=") for a in argv):
        return _compare(argv)
    if "--side_by_side" in argv:
        return _side_by_side(argv)
    return _suites_main(argv)
