"""`parti-jax sample`: prompts -> text tokens -> codes -> pixels -> upsampled, reranked PNGs.

    parti-jax sample --gin_file=runs/shapes_sample.gin --workdir=/tmp/samples \\
        --prompt "a red circle" --prompt "a blue square below a green cross"
    parti-jax sample --gin_file=runs/shapes_sample.gin --workdir=/tmp/samples --prompts_file p.txt
    parti-jax sample --gin_file=runs/shapes_sample.gin --workdir=/tmp/samples \\
        --task shapes_world --split validation --num_prompts 16
    parti-jax sample --gin_file=runs/shapes_sample.gin --workdir=/tmp/samples \\
        --prompt "a red circle" --contrastive /runs/clip --gin.sample.scorer="'contrastive'"

Gin binds `sample.*` (parti_jax.sampling.sample_to_folder): the three work
directories (`sample.t2i_path`, `sample.vqgan_path`, `sample.upsampler_path`;
the --t2i / --vqgan / --upsampler flags override them), `SamplingConfig`,
`sample.keep_top_k`, `sample.scorer`, `sample.batch_size`, and
`sample.contrastive_path` (--contrastive: a `parti-jax train-contrastive` work
directory, for `sample.scorer = 'contrastive'`). The prompts come
from the flags: --prompt (repeatable), --prompts_file (one per line) or
--task/--split (the captions of a `<name>_pixels` task split, or of the
built-in 'shapes_world'; the prompt id is the example's index in the split).
Prompts must be UTF-8 text; an empty one (an unconditional sample) needs
--allow_empty_prompt.
Writes `<workdir>/<prompt_id>_<rank>.png` and `<workdir>/manifest.json`; --workdir,
--prompts_file and the work directories may be URLs (gs://...; parti_jax/storage.py).
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Generate images from prompts: tokens -> codes -> pixels -> upsampled, reranked PNGs."
SHAPES_WORLD = "shapes_world"


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("sample", DESCRIPTION)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", default=None, help="A prompt; repeatable.")
    source.add_argument("--prompts_file", default=None, help="Text file, one prompt per line.")
    source.add_argument(
        "--task",
        default=None,
        help="Take prompts from the captions of this `<name>_pixels` task (or 'shapes_world').",
    )
    parser.add_argument("--split", default="validation", help="Split of --task.")
    parser.add_argument("--num_prompts", type=int, default=16, help="Prompts taken from --task.")
    flags.add_model_dir_flags(parser)
    parser.add_argument(
        "--contrastive", default=None,
        help="Contrastive model work directory (`parti-jax train-contrastive`) for "
        "sample.scorer='contrastive' (overrides sample.contrastive_path).",
    )  # fmt: skip
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "--allow_empty_prompt", action="store_true",
        help='Accept an empty --prompt "" (an unconditional sample); refused otherwise.',
    )  # fmt: skip
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    if not args.workdir:
        raise flags.UsageError("--workdir is required (the output folder for PNGs + manifest)")
    if ns.prompt is None and ns.prompts_file is None and ns.task is None:
        raise flags.UsageError(
            "pass --prompt TEXT (repeatable), --prompts_file FILE or --task NAME"
        )
    from parti_jax import sampling

    prompts = None
    with flags.usage_errors(ValueError, FileNotFoundError):  # at the door: before any write
        if ns.prompt is not None:
            prompts = sampling.check_prompts(
                ns.prompt, "--prompt", allow_empty=ns.allow_empty_prompt
            )
        elif ns.prompts_file is not None:
            prompts = sampling.read_prompts_file(ns.prompts_file)
    flags.start_run(args)

    import gin
    from parti_jax import storage
    from parti_jax.data.vocab import VocabularyError
    from parti_jax.train.checkpoints import CheckpointError

    out = storage.join(args.workdir)  # as given: a URL keeps its scheme
    kwargs = {"workdir": out, "progress": not ns.no_progress, **flags.model_dir_kwargs(ns)}
    if ns.contrastive is not None:
        kwargs["contrastive_path"] = ns.contrastive
    if ns.allow_empty_prompt:
        kwargs["allow_empty_prompt"] = True
    flags.check_required_bindings(
        "sample",
        flags.required_parameters(sampling.sample_to_folder, kwargs),
        "bind them in the gin file, e.g. --gin_file=runs/shapes_sample.gin, or pass --t2i / --vqgan",
    )
    # ValueError covers loading.LoadError and CompatibilityError.
    with flags.usage_errors(ValueError, FileNotFoundError, CheckpointError, VocabularyError):
        if prompts is not None:
            kwargs["prompts"] = prompts
        else:
            kwargs["prompts"], kwargs["prompt_ids"] = task_prompts(
                ns.task, ns.split, ns.num_prompts
            )
        with warnings.catch_warnings():  # restored on exit
            warnings.simplefilter("always", sampling.PromptTruncatedWarning)
            warnings.showwarning = _show_warning
            manifest = gin.get_configurable("sample")(**kwargs)
    flags.write_config(out, operative=True)
    print(f"wrote {len(manifest['images'])} image(s) and manifest.json to {out}")
    return 0


def task_prompts(task: str, split: str, num_prompts: int) -> tuple[list[str], list[int]]:
    """(captions, their indices) of the first `num_prompts` examples of a task split."""
    if num_prompts < 1:
        raise ValueError(f"--num_prompts={num_prompts} must be >= 1")
    if task == SHAPES_WORLD:
        from parti_jax.data import shapes

        if split not in shapes.SPLITS:
            raise ValueError(
                f"shapes_world has no split {split!r}; use one of {list(shapes.SPLITS)}"
            )
        captions = [shapes.generate_scene(i, split)[1] for i in range(num_prompts)]
        return captions, list(range(num_prompts))
    import parti_jax.tasks  # noqa: F401 - registers the shipped tasks (TensorFlow)
    from parti_jax.data import pipeline

    it = pipeline.make_pixels_iterator(
        task, batch_size=1, split=split, shuffle=False, repeat=False, drop_remainder=False
    )
    captions = [str(batch["text"][0]) for batch in itertools.islice(it, num_prompts)]
    if not captions:
        raise ValueError(f"task {task!r} split {split!r} has no examples")
    return captions, list(range(len(captions)))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"parti-jax: warning: {message}", file=sys.stderr)
