"""`parti-jax demo`: the whole pipeline on the embedded shapes world, small and on CPU.

    parti-jax demo                              # everything, into ./demo_workdir
    parti-jax demo --workdir=/tmp/demo          # elsewhere; run again to resume
    parti-jax demo --stage=eval --stage=report  # only some stages (earlier ones done)
    parti-jax demo --gin.train/LoopConfig.num_steps=500    # any knob of gin/runs/demo.gin

Stages: world, vocab, vqgan, codes, t2i, contrastive, upsampler, sample, eval, inspect, report
(parti_jax/demo.py). `gin/runs/demo.gin` is always parsed first (it includes
each stage's run file); `--gin_file`s given here are parsed after it, as
overrides. The demo's folder fixes every path: the codes task reads
`<workdir>/codes`, the trainers write `<workdir>/<stage>`. A finished stage is
skipped by the next run; an interrupted one resumes from its checkpoints. The
report is `<workdir>/report/index.html`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from parti_jax.cli import flags

DESCRIPTION = "The whole pipeline on the embedded shapes world, small and on CPU."
DEMO_GIN = "runs/demo.gin"
DEFAULT_WORKDIR = "demo_workdir"


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("demo", DESCRIPTION)
    parser.add_argument(
        "--stage",
        action="append",
        default=[],
        help="run only this stage (repeatable); default: all. Stages: world, vocab, vqgan, "
        "codes, t2i, contrastive, upsampler, sample, eval, inspect, report.",
    )
    args = flags.parse_args(parser, argv)
    args.gin_files = [DEMO_GIN, *args.gin_files]
    workdir = Path(args.workdir or DEFAULT_WORKDIR).expanduser().absolute()

    from parti_jax import demo as demo_lib

    with flags.usage_errors(demo_lib.DemoError):
        stages = demo_lib.check_stages(args.namespace.stage or None)
        demo_lib.prepare_workdir(workdir)
    flags.check_workdir(workdir, "demo")  # the kind and the lock, before anything is written

    import gin

    flags.setup_gin(args, finalize=False)
    # Paths come from the demo's folder, whatever the run files say.
    gin.bind_parameter("register_codes_task.codes_dir", str(workdir / "codes"))
    gin.finalize()
    flags.write_config(workdir)

    from parti_jax.data.vocab import make_shapes_vocab
    from parti_jax.eval import suites as S
    from parti_jax.train import checkpoints
    from parti_jax.vqgan.tokenizer import code_decoder

    get = gin.config.get_configurable
    suite_fns = {name: get(name) for name in S.SUITE_NAMES}
    eval_fn = get("eval")

    def evaluate(*, workdir: str, t2i_path: str, vqgan_path: str, upsampler_path: str,
                 contrastive_path: str | None = None):  # fmt: skip
        return eval_fn(
            workdir=workdir,
            suite_fns=suite_fns,
            checkpoint_dir=t2i_path,
            vqgan_dir=vqgan_path,
            upsampler_dir=upsampler_path,
            contrastive_dir=contrastive_path,
        )

    fns = demo_lib.DemoStageFns(
        train_vqgan=get("train_vqgan"),
        precompute_codes=get("precompute_codes"),
        train_t2i=functools.partial(get("train"), code_decoder_loader=code_decoder),
        train_upsampler=get("train_upsampler"),
        sample=get("sample"),
        evaluate=evaluate,
        train_vocab=make_shapes_vocab,
        train_contrastive=get("train_contrastive"),
    )

    def num_steps(scope: str) -> int | None:  # for the progress bars
        name = f"{scope}/LoopConfig.num_steps"
        if not flags.is_bound(name):
            return None
        value = gin.query_parameter(name)
        # A macro (`num_steps = %STEPS`) comes back as a reference: its value is a call.
        return value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") else value

    chosen = {"stages": stages} if args.namespace.stage else {}
    with flags.usage_errors(
        ValueError, FileNotFoundError, PermissionError, checkpoints.CheckpointError
    ):
        result = get("demo")(
            workdir=str(workdir),
            fns=fns,
            **chosen,
            vqgan_steps=num_steps("train_vqgan"),
            t2i_steps=num_steps("train"),
            upsampler_steps=num_steps("train_upsampler"),
            contrastive_steps=num_steps("train_contrastive"),
        )
    flags.write_config(workdir, operative=True)
    print(demo_lib.format_headline(result))
    return 0
