"""`parti-jax eval`: --compare, --side_by_side, and gin-selected suites through the CLI."""

from __future__ import annotations

import json

import pytest

import gin
from parti_jax.cli import main as cli
from parti_jax.eval import records as R
from parti_jax.eval import suites as S
from tests.eval.stand_ins import RecordingGenerator


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def _votes(a, b, winners, page_id="sbs-1"):
    return {
        "format": "parti_jax.side_by_side.votes/1",
        "page_id": page_id,
        "a": a,
        "b": b,
        "votes": [
            {
                "prompt_id": i,
                "prompt": f"p{i}",
                "category": "Animals",
                "challenge": "Basic",
                "winner": w,
            }
            for i, w in enumerate(winners)
        ],  # fmt: skip
    }


def test_compare_writes_the_report_and_bad_files_give_one_line(tmp_path, capsys):
    v1 = tmp_path / "v1.json"
    v2 = tmp_path / "v2.json"
    v1.write_text(json.dumps(_votes("A", "B", ["a", "a", "b", "tie"])))
    v2.write_text(json.dumps(_votes("B", "A", ["b", "a"], page_id="sbs-2")))
    out = tmp_path / "cmp"
    assert cli.main(["eval", "--compare", str(v1), str(v2), "--out_dir", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["overall"]["n"] == 6
    assert (out / "compare.html").exists() and (out / "compare.md").exists()
    assert "A" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_votes("A", "B", ["maybe"])))
    assert cli.main(["eval", "--compare", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.json" in err and "winner" in err
    assert cli.main(["eval", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "no such vote file" in capsys.readouterr().err


def _eval_dir(path, n=5):
    prompts = [R.PromptRecord(i, f"prompt <b>{i}</b>", "Animals", "Basic") for i in range(n)]
    S.generate_suite(RecordingGenerator(), path, prompts, S.GenerationSettings(),
                     process_index=0, process_count=1)  # fmt: skip
    return path


def test_side_by_side_writes_a_page(tmp_path, capsys):
    a, b = _eval_dir(tmp_path / "a"), _eval_dir(tmp_path / "b")
    page = tmp_path / "sbs.html"
    argv = ["eval", "--side_by_side", str(a), str(b), "--out", str(page), "--name_a", "ckpt1",
            "--name_b", "ckpt2"]  # fmt: skip
    assert cli.main(argv) == 0
    text = page.read_text()
    assert "prompt &lt;b&gt;3&lt;/b&gt;" in text and "ckpt1" not in text.split("sbs-data")[0]
    argv = ["eval", "--side_by_side", str(a), str(tmp_path / "nope"), "--out", str(page)]
    assert cli.main(argv) == 2
    assert "no manifest" in capsys.readouterr().err


def test_gin_selected_fid_suite_runs_and_says_why_it_skipped(tmp_path, capsys):
    _eval_dir(tmp_path / "work" / "generated")
    gin_file = tmp_path / "fid.gin"
    gin_file.write_text("eval.suites = ['fid']\nfid.eval_dir = 'generated'\n")
    work = tmp_path / "work"
    assert cli.main(["eval", f"--gin_file={gin_file}", f"--workdir={work}"]) == 0
    out = capsys.readouterr().out
    assert "fid: fid_status=skipped" in out and "index.html" in out
    metrics = R.read_metrics(work)
    assert metrics["fid"]["fid_status"] == "skipped"
    assert "no reference statistics" in metrics["fid"]["fid_reason"]
    assert (work / "fid" / S.REPORT).exists() and (work / "config.gin").exists()
    assert 'href="fid/report.html"' in (work / R.INDEX).read_text()


def test_usage_errors_name_the_binding(tmp_path, capsys):
    gin_file = tmp_path / "bad.gin"
    gin_file.write_text("eval.suites = ['nope']\n")
    assert cli.main(["eval", f"--gin_file={gin_file}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.suites=['nope']" in err and "parti_prompts" in err
    gin_file.write_text("eval.batch_size = 4\n")
    assert cli.main(["eval", f"--gin_file={gin_file}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert "eval.suites is not bound" in capsys.readouterr().err
    gin_file.write_text("eval.suites = ['shapes']\n")
    assert cli.main(["eval", f"--gin_file={gin_file}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert "eval.checkpoint_dir" in capsys.readouterr().err
