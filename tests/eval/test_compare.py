"""Vote aggregation: win rates with ties as half, Wilson intervals, groups, bad files."""

import json

import pytest

from parti_jax.eval import compare as C


def _votes(a, b, entries, *, page_id="sbs-1", rater=""):
    return {
        "format": "parti_jax.side_by_side.votes/1",
        "page_id": page_id,
        "a": a,
        "b": b,
        "rater": rater,
        "votes": [
            {"prompt_id": i, "prompt": f"p{i}", "category": cat, "challenge": chal, "winner": w}
            for i, (cat, chal, w) in enumerate(entries)
        ],
    }


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_wilson_interval_matches_textbook_values():
    lo, hi = C.wilson_interval(7, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.3968, 0.8922)
    lo, hi = C.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and round(hi, 4) == 0.2775
    lo, hi = C.wilson_interval(50, 100)
    assert round(lo, 4) == 0.4038 and round(hi, 4) == 0.5962
    with pytest.raises(ValueError):
        C.wilson_interval(0, 0)


def test_known_win_rates_overall_and_per_group(tmp_path):
    # Rater 1: Animals 6 A, 2 B, 2 ties; People 1 A, 3 B.
    r1 = [("Animals", "Basic", "a")] * 6 + [("Animals", "Basic", "b")] * 2
    r1 += [("Animals", "Complex", "tie")] * 2 + [("People", "Complex", "a")]
    r1 += [("People", "Complex", "b")] * 3
    # Rater 2 exported a page built the other way round (its "a" is our B): 2 wins for
    # its "a" = 2 wins for B; 4 for its "b" = 4 for A. All People / Basic.
    r2 = [("People", "Basic", "a")] * 2 + [("People", "Basic", "b")] * 4
    f1 = _write(tmp_path / "r1.json", _votes("A", "B", r1, rater="r1"))
    f2 = _write(tmp_path / "r2.json", _votes("B", "A", r2, page_id="sbs-2", rater="r2"))
    report = C.aggregate_votes([f1, f2])
    assert (report.a, report.b, report.raters) == ("A", "B", ("r1", "r2"))

    o = report.overall
    assert (o.n, o.a_wins, o.b_wins, o.ties) == (20, 11, 7, 2)
    assert o.win_rate_a == pytest.approx(12 / 20)
    assert (o.ci95_low, o.ci95_high) == pytest.approx(C.wilson_interval(12, 20))

    animals = report.by_category["Animals"]
    assert (animals.n, animals.win_rate_a) == (10, pytest.approx(0.7))
    assert (round(animals.ci95_low, 4), round(animals.ci95_high, 4)) == (0.3968, 0.8922)
    people = report.by_category["People"]
    assert (people.n, people.a_wins, people.b_wins) == (10, 5, 5)
    assert people.win_rate_a == pytest.approx(0.5)
    basic, complex_ = report.by_challenge["Basic"], report.by_challenge["Complex"]
    assert (basic.n, basic.a_wins, basic.b_wins, basic.win_rate_a) == (
        14,
        10,
        4,
        pytest.approx(10 / 14),
    )
    assert (complex_.n, complex_.ties, complex_.win_rate_a) == (6, 2, pytest.approx(2 / 6))
    assert list(report.by_category) == ["Animals", "People"]

    paths = C.write_compare_report(report, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["overall"]["win_rate_a"] == pytest.approx(0.6)
    assert saved["by_category"]["Animals"]["ci95_high"] == pytest.approx(0.8922, abs=1e-4)
    assert "Wilson" in saved["method"] and saved["confidence"] == 0.95
    md = paths["md"].read_text()
    assert "| category | Animals | 10 | 6 | 2 | 2 | 0.700 | [0.397, 0.892] |" in md
    assert "<td>Animals</td>" in paths["html"].read_text()


def test_names_are_escaped_in_the_html(tmp_path):
    f = _write(tmp_path / "v.json", _votes("<script>x</script>", "B", [("", "", "a")]))
    report = C.aggregate_votes([f])
    text = report.html()
    assert "<script>x</script>" not in text and "&lt;script&gt;x&lt;/script&gt;" in text
    assert "| category | (none) | 1 | 1 | 0 | 0 | 1.000 |" in report.markdown()


def test_bad_vote_files_are_named(tmp_path):
    good = _write(tmp_path / "good.json", _votes("A", "B", [("c", "d", "a")]))
    other = _write(tmp_path / "other.json", _votes("A", "C", [("c", "d", "a")]))
    with pytest.raises(C.VotesError, match=r"other.json: compares 'A' with 'C'"):
        C.aggregate_votes([good, other])
    bad = _votes("A", "B", [("c", "d", "left")])
    with pytest.raises(C.VotesError, match=r"bad.json: votes\[0\]: field 'winner' is 'left'"):
        C.aggregate_votes([_write(tmp_path / "bad.json", bad)])
    dup = _votes("A", "B", [("c", "d", "a")])
    dup["votes"].append(dict(dup["votes"][0]))
    with pytest.raises(C.VotesError, match=r"votes\[1\]: prompt_id 0 voted twice"):
        C.aggregate_votes([_write(tmp_path / "dup.json", dup)])
    with pytest.raises(C.VotesError, match="given twice"):
        C.aggregate_votes([good, good])
    with pytest.raises(C.VotesError, match="no votes recorded"):
        C.aggregate_votes([_write(tmp_path / "empty.json", _votes("A", "B", []))])
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(C.VotesError, match="junk.json: not valid JSON"):
        C.aggregate_votes([tmp_path / "junk.json"])
    with pytest.raises(C.VotesError, match="field 'b' must be a non-empty string"):
        C.aggregate_votes([{"page_id": "p", "a": "A", "votes": []}])
    with pytest.raises(C.VotesError, match="no vote files"):
        C.aggregate_votes([])


def test_main_compare_prints_and_writes(tmp_path, capsys):
    f = _write(tmp_path / "v.json", _votes("A", "B", [("c", "d", "a"), ("c", "d", "tie")]))
    assert C.main_compare([str(f), "--out_dir", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| overall | all | 2 | 1 | 0 | 1 | 0.750 |" in out
    assert (tmp_path / "report" / "compare.json").is_file()
