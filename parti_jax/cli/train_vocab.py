"""`parti-jax train-vocab`: train the SentencePiece text vocabulary (pad 0, eos 1, unk 2).

Caption sources (exactly one):
  --input=FILE           .txt (one caption per line), .jsonl (field "caption" or
                         "text" per line, e.g. a folder's captions.jsonl) or .tsv
                         (the column named caption / text / prompt, else the first)
  --shapes_examples=N    captions of the first N examples of the shapes world's
                         train split
  --task=NAME --split=S  a registered SeqIO task's text feature (needs TensorFlow)

Example:
  parti-jax train-vocab --shapes_examples=5000 --vocab_size=256 --model_type=bpe \\
      --output_prefix=/tmp/vocab/shapes_sp
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

from parti_jax.cli import flags

DESCRIPTION = "Train the SentencePiece text vocabulary from captions (T5 ids: pad 0, eos 1, unk 2)."


def _read_txt(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise flags.UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            text = record.get("caption", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise flags.UsageError(
                    f'{path}:{n}: needs a string field "caption" or "text" '
                    f"(found keys {sorted(record) if isinstance(record, dict) else type(record).__name__})"
                )
            yield text


def _read_tsv(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        column = next((names.index(k) for k in ("caption", "text", "prompt") if k in names), None)
        if column is None:  # no header: the first row is a caption too
            column = 0
            yield header[0]
        for row in rows:
            if len(row) > column:
                yield row[column]


def read_captions(path: str) -> Iterator[str]:
    """Captions from a .txt / .jsonl / .tsv file (by extension)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise flags.UsageError(f"--input={path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".tsv":
        return _read_tsv(p)
    return _read_txt(p)


def _shapes_captions(n: int, seed: int) -> Iterator[str]:
    from parti_jax.data import shapes  # noqa: PLC0415

    for i in range(n):
        yield shapes.generate_scene(i, "train", seed)[1]


def main(argv: Sequence[str]) -> int:
    from parti_jax.data import vocab  # noqa: PLC0415 - sentencepiece only when run

    parser = flags.make_parser("train-vocab", DESCRIPTION, workdir=False)
    src = parser.add_argument_group("caption source (exactly one)")
    src.add_argument("--input", help="captions file: .txt, .jsonl or .tsv")
    src.add_argument("--shapes_examples", type=int, help="use N shapes-world train captions")
    src.add_argument("--task", help="SeqIO task name (needs TensorFlow)")
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
    if ns.input is not None:
        texts = read_captions(ns.input)
        source = ns.input
    elif ns.shapes_examples is not None:
        if ns.shapes_examples <= 0:
            raise flags.UsageError(f"--shapes_examples={ns.shapes_examples}: must be positive")
        texts = _shapes_captions(ns.shapes_examples, ns.shapes_seed)
        source = f"shapes world, {ns.shapes_examples} train captions"
    else:
        texts = vocab.task_texts(ns.task, ns.split, ns.text_feature)
        source = f"task {ns.task}, split {ns.split}"
    if ns.max_examples:
        texts = islice(texts, ns.max_examples)

    try:
        options = ("model_type", "character_coverage", "max_sentences", "num_threads")
        path = vocab.train_sentencepiece(
            texts,
            ns.output_prefix,
            ns.vocab_size,
            normalization_rule_name=ns.normalization,
            **{k: getattr(ns, k) for k in options},
        )
    except vocab.VocabularyError as e:
        raise flags.UsageError(f"{source}: {e}") from None
    except OSError as e:
        raise flags.UsageError(f"--output_prefix={ns.output_prefix}: {e.strerror or e}") from None
    tok = vocab.SentencePieceTokenizer(path)
    print(
        f"wrote {path} ({tok.vocab_size} pieces, sha256 {tok.fingerprint[:16]}) from {source}",
        file=sys.stdout,
    )
    return 0
