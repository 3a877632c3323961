"""`parti-jax inspect`'s instruments (parti_jax/eval/inspection.py) and its page.

Unit tests pin each instrument's arithmetic on hand-made inputs; the end-to-end
tests run the command on the tiny trained pipeline and read the JSON and the
page back (the page in headless Chromium: buttons switch the cross-attention
layer, every image decodes, a hostile prompt renders as text).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from parti_jax.data import shapes
from parti_jax.data.vocab import SentencePieceTokenizer, default_vocab_path
from parti_jax.eval import inspection as I
from tests.eval.test_browser import _no_alert, driver  # noqa: F401 - the browser fixture

pytest_plugins = ["tests.pipeline_fixtures"]


@pytest.fixture(scope="module")
def vocab():
    return SentencePieceTokenizer(default_vocab_path())


def test_caption_words_follow_the_caption(vocab):
    for i in range(40):
        caption = shapes.generate_scene(i, "train")[1]
        ids = vocab.encode(caption, max_length=32) + [0, 0]
        words, owner = I.caption_words(vocab, ids)
        assert words[:-1] == caption.split(), caption
        assert words[-1] == "</s>"
        assert len(owner) == len(ids) and owner[-2:] == [-1, -1]
        assert sorted(set(owner) - {-1}) == list(range(len(words)))


def test_word_attention_sums_a_words_pieces():
    attention = np.zeros((2, 3, 4, 5), np.float32)  # [L, heads, N, Lt]
    attention[:, :, :, 1] = 0.25
    attention[:, :, :, 2] = 0.75
    out = I.word_attention(attention, [0, 1, 1, 2, -1], 3)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out[:, 1], 1.0)  # tokens 1 and 2 make word 1
    np.testing.assert_allclose(out[:, 0], 0.0)


def test_position_stats():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    stats = I.position_stats(np.log(p), np.array([1, 2]), top=2)
    assert stats["p_chosen"] == [0.2, 0.8]
    assert stats["top_codes"] == [[0, 1], [2, 0]] or stats["top_codes"] == [[0, 1], [2, 1]]
    assert math.isclose(stats["entropy"][0], -(p[0] * np.log(p[0])).sum(), rel_tol=1e-3)


def test_object_cells_and_caption_objects():
    spec, caption = shapes.generate_scene(3, "train")
    image = shapes.render(spec, 32).astype(np.float32) / 255
    cells = I.object_cells(image, (8, 8))
    assert cells.shape == (64,) and 0 < cells.sum() < 64
    assert I.caption_objects("a big red circle to the left of a blue square") == [
        ("red", "circle", 2, 3), ("blue", "square", 9, 10)
    ]  # fmt: skip
    # Shape before colour ("a {size} {shape} in {colour}") pairs them all the same.
    assert I.caption_objects("a small cross in green at the top") == [("green", "cross", 4, 2)]


def test_linear_probe_reads_a_planted_feature():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 8))
    x[:, 5] += 4.0 * labels  # the class is linear in feature 5
    predict = I._probe_fit(x[:200], labels[:200], 3)
    assert (predict(x[200:]) == labels[200:]).mean() > 0.9


@pytest.fixture(scope="module")
def inspected(tiny_pipeline, tmp_path_factory):
    from parti_jax.cli.main import main

    out = tmp_path_factory.mktemp("inspect")
    argv = [
        "inspect", f"--t2i={tiny_pipeline['t2i']}", f"--vqgan={tiny_pipeline['vqgan']}",
        f"--codes={tiny_pipeline['codes']}", f"--workdir={out}", "--num_in_distribution=2",
        "--num_heldout=2", "--num_probe_scenes=6", "--num_probe_captions=60",
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_inspect_writes_the_figures(inspected):
    record = json.loads((inspected / "inspect.json").read_text())
    assert [s["group"] for s in record["scenes"]] == ["in_distribution"] * 2 + ["heldout"] * 2
    for scene in record["scenes"]:
        att = np.asarray(scene["attention_per_layer"])
        assert att.shape == (1, len(scene["words"]), 16)  # 1 decoder layer, 4x4 grid
        # Every text token belongs to a word, so each cell's weights over words sum to 1.
        np.testing.assert_allclose(np.asarray(scene["attention_mean"]).sum(0), 1.0, atol=2e-3)
        assert len(scene["positions"]["p_chosen"]) == 16
        assert scene["probe"]["first_object_cell"] is not None
    for group in ("in_distribution", "heldout"):
        tok = record["groups"][group]["tokenizer"]
        assert tok["scenes"] == 6 and 0.0 <= tok["object_codes_never_a_target"] <= 1.0
    assert record["groups"]["in_distribution"]["tokenizer"]["distinct_training_codes"] > 0
    probe = record["linear_probes"]["probes"]["object1_color_from_at_color"]
    assert probe["train"] > 0 and probe["seen_pairs_n"] > 0


def test_inspect_refuses_bad_counts(tmp_path, capsys):
    from parti_jax.cli.main import main

    code = main(["inspect", "--t2i=x", "--vqgan=y", f"--workdir={tmp_path}",
                 "--num_probe_scenes=-1"])  # fmt: skip
    assert code == 2
    assert "--num_probe_scenes=-1 must be >= 0" in capsys.readouterr().err


HOSTILE = '<img src=x onerror="alert(1)">a red circle'


@pytest.mark.browser
def test_inspect_page_in_a_browser(driver, tiny_pipeline, tmp_path):  # noqa: F811
    from parti_jax.cli.main import main

    argv = [
        "inspect", f"--t2i={tiny_pipeline['t2i']}", f"--vqgan={tiny_pipeline['vqgan']}",
        f"--workdir={tmp_path}", "--prompt", HOSTILE, "--prompt", "a blue square",
        "--num_probe_scenes=0", "--num_probe_captions=0",
    ]  # fmt: skip
    assert main(argv) == 0
    driver.get((tmp_path / "index.html").as_uri())
    _no_alert(driver)
    titles = driver.execute_script(
        "return Array.from(document.querySelectorAll('section.scene h3')).map(h => h.textContent)"
    )
    assert titles[0].startswith(HOSTILE) and len(titles) == 2
    assert driver.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
    )
    assert broken == 0

    def visible_maps() -> set[str]:
        return set(driver.execute_script(
            "return Array.from(document.querySelectorAll('.maps figure'))"
            ".filter(f => f.offsetParent !== null).map(f => f.className)"
        ))  # fmt: skip

    assert visible_maps() == {"layer-mean"}
    driver.find_element("css selector", 'button[data-layer="0"]').click()
    assert visible_maps() == {"layer-0"}
    driver.find_element("css selector", 'button[data-layer="mean"]').click()
    assert visible_maps() == {"layer-mean"}
