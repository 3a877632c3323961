"""SentencePiece vocabulary: T5 ids, truncation, the shipped shapes model, seqio parity, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from parti_jax.cli import main as cli_main
from parti_jax.data import shapes, vocab

ODD_TEXTS = [
    "",
    " ",
    "Hello, World!",
    "naïve café — “quotes” and ‘apostrophes’ … 100% (maybe?)",
    "日本語のテキスト 🙂 emoji",
    "tabs\tand\nnewlines   and  spaces",
    "A Red Circle In The Top Left.",
]


def _shapes_captions(per_split: int) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for split in shapes.SPLITS:
        for i in range(per_split):
            spec, caption = shapes.generate_scene(i, split)
            out.append(caption)
            out += [c for c, _ in shapes.near_miss_captions(spec, rng)]
    return out


@pytest.fixture(scope="module")
def tok():
    return vocab.SentencePieceTokenizer(vocab.default_vocab_path())


@pytest.fixture(scope="module")
def fresh_shapes_model(tmp_path_factory):
    return vocab.make_shapes_vocab(tmp_path_factory.mktemp("vocab") / "shapes_sp")


def test_shipped_vocab_ids_and_coverage(tok):
    assert Path(vocab.default_vocab_path()).is_file()
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert tok.vocab_size == vocab.SHAPES_VOCAB_SIZE
    # Every word any template can produce is one piece (punctuation: at most two).
    for word in shapes.all_caption_words():
        ids = tok.encode(word, add_eos=False)
        assert vocab.UNK_ID not in ids and len(ids) <= (2 if word in ",:" else 1), word
    for caption in _shapes_captions(150):
        ids = tok.encode(caption)
        assert vocab.UNK_ID not in ids, caption
        assert ids[-1] == vocab.EOS_ID and len(ids) < 32
        assert tok.decode(ids) == caption
    # Case-folded: capitals are not unknown.
    assert tok.encode("A RED Circle") == tok.encode("a red circle")


def test_shipped_vocab_is_what_make_shapes_vocab_builds(tok, fresh_shapes_model):
    fresh = vocab.SentencePieceTokenizer(fresh_shapes_model)
    assert fresh.fingerprint == tok.fingerprint  # byte-identical
    assert Path(fresh_shapes_model).read_bytes() == tok.model_bytes
    for text in _shapes_captions(20) + ODD_TEXTS:
        assert fresh.encode(text) == tok.encode(text)


def test_training_is_deterministic_and_writes_model_and_vocab(tmp_path):
    texts = _shapes_captions(40) + ODD_TEXTS
    a = vocab.train_sentencepiece(texts, tmp_path / "a" / "sp", 80)
    b = vocab.train_sentencepiece(iter(texts), tmp_path / "b" / "sp", 80)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    lines = (tmp_path / "a" / "sp.vocab").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 80 and lines[1].startswith("</s>\t")
    t = vocab.SentencePieceTokenizer(a)
    assert (t.vocab_size, t.pad_id, t.eos_id, t.unk_id) == (80, 0, 1, 2)
    assert (
        t.id_to_piece(0) == "<pad>" and t.id_to_piece(1) == "</s>" and t.id_to_piece(2) == "<unk>"
    )


def test_training_errors_are_restated(tmp_path):
    with pytest.raises(vocab.VocabularyError, match="caption source is empty"):
        vocab.train_sentencepiece(["", "   "], tmp_path / "e", 32)
    with pytest.raises(
        vocab.VocabularyError, match=r"vocab_size=5000 is more than 3 texts support.*at most \d+"
    ):
        vocab.train_sentencepiece(
            ["a red circle", "a blue square", "top left"], tmp_path / "s", 5000
        )


def test_tokenizer_rejects_foreign_or_missing_models(tmp_path):
    with pytest.raises(vocab.VocabularyError, match="cannot read the SentencePiece model"):
        vocab.SentencePieceTokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(vocab.VocabularyError, match="not a SentencePiece model"):
        vocab.SentencePieceTokenizer(tmp_path / "junk.model")
    # sentencepiece's own defaults (unk 0, bos 1, eos 2) are not T5 ids.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_shapes_captions(20)),
        model_prefix=str(tmp_path / "default"),
        vocab_size=40,
        minloglevel=2,
    )
    with pytest.raises(vocab.VocabularyError, match=r"pad/eos/unk ids are \(-1, 2, 0\)"):
        vocab.SentencePieceTokenizer(tmp_path / "default.model")


def test_truncation_padding_and_empty_prompt(tok, caplog):
    long_text = " ".join(["a small red circle in the top left"] * 10)
    before = tok.num_truncated
    ids = tok.encode(long_text, max_length=8)
    assert len(ids) == 8 and ids[-1] == vocab.EOS_ID
    assert ids[:7] == tok.encode(long_text, max_length=None)[:7]
    assert tok.num_truncated == before + 1
    assert "truncated to 8 tokens" in caplog.text
    assert len(tok.encode(long_text, max_length=8, add_eos=False)) == 8  # counted too
    batch, cut = tok.encode_batch(["a red circle", long_text, ""], max_length=12)
    assert batch.dtype == np.int32 and batch.shape == (3, 12)
    assert cut == [1] and tok.num_truncated == before + 3
    short = tok.encode("a red circle")
    np.testing.assert_array_equal(batch[0, : len(short)], short)
    assert (batch[0, len(short) :] == 0).all()
    np.testing.assert_array_equal(batch[2], [vocab.EOS_ID] + [0] * 11)  # "" -> [EOS]
    np.testing.assert_array_equal(tok.empty_prompt(5), [1, 0, 0, 0, 0])
    assert tok.decode(batch[0]) == "a red circle"  # stops at EOS, skips padding


def test_seqio_vocabulary_gives_identical_ids(tok):
    tf = pytest.importorskip("tensorflow")
    sv = vocab.get_seqio_vocabulary(vocab.default_vocab_path())
    assert (sv.vocab_size, sv.eos_id, sv.unk_id, sv.pad_id) == (tok.vocab_size, 1, 2, 0)
    texts = _shapes_captions(10) + ODD_TEXTS
    tf_ids = sv.encode_tf(tf.constant(texts))
    for text, from_tf in zip(texts, tf_ids.to_list()):
        ours = tok.encode(text, max_length=None, add_eos=False)
        assert sv.encode(text) == ours, text
        assert from_tf == ours, text
        assert sv.decode(ours) == tok.decode(ours)
    with pytest.raises(vocab.VocabularyError, match="no such SentencePiece model"):
        vocab.get_seqio_vocabulary("/nonexistent/sp.model")


def test_cli_train_vocab_from_files_and_shapes(tmp_path, capsys):
    captions = _shapes_captions(30)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"file": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(captions)
        )
    )
    tsv = tmp_path / "prompts.tsv"
    tsv.write_text("Prompt\tCategory\n" + "".join(f"{c}\tshapes\n" for c in captions))
    txt = tmp_path / "captions.txt"
    txt.write_text("\n".join(captions) + "\n")
    for i, source in enumerate(
        [f"--input={jsonl}", f"--input={tsv}", f"--input={txt}", "--shapes_examples=300"]
    ):
        prefix = tmp_path / f"out{i}" / "sp"
        code = cli_main.main(
            ["train-vocab", source, f"--output_prefix={prefix}"]
            + (["--model_type=bpe", "--vocab_size=100"] if i == 3 else ["--vocab_size=60"])
        )
        assert code == 0, capsys.readouterr().err
        t = vocab.SentencePieceTokenizer(f"{prefix}.model")
        assert t.vocab_size == (100 if i == 3 else 60)
        assert vocab.UNK_ID not in t.encode(captions[0])
    assert "wrote" in capsys.readouterr().out
    # The same captions through .jsonl / .tsv / .txt give the same model.
    models = [(tmp_path / f"out{i}" / "sp.model").read_bytes() for i in range(3)]
    assert models[0] == models[1] == models[2]


def test_cli_train_vocab_errors(tmp_path, capsys):
    def run(*args):
        code = cli_main.main(["train-vocab", *args])
        return code, capsys.readouterr().err

    code, err = run(f"--output_prefix={tmp_path}/x", "--vocab_size=50")
    assert code == 2 and "exactly one caption source" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, err = run(f"--input={empty}", f"--output_prefix={tmp_path}/x", "--vocab_size=50")
    assert code == 2 and "empty.txt" in err and "caption source is empty" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    code, err = run(f"--input={bad}", f"--output_prefix={tmp_path}/x", "--vocab_size=50")
    assert code == 2 and 'bad.jsonl:1: needs a string field "caption" or "text"' in err
    code, err = run(
        f"--input={tmp_path}/nope.txt", f"--output_prefix={tmp_path}/x", "--vocab_size=9"
    )
    assert code == 2 and "no such file" in err


def test_caption_files_are_checked_at_the_door(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"\xef\xbb\xbfa red circle\nbad \xff byte\na blue square\n")
    with pytest.raises(
        vocab.VocabularyError,
        match=r"c\.txt:2: not valid UTF-8 \(invalid start byte at byte 4\) "
        r"\(fix the line, or pass --skip_bad_examples\)",
    ):
        list(vocab.read_captions(txt))
    skipped = []
    assert list(vocab.read_captions(txt, skipped=skipped)) == ["a red circle", "a blue square"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{txt}:2: not valid UTF-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "fine"}\n{"caption": "x \\ud800"}\n')
    with pytest.raises(vocab.VocabularyError, match=r"c\.jsonl:2: not valid Unicode \(lone"):
        list(vocab.read_captions(jsonl))
    tsv = tmp_path / "c.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfCategory\tPrompt\nshapes\ta red circle\n")
    assert list(vocab.read_captions(tsv)) == ["a red circle"]  # the header, BOM and all


def test_cli_train_vocab_skips_bad_lines(tmp_path, capsys):
    lines = [json.dumps({"caption": c}) for c in _shapes_captions(30)]
    lines.insert(3, '{"caption": "x \\ud800"}')
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    args = ["train-vocab", f"--input={jsonl}", f"--output_prefix={tmp_path}/sp", "--vocab_size=60"]
    assert cli_main.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"parti-jax: error: {jsonl}:4: not valid Unicode") and "\n" not in err
    assert cli_main.main([*args, "--skip_bad_examples"]) == 0
    assert (
        f"skipped 1 bad line(s) (--skip_bad_examples); first: {jsonl}:4:" in capsys.readouterr().out
    )
