"""Side-by-side pages: blind, seeded and balanced sides; votes un-blind and round-trip."""

import json

import pytest

from parti_jax.eval import compare
from parti_jax.eval import records as R
from parti_jax.eval import side_by_side as S
from tests.eval.test_gallery import NASTY, build_eval_dir, parse_dom, parti_rows

RED, BLUE = (220, 40, 40), (40, 40, 220)


def _visible_text(node) -> str:
    if node.tag in ("script", "style", "title"):
        return ""
    return "".join(node.text_parts) + "".join(_visible_text(c) for c in node.children)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sbs")
    rows = parti_rows()[:101]
    rows[5] = dict(rows[5], Prompt=NASTY[0], Note=NASTY[1])
    build_eval_dir(root / "run_a", rows, colours=(RED,))
    build_eval_dir(root / "run_b", rows + parti_rows()[101:103], colours=(BLUE,))
    return root, rows


def test_sides_are_seeded_balanced_and_blind(two_runs):
    root, rows = two_runs
    page = S.write_side_by_side(
        root / "run_a",
        root / "run_b",
        root / "pages" / "sbs.html",
        name_a="ckpt-A",
        name_b="ckpt-B",
    )
    data = S.read_page_data(page)
    assert [p["prompt_id"] for p in data["prompts"]] == list(range(101))  # only shared ids
    lefts = [p["left"] for p in data["prompts"]]
    assert lefts.count("a") in (50, 51)
    dom = parse_dom(page.read_text(encoding="utf-8"))
    for card, p in zip(dom.find_all("article", "card"), data["prompts"]):
        left, right = card.find_all("div", "side")
        left_src = left.find_all("img")[0].attrs["src"]
        right_src = right.find_all("img")[0].attrs["src"]
        want_left = "../run_a/" if p["left"] == "a" else "../run_b/"
        assert left_src.startswith(want_left) and not right_src.startswith(want_left)
        assert (page.parent / left_src).is_file() and (page.parent / right_src).is_file()
    # Nothing visible names a system; scores are not shown.
    visible = _visible_text(dom)
    assert "ckpt-A" not in visible and "run_a" not in visible and "0.900" not in visible
    # The untrusted prompt is text, and only the page's own script and JSON exist.
    assert dom.find_all("article", "card")[5].find_all("div", "prompt")[0].text() == NASTY[0]
    assert len(dom.find_all("script")) == 2
    # Same seed: same page id and sides; another seed: other sides, other id.
    again = S.read_page_data(
        S.write_side_by_side(
            root / "run_a", root / "run_b", root / "p2.html", name_a="ckpt-A", name_b="ckpt-B"
        )
    )
    assert again["page_id"] == data["page_id"] and again["prompts"] == data["prompts"]
    other = S.read_page_data(
        S.write_side_by_side(
            root / "run_a", root / "run_b", root / "p3.html", name_a="ckpt-A", name_b="ckpt-B",
            seed=1,
        )
    )  # fmt: skip
    assert other["page_id"] != data["page_id"]
    assert [p["left"] for p in other["prompts"]] != lefts


def test_balance_over_seeds():
    recs = [R.PromptRecord(prompt_id=i, prompt=str(i)) for i in range(40)]
    fractions = []
    for seed in range(50):
        pairs = S.plan_pairs(recs, recs, seed=seed)
        n_a = sum(p.left == "a" for p in pairs)
        assert n_a == 20
        fractions.append([p.left == "a" for p in pairs])
    # Each prompt gets A on the left in roughly half the seeds (not a fixed pattern).
    per_prompt = [sum(f[i] for f in fractions) / 50 for i in range(40)]
    assert min(per_prompt) > 0.2 and max(per_prompt) < 0.8
    assert len({tuple(f) for f in fractions}) == 50
    odd = S.plan_pairs(recs[:7], recs[:7], seed=3)
    assert sum(p.left == "a" for p in odd) in (3, 4)


def test_votes_unblind_and_round_trip(two_runs, tmp_path):
    root, _ = two_runs
    page = S.write_side_by_side(root / "run_a", root / "run_b", tmp_path / "s.html", seed=7)
    data = S.read_page_data(page)
    by_id = {p["prompt_id"]: p for p in data["prompts"]}
    a_left = next(i for i, p in by_id.items() if p["left"] == "a")
    b_left = next(i for i, p in by_id.items() if p["left"] == "b")
    choices = {a_left: "left", b_left: "left", 5: "tie"}
    export = S.export_votes(data, choices, rater="r1")
    winners = {v["prompt_id"]: v["winner"] for v in export["votes"]}
    assert winners == {a_left: "a", b_left: "b", 5: "tie"}
    assert export["a"] == str(root / "run_a") and export["b"] == str(root / "run_b")
    path = tmp_path / "votes.json"
    path.write_text(json.dumps(export))
    parsed = compare.read_votes(path)
    assert parsed.page_id == data["page_id"] and parsed.rater == "r1"
    assert {v.prompt_id: v.winner for v in parsed.votes} == winners
    assert next(v for v in parsed.votes if v.prompt_id == 5).prompt == NASTY[0]


def test_bad_inputs(tmp_path, two_runs):
    root, rows = two_runs
    other = tmp_path / "other"
    changed = [dict(r, Prompt=r["Prompt"] + "!") for r in rows[:3]]
    build_eval_dir(other, changed)
    with pytest.raises(R.RecordError, match="prompt_id 0 is .* in .*run_a.* but .* in .*other"):
        S.write_side_by_side(root / "run_a", other, tmp_path / "x.html")
    with pytest.raises(ValueError, match="both named"):
        S.write_side_by_side(
            root / "run_a", root / "run_b", tmp_path / "x.html", name_a="x", name_b="x"
        )
    with pytest.raises(R.RecordError, match="share no prompt_id"):
        S.plan_pairs([R.PromptRecord(0, "a")], [R.PromptRecord(1, "b")])
