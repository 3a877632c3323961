"""`parti-jax inspect`: look inside a trained encoder-decoder (parti_jax/eval/inspection.py).

    parti-jax inspect --t2i=/tmp/demo/t2i --vqgan=/tmp/demo/vqgan --codes=/tmp/demo/codes \\
        --workdir=/tmp/inspect                     # shapes-world eval scenes
    parti-jax inspect --t2i=... --vqgan=... --workdir=/tmp/inspect \\
        --prompt "a large blue triangle in the center" --prompt "a red square on the left"

Writes <workdir>/index.html (one self-contained page: the diagnosis figures, the
linear probes on the text encoder, and per scene the cross-attention of every
caption word, p(chosen code), entropy, top alternatives decoded in place and
the teacher-forced probe) and <workdir>/inspect.json (the same numbers).
--codes (the `precompute-codes` output the encoder-decoder trained on) adds the
share of held-out images' codes that were never a training target.
"""

from __future__ import annotations

from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Look inside a trained encoder-decoder: attention, probabilities, probes."


def main(argv: Sequence[str]) -> int:
    parser = flags.make_parser("inspect", DESCRIPTION)
    parser.add_argument("--t2i", required=True, help="`parti-jax train` work directory.")
    parser.add_argument("--vqgan", required=True, help="`parti-jax train-vqgan` work directory.")
    parser.add_argument(
        "--codes", default=None,
        help="The encoder-decoder's training codes (precompute-codes output); optional.",
    )  # fmt: skip
    parser.add_argument(
        "--prompt", action="append", default=None,
        help="Sample this prompt for the per-scene views (repeatable); default: shapes-world "
        "eval scenes.",
    )  # fmt: skip
    parser.add_argument("--num_in_distribution", type=int, default=4,
                        help="In-distribution eval scenes with per-scene views.")  # fmt: skip
    parser.add_argument("--num_heldout", type=int, default=4,
                        help="Held-out-pair eval scenes with per-scene views.")  # fmt: skip
    parser.add_argument(
        "--num_probe_scenes", type=int, default=100,
        help="Scenes per group for the teacher-forced probes and the tokenizer check (0: off).",
    )  # fmt: skip
    parser.add_argument(
        "--num_probe_captions", type=int, default=1500,
        help="Captions the linear probes are fitted on (0: off).",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--guidance_scale", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    args = flags.parse_args(parser, argv)
    ns = args.namespace
    if not args.workdir:
        raise flags.UsageError("--workdir is required (the folder for index.html + inspect.json)")
    for name in ("num_in_distribution", "num_heldout", "num_probe_scenes", "num_probe_captions"):
        if getattr(ns, name) < 0:
            raise flags.UsageError(f"--{name}={getattr(ns, name)} must be >= 0")
    if ns.prompt is not None:
        from parti_jax import sampling

        with flags.usage_errors(ValueError):
            ns.prompt = sampling.check_prompts(ns.prompt, "--prompt")
    elif ns.num_in_distribution + ns.num_heldout == 0:
        raise flags.UsageError("no scenes to view: pass --prompt or --num_in_distribution > 0")
    flags.setup_gin(args)
    flags.check_workdir(args.workdir)

    from parti_jax.data.vocab import VocabularyError
    from parti_jax.eval.inspection_report import PAGE_FILE, run_inspection
    from parti_jax.train.checkpoints import CheckpointError

    with flags.usage_errors(ValueError, FileNotFoundError, CheckpointError, VocabularyError):
        record = run_inspection(
            ns.t2i, ns.vqgan, args.workdir, codes_dir=ns.codes, prompts=ns.prompt,
            num_in_distribution=ns.num_in_distribution, num_heldout=ns.num_heldout,
            num_probe_scenes=ns.num_probe_scenes, num_probe_captions=ns.num_probe_captions,
            temperature=ns.temperature, guidance_scale=ns.guidance_scale, seed=ns.seed,
        )  # fmt: skip
    for line in summary_lines(record):
        print(line)
    print(f"wrote {args.workdir}/{PAGE_FILE} and inspect.json ({record['seconds']} s)")
    return 0


def summary_lines(record: dict) -> list[str]:
    """The headline figures of an inspection, one line each."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = []
    for group, g in (record.get("groups") or {}).items():
        tok, tf = g["tokenizer"], g["teacher_forced_one_object"]
        lines.append(
            f"{group}: reconstructions accepted {pct(tok['reconstruction_accepted'])}, "
            f"object codes never a target {pct(tok.get('object_codes_never_a_target'))}; "
            f"one-object teacher-forced p(true code) at the first object cell "
            f"{pct(tf['mean_p_true_first_object_cell'])} (mass on the caption's colour "
            f"{pct(tf['first_object_cell_mass_stated_color'])}, background "
            f"{pct(tf['first_object_cell_mass_background'])})"
        )
    probes = (record.get("linear_probes") or {}).get("probes") or {}
    key = "object1_color_from_at_shape"
    if key in probes:
        p = probes[key]
        lines.append(
            f"linear probe, colour of object 1 from its shape word's state: seen pairs "
            f"{pct(p['seen_pairs'])}, held-out pairs {pct(p['heldout_pairs'])}"
        )
    return lines
