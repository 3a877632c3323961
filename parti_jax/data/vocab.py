"""Text vocabulary: SentencePiece models trained by parti_jax, a tokenizer that needs only
`sentencepiece` (sampling and export hosts have no TensorFlow), and caption sources.

Ids follow the T5 convention (docs/DESIGN.md, section 3): pad 0, eos 1, unk 2,
no BOS; a text longer than `max_length` is truncated (keeping the EOS) and the
truncation is reported. The unconditional prompt of classifier-free guidance
is `[EOS]`, never all padding. `get_seqio_vocabulary` wraps the same model file
for the SeqIO pipeline (importing seqio only when called). The shapes world's
vocabulary ships in `assets/shapes_sp.model`; `make_shapes_vocab()` rebuilds it
byte for byte.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# The shipped shapes vocabulary: BPE (unigram keeps only ~74 pieces on this
# small, repetitive corpus and splits colour words into letters; BPE at 256
# makes every word of every template one token), case-folded so that
# "A Red Circle" tokenizes like "a red circle".
SHAPES_VOCAB_SIZE = 256
SHAPES_VOCAB_MODEL_TYPE = "bpe"
SHAPES_VOCAB_NORMALIZATION = "nmt_nfkc_cf"
SHAPES_VOCAB_EXAMPLES_PER_SPLIT = 2000
# The caption field of a .jsonl row (first found), here and in a folder's captions.jsonl.
CAPTION_KEYS = ("caption", "text")

_log = logging.getLogger(__name__)


class VocabularyError(ValueError):
    """Bad vocabulary input: an empty text source, an impossible size, a wrong model file."""


def _clean_lines(
    texts: Iterable[str], counter: list[int], failed: list[VocabularyError]
) -> Iterator[str]:
    try:
        for t in texts:
            if not isinstance(t, str):
                t = t.decode("utf-8") if isinstance(t, bytes) else str(t)
            t = " ".join(t.split())  # one line per text; sentencepiece reads lines
            if t:
                counter[0] += 1
                yield t
    except VocabularyError as e:  # a bad caption line: reraised as it is once training ends
        failed.append(e)


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    normalization_rule_name: str = "nmt_nfkc",
    max_sentences: int = 0,
    num_threads: int = 1,
    seed: int = 0,
) -> str:
    """Trains a SentencePiece model with T5 ids (pad 0, eos 1, unk 2, no BOS).

    Args:
      texts: captions, one text each (empty ones are skipped).
      output_prefix: writes `<prefix>.model` and `<prefix>.vocab` (piece, score).
      vocab_size: number of pieces, including the three special ones.
      model_type: 'unigram' (T5's choice), 'bpe', 'word' or 'char'.
      character_coverage: share of characters covered (1.0 for small alphabets,
        0.9995 for large multilingual corpora).
      normalization_rule_name: 'nmt_nfkc' or 'nmt_nfkc_cf' (case-folding), ...
      max_sentences: sample at most this many texts (0: all).
      num_threads: training threads; 1 makes training deterministic.
      seed: sentencepiece's random seed (used when sampling sentences).

    Returns:
      The path of the `.model` file. The same texts and arguments give the same bytes.
    """
    if vocab_size < 4:
        raise VocabularyError(
            f"vocab_size={vocab_size}: must be at least 4 (pad, eos, unk + one piece)"
        )
    prefix = Path(output_prefix)
    if prefix.suffix == ".model":  # a model path given as the prefix
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    count = [0]
    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        normalization_rule_name=normalization_rule_name,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
    )
    buffer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    failed: list[VocabularyError] = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_clean_lines(texts, count, failed), model_writer=buffer, **options
        )
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        msg = str(e)
        if count[0] == 0:
            raise VocabularyError(
                "no text to train the vocabulary on: the caption source is empty "
                "(it gave no non-blank text)"
            ) from None
        m = re.search(r"value <= (\d+)", msg)
        if m:
            raise VocabularyError(
                f"vocab_size={vocab_size} is more than {count[0]} texts support: sentencepiece "
                f"can build at most {m.group(1)} {model_type} pieces from them; pass "
                f"vocab_size <= {m.group(1)}, another model_type (bpe reaches whole words), "
                "or more text"
            ) from None
        raise VocabularyError(f"sentencepiece training failed on {count[0]} texts: {msg}") from None
    if failed:
        raise failed[0]
    model_path = prefix.with_name(prefix.name + ".model")
    model_path.write_bytes(buffer.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size())]
    prefix.with_name(prefix.name + ".vocab").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(model_path)


class SentencePieceTokenizer:
    """Text -> token ids with a SentencePiece model; no TensorFlow.

    `num_truncated` counts the texts cut to `max_length` since construction.
    """

    def __init__(
        self, model_path: str | os.PathLike | None = None, *, model_bytes: bytes | None = None
    ):
        if (model_path is None) == (model_bytes is None):
            raise ValueError("pass exactly one of model_path or model_bytes")
        self.model_path = str(model_path) if model_path is not None else None
        if model_bytes is None:
            try:
                model_bytes = Path(model_path).read_bytes()
            except OSError as e:
                raise VocabularyError(
                    f"{model_path}: cannot read the SentencePiece model ({e.strerror or e}); "
                    "train one with `parti-jax train-vocab`"
                ) from None
        self.model_bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_bytes)
        except RuntimeError as e:
            raise VocabularyError(
                f"{self.model_path or '<bytes>'}: not a SentencePiece model ({e}); "
                "train one with `parti-jax train-vocab`"
            ) from None
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            raise VocabularyError(
                f"{self.model_path or '<bytes>'}: pad/eos/unk ids are {ids}, parti_jax needs "
                f"({PAD_ID}, {EOS_ID}, {UNK_ID}) (the T5 convention); retrain it with "
                "`parti-jax train-vocab`"
            )
        self.num_truncated = 0

    # Pickled as the model bytes (e.g. into tf.data / multiprocessing workers).
    def __getstate__(self):
        return {"model_path": self.model_path, "model_bytes": self.model_bytes}

    def __setstate__(self, state):
        self.__init__(model_bytes=state["model_bytes"])
        self.model_path = state["model_path"]

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the model file: records which vocabulary a checkpoint used."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def encode_with_info(
        self, text: str, max_length: int | None = 128, add_eos: bool = True
    ) -> tuple[list[int], bool]:
        """(ids, truncated): ids end with EOS when add_eos, at most max_length of them."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = list(self._sp.encode(text))
        limit = None if max_length is None else max_length - (1 if add_eos else 0)
        if limit is not None and limit < 0:
            raise ValueError(f"max_length={max_length}: must be >= 1 when add_eos")
        truncated = limit is not None and len(ids) > limit
        return ids[:limit] + ([EOS_ID] if add_eos else []), truncated

    def encode(self, text: str, max_length: int | None = 128, add_eos: bool = True) -> list[int]:
        """Token ids of one text, EOS last; a truncation is counted and logged."""
        ids, truncated = self.encode_with_info(text, max_length, add_eos)
        self._count_truncated([text] if truncated else [], 1, max_length)
        return ids

    def encode_batch(
        self, texts: Sequence[str], max_length: int = 128, add_eos: bool = True
    ) -> tuple[np.ndarray, list[int]]:
        """int32 [B, max_length] zero-padded ids, and the indices of the texts that were truncated."""
        out = np.full((len(texts), max_length), PAD_ID, np.int32)
        truncated = []
        for i, t in enumerate(texts):
            ids, cut = self.encode_with_info(t, max_length, add_eos)
            if cut:
                truncated.append(i)
            out[i, : len(ids)] = ids
        self._count_truncated([texts[i] for i in truncated], len(texts), max_length)
        return out, truncated

    def _count_truncated(self, cut: list[str], total: int, max_length: int | None) -> None:
        if cut:
            self.num_truncated += len(cut)
            _log.warning(
                "%d of %d text(s) truncated to %d tokens (%d so far), e.g. %r",
                len(cut),
                total,
                max_length,
                self.num_truncated,
                cut[0][:80],
            )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, stopping at the first EOS; padding is skipped."""
        ids = np.asarray(list(ids), np.int64).reshape(-1).tolist()
        ids = ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids
        return self._sp.decode([i for i in ids if i != PAD_ID])

    def empty_prompt(self, max_length: int = 128) -> np.ndarray:
        """The unconditional prompt for guidance: int32 [max_length] = [EOS, 0, 0, ...]."""
        out = np.zeros((max_length,), np.int32)
        out[0] = EOS_ID
        return out


def get_seqio_vocabulary(model_path: str | os.PathLike, extra_ids: int = 0):
    """The same model as a `seqio.SentencePieceVocabulary` (imports seqio, hence TensorFlow)."""
    import seqio  # noqa: PLC0415 - only the input pipeline needs it

    if not Path(model_path).is_file() and not str(model_path).startswith("gs://"):
        raise VocabularyError(
            f"{model_path}: no such SentencePiece model; train one with `parti-jax train-vocab`"
        )
    return seqio.SentencePieceVocabulary(str(model_path), extra_ids=extra_ids)


def task_texts(task: str, split: str, feature: str = "text") -> Iterator[str]:
    """The `feature` strings of a registered seqio task's split, in order (imports TensorFlow).

    An unknown task or a missing feature is a VocabularyError.
    """
    import seqio  # noqa: PLC0415 - only this caption source needs TensorFlow

    try:
        t = seqio.get_mixture_or_task(task)
    except ValueError as e:
        raise VocabularyError(str(e)) from None
    ds = t.get_dataset(split=split, shuffle=False, sequence_length=None)
    for ex in ds.as_numpy_iterator():
        if feature not in ex:
            raise VocabularyError(f"no feature {feature!r} (has {sorted(ex)})")
        value = ex[feature]
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def default_vocab_path() -> str:
    """Path of the shipped shapes-world vocabulary (`parti_jax/data/assets/shapes_sp.model`)."""
    return str(importlib.resources.files("parti_jax.data") / "assets" / "shapes_sp.model")


def text_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode, or None when it is fine: a lone surrogate (e.g. from
    the JSON escape "\\ud800") cannot become UTF-8, and a surrogate-escaped byte is a
    command-line argument that was not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char, code = text[e.start], ord(text[e.start])
        byte = f": byte 0x{code - 0xDC00:02x} that is not UTF-8" if code >= 0xDC80 else ""
        return f"not valid Unicode (lone surrogate {char!r} at character {e.start}{byte})"
    return None


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) or (line number, None, problem) per line of a UTF-8 text
    file: the newline is removed, a byte-order mark at the start dropped, and a line that
    is not valid UTF-8 is reported instead of read."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield line, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield line, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"


def read_captions(path: str | os.PathLike, *, skipped: list[str] | None = None) -> Iterator[str]:
    """Captions of a .txt (one a line), .jsonl (field "caption" or "text" per line, e.g. a
    folder's captions.jsonl) or .tsv file (the column named caption / text / prompt, else
    the first). A bad line (not UTF-8, invalid Unicode, bad JSON) is a VocabularyError
    naming the file and line, or, when a `skipped` list is given, appended to it and
    skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise VocabularyError(f"{path}: no such file")
    for line, text, problem in _caption_rows(file):
        if problem is None and (problem := text_problem(text)) is None:
            yield text
            continue
        message = f"{path}:{line}: {problem}"
        if skipped is None:
            raise VocabularyError(f"{message} (fix the line, or pass --skip_bad_examples)")
        skipped.append(message)


def _caption_rows(file: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """`text_lines` of a captions file, each reduced to its caption (see read_captions)."""
    kind = file.suffix.lower()
    column = 0
    for line, text, problem in text_lines(file):
        if problem is not None:
            yield line, None, problem
        elif kind == ".jsonl":
            if text.strip():
                yield (line, *_jsonl_caption(text))
        elif kind == ".tsv":
            fields = text.split("\t")
            names = [f.strip().lower() for f in fields]
            named = [names.index(k) for k in ("caption", "text", "prompt") if k in names]
            if line == 1 and named:  # a header row names the column
                column = named[0]
            elif len(fields) > column:
                yield line, fields[column], None
        else:
            yield line, text, None


def _jsonl_caption(text: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, problem) of one JSON line."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    keys = [k for k in CAPTION_KEYS if k in record] if isinstance(record, dict) else []
    caption = record[keys[0]] if keys else None
    if not isinstance(caption, str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        return None, f'needs a string field "caption" or "text" (found keys {found})'
    return caption, None


def shapes_captions(
    examples_per_split: int = SHAPES_VOCAB_EXAMPLES_PER_SPLIT,
    seed: int = 0,
    splits: Sequence[str] | None = None,
) -> Iterator[str]:
    """Captions of examples 0..n-1 of each shapes split (default all: the shipped
    vocabulary's corpus)."""
    from parti_jax.data import shapes

    for split in splits or shapes.SPLITS:
        for i in range(examples_per_split):
            yield shapes.generate_scene(i, split, seed)[1]


def make_shapes_vocab(
    output_prefix: str | os.PathLike | None = None,
    *,
    examples_per_split: int = SHAPES_VOCAB_EXAMPLES_PER_SPLIT,
    vocab_size: int = SHAPES_VOCAB_SIZE,
) -> str:
    """(Re)builds the shipped shapes vocabulary; with the defaults the bytes are identical.

    `output_prefix` defaults to the shipped asset itself:
    `python -c "from parti_jax.data.vocab import make_shapes_vocab; make_shapes_vocab()"`.
    """
    if output_prefix is None:
        output_prefix = default_vocab_path()[: -len(".model")]
    return train_sentencepiece(
        shapes_captions(examples_per_split),
        output_prefix,
        vocab_size,
        model_type=SHAPES_VOCAB_MODEL_TYPE,
        normalization_rule_name=SHAPES_VOCAB_NORMALIZATION,
    )
