"""The eval output folder format: validation, append-only manifest, resume after a crash."""

import json

import pytest

from parti_jax.eval import records as R


def _record(pid: int, images=("images/a.png",), **kw) -> R.PromptRecord:
    fields = dict(
        prompt=f"prompt {pid}",
        category="Animals",
        challenge="Basic",
        note="",
        images=images,
        scores=[0.5] * len(images),
        seed=0,
    )
    fields.update(kw)
    return R.PromptRecord(prompt_id=pid, **fields)


@pytest.fixture
def eval_dir(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    return tmp_path


def test_round_trip_and_resume(eval_dir):
    with R.ManifestWriter(eval_dir) as w:
        assert w.done_ids == set()
        w.append(_record(3, extra={"judge": {"ok": True}}))
        w.append(_record(1, prompt='a "quoted" <b>prompt</b>\nwith a newline \u2028 \u2029'))
    with R.ManifestWriter(eval_dir) as w:
        assert w.done_ids == {1, 3}
        with pytest.raises(R.RecordError, match="prompt_id 3 is already in the manifest"):
            w.append(_record(3))
        w.append(_record(7, images=()))
    got = R.read_manifest(eval_dir, check_images=True)
    assert [r.prompt_id for r in got] == [3, 1, 7]
    assert got[1].prompt == 'a "quoted" <b>prompt</b>\nwith a newline \u2028 \u2029'
    assert got[0].extra == {"judge": {"ok": True}}
    assert got[2].images == () and got[2].scores == ()
    # One JSON object per line, exactly three lines.
    assert len((eval_dir / R.MANIFEST).read_text().splitlines()) == 3


def test_torn_last_line_is_dropped_on_resume(eval_dir):
    R.write_manifest(eval_dir, [_record(0), _record(1)])
    path = eval_dir / R.MANIFEST
    with open(path, "a") as f:
        f.write('{"prompt_id": 2, "prompt": "cut sh')  # a crash mid-write
    with pytest.raises(R.RecordError, match=r"manifest.jsonl:3: not valid JSON"):
        R.read_manifest(eval_dir)
    assert [r.prompt_id for r in R.read_manifest(eval_dir, allow_torn_tail=True)] == [0, 1]
    with R.ManifestWriter(eval_dir) as w:
        assert w.done_ids == {0, 1}
        w.append(_record(2))
    assert [r.prompt_id for r in R.read_manifest(eval_dir)] == [0, 1, 2]


def test_complete_last_line_without_newline_is_kept(eval_dir):
    R.write_manifest(eval_dir, [_record(0)])
    path = eval_dir / R.MANIFEST
    path.write_text(path.read_text().rstrip("\n"))
    with R.ManifestWriter(eval_dir) as w:
        assert w.done_ids == {0}
        w.append(_record(1))
    assert [r.prompt_id for r in R.read_manifest(eval_dir)] == [0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt_id": -1}, "field 'prompt_id' must be an int >= 0"),
        ({"prompt_id": True}, "field 'prompt_id' must be an int"),
        ({"prompt": 5}, "field 'prompt' must be a string"),
        ({"images": "images/a.png"}, "field 'images' must be a list"),
        ({"images": ["../secret.png"]}, "must not contain"),
        ({"images": ["/etc/passwd"]}, "must be relative"),
        ({"scores": [0.1, 0.2]}, "'scores' has 2 entries but 'images' has 1"),
        ({"scores": [float("nan")]}, "finite numbers"),
        ({"seed": "0"}, "field 'seed' must be an int"),
        ({"colour": "red"}, "unknown field\\(s\\) colour"),
    ],
)
def test_bad_lines_name_file_line_and_field(eval_dir, change, message):
    good = _record(0).to_json()
    bad = {**good, "prompt_id": 1, **change}
    (eval_dir / R.MANIFEST).write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(R.RecordError, match=message) as err:
        R.read_manifest(eval_dir)
    assert f"{eval_dir / R.MANIFEST}:2" in str(err.value)


def test_missing_fields_duplicates_and_missing_images(eval_dir):
    path = eval_dir / R.MANIFEST
    path.write_text(json.dumps({"prompt_id": 0, "prompt": "x"}) + "\n")
    with pytest.raises(R.RecordError, match=r":1: missing field\(s\) category, challenge"):
        R.read_manifest(eval_dir)
    line = json.dumps(_record(4).to_json())
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(R.RecordError, match=r":2: prompt_id 4 already written on line 1"):
        R.read_manifest(eval_dir)
    path.write_text(json.dumps(_record(4, images=["images/gone.png"]).to_json()) + "\n")
    with pytest.raises(R.RecordError, match=r":1: image 'images/gone.png' of prompt_id 4"):
        R.read_manifest(eval_dir, check_images=True)
    with R.ManifestWriter(eval_dir) as w, pytest.raises(R.RecordError, match="write the image"):
        w.append(_record(5, images=["images/gone.png"]))
    with pytest.raises(R.RecordError, match="no manifest"):
        R.read_manifest(eval_dir / "images")


def test_metrics_are_written_atomically_and_merged(eval_dir):
    assert R.read_metrics(eval_dir) == {}
    R.write_metrics(eval_dir, {"fid": 7.5, "fid_status": "unvalidated"})
    merged = R.update_metrics(eval_dir, {"clip_score": 0.3})
    assert merged == {"fid": 7.5, "fid_status": "unvalidated", "clip_score": 0.3}
    assert R.read_metrics(eval_dir) == merged
    assert not list(eval_dir.glob("*.tmp"))
    with pytest.raises(R.RecordError, match="not plain JSON"):
        R.write_metrics(eval_dir, {"fid": float("nan")})
    (eval_dir / R.METRICS).write_text("[1, 2]")
    with pytest.raises(R.RecordError, match="metrics.json: expected a JSON object"):
        R.read_metrics(eval_dir)
