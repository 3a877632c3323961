"""`parti-jax train-vocab`: train the SentencePiece text vocabulary (pad 0, eos 1, unk 2).

Caption sources (exactly one):
  --input=FILE           .txt (one caption per line), .jsonl (field "caption" or
                         "text" per line, e.g. a folder's captions.jsonl) or .tsv
                         (the column named caption / text / prompt, else the first);
                         a bad line (not UTF-8, invalid Unicode, bad JSON) is an
                         error naming it, or with --skip_bad_examples counted and skipped
  --shapes_examples=N    captions of the first N examples of the shapes world's
                         train split
  --task=NAME --split=S  a registered SeqIO task's text feature (needs TensorFlow)

Example:
  parti-jax train-vocab --shapes_examples=5000 --vocab_size=256 --model_type=bpe \\
      --output_prefix=/tmp/vocab/shapes_sp
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from parti_jax.cli import flags

DESCRIPTION = "Train the SentencePiece text vocabulary from captions (T5 ids: pad 0, eos 1, unk 2)."


def main(argv: Sequence[str]) -> int:
    from parti_jax.data import vocab  # noqa: PLC0415 - sentencepiece only when run

    parser = flags.make_parser("train-vocab", DESCRIPTION, workdir=False)
    src = parser.add_argument_group("caption source (exactly one)")
    src.add_argument("--input", help="captions file: .txt, .jsonl or .tsv")
    src.add_argument("--shapes_examples", type=int, help="use N shapes-world train captions")
    src.add_argument("--task", help="SeqIO task name (needs TensorFlow)")
    parser.add_argument(
        "--skip_bad_examples", action="store_true", help="skip (and count) bad lines of --input"
    )
    parser.add_argument("--split", default="train", help="split of --task")
    parser.add_argument("--text_feature", default="text", help="text feature of --task")
    parser.add_argument("--shapes_seed", type=int, default=0, help="seed of the shapes world")
    parser.add_argument("--output_prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument(
        "--model_type", default="unigram", choices=("unigram", "bpe", "word", "char")
    )
    parser.add_argument("--character_coverage", type=float, default=1.0)
    parser.add_argument(
        "--normalization", default="nmt_nfkc", help="nmt_nfkc, or nmt_nfkc_cf to case-fold"
    )
    parser.add_argument("--max_sentences", type=int, default=0, help="sample this many (0: all)")
    parser.add_argument("--num_threads", type=int, default=1, help="1 is deterministic")
    parser.add_argument(
        "--max_examples", type=int, default=0, help="read at most this many (0: all)"
    )
    args = flags.parse_args(parser, argv)
    # Nothing here is gin-configurable; parse gin only when asked (keeps this command light).
    if args.gin_files or args.gin_bindings:
        flags.setup_gin(args)
    ns = args.namespace

    chosen = [s for s in ("input", "shapes_examples", "task") if getattr(ns, s) is not None]
    if len(chosen) != 1:
        raise flags.UsageError(
            "pass exactly one caption source: --input=FILE, --shapes_examples=N or --task=NAME "
            f"(got {', '.join('--' + c for c in chosen) or 'none'})"
        )
    skipped: list[str] | None = [] if ns.skip_bad_examples else None
    try:
        if ns.input is not None:
            source = ns.input
            texts = vocab.read_captions(ns.input, skipped=skipped)
        elif ns.shapes_examples is not None:
            source = f"shapes world, {ns.shapes_examples} train captions"
            if ns.shapes_examples <= 0:
                raise flags.UsageError(f"--shapes_examples={ns.shapes_examples}: must be positive")
            texts = vocab.shapes_captions(ns.shapes_examples, ns.shapes_seed, splits=["train"])
        else:
            source = f"task {ns.task}, split {ns.split}"
            texts = vocab.task_texts(ns.task, ns.split, ns.text_feature)
        if ns.max_examples:
            texts = islice(texts, ns.max_examples)
        options = ("model_type", "character_coverage", "max_sentences", "num_threads")
        path = vocab.train_sentencepiece(
            texts,
            ns.output_prefix,
            ns.vocab_size,
            normalization_rule_name=ns.normalization,
            **{k: getattr(ns, k) for k in options},
        )
    except vocab.VocabularyError as e:  # a reader's errors name the file already
        message = str(e) if str(e).startswith(source) else f"{source}: {e}"
        raise flags.UsageError(message) from None
    except OSError as e:
        raise flags.UsageError(f"--output_prefix={ns.output_prefix}: {e.strerror or e}") from None
    tok = vocab.SentencePieceTokenizer(path)
    print(f"wrote {path} ({tok.vocab_size} pieces, sha256 {tok.fingerprint[:16]}) from {source}")
    if skipped:
        print(f"skipped {len(skipped)} bad line(s) (--skip_bad_examples); first: {skipped[0]}")
    return 0
