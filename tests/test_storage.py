"""parti_jax/storage.py on a local folder and on gs:// (the GCS emulator, tests/gcs_testing.py):
the same calls, the same results; atomic writes, appends, copies and moves, and the
staging of writers that know only local files."""

from __future__ import annotations

import json
import os

import pytest

from parti_jax import storage


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path) -> str:
    """A fresh folder: local, or a prefix of its own in the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs").url("root")


def test_paths_keep_their_scheme_and_local_ones_become_absolute(monkeypatch, tmp_path):
    assert str(storage.path("gs://bucket/run/")) == "gs://bucket/run"
    assert storage.join("gs://bucket/run", "checkpoints", "4") == "gs://bucket/run/checkpoints/4"
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("run")) == str(tmp_path / "run")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.join("~/run", "x") == str(tmp_path / "run" / "x")
    assert storage.is_url("gs://b/x") and not storage.is_url("/b/x")
    with pytest.raises(ValueError, match=r"^memory://b/x: not a local path or a URL of gs://"):
        storage.path("memory://b/x")
    assert not storage.reaches("memory://b/x") and storage.reaches("gs://b/x")


def test_files_folders_and_listings(root):
    assert not storage.exists(root) and storage.listdir(root) == []
    storage.write_text(storage.join(root, "b.txt"), "bee")
    storage.write_json(storage.join(root, "sub", "a.json"), {"a": [1, 2]})
    storage.write_bytes(storage.join(root, "sub", "c.bin"), b"\x00\x01")
    assert storage.listdir(root) == ["b.txt", "sub"]
    assert storage.isdir(storage.join(root, "sub")) and not storage.isdir(f"{root}/b.txt")
    assert storage.read_json(f"{root}/sub/a.json") == {"a": [1, 2]}
    assert storage.read_text(f"{root}/sub/a.json") == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert storage.read_bytes(f"{root}/sub/c.bin") == b"\x00\x01"
    assert storage.glob(storage.join(root, "sub"), "*.json") == [f"{root}/sub/a.json"]
    storage.write_text(f"{root}/b.txt", "new")  # replaced whole
    assert storage.read_text(f"{root}/b.txt") == "new"
    with storage.open(f"{root}/o.txt", "w") as f:
        f.write("opened")
    assert storage.read_text(f"{root}/o.txt") == "opened"
    storage.remove(f"{root}/o.txt")
    storage.remove(f"{root}/o.txt")  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.read_text(f"{root}/o.txt")
    storage.rmtree(storage.join(root, "sub"))
    assert storage.listdir(root) == ["b.txt"]
    if not storage.is_url(root):  # no temporary files of the atomic writes left behind
        assert os.listdir(root) == ["b.txt"]


def test_names_with_pattern_characters_are_names(root):
    """fsspec's rm and copy read '[' and '*' as patterns; storage never does."""
    folder = storage.join(root, "run[gs]*")
    storage.write_text(storage.join(folder, "a[1].txt"), "a")
    storage.copy(storage.join(folder, "a[1].txt"), storage.join(folder, "b*.txt"))
    assert storage.listdir(folder) == ["a[1].txt", "b*.txt"]
    storage.remove(storage.join(folder, "a[1].txt"))
    assert storage.listdir(folder) == ["b*.txt"]
    storage.rmtree(folder)
    assert not storage.exists(folder)


def test_appender_adds_lines_and_an_object_store_sees_them_at_flush(root, gcs):
    log = storage.join(root, "metrics.jsonl")
    appender = storage.Appender(log)
    appender.write('{"step": 1}\n')
    if storage.is_url(root):
        assert not storage.exists(log)  # one object, written at flush
    appender.flush()
    assert storage.read_text(log) == '{"step": 1}\n'
    appender.write('{"step": 2}\n')
    appender.close()
    again = storage.Appender(log)  # a resumed run appends to what is there
    again.write('{"step": 3}\n')
    again.close()
    assert [json.loads(x)["step"] for x in storage.read_text(log).splitlines()] == [1, 2, 3]
    with pytest.raises(ValueError, match="object stores cannot append; use storage.Appender"):
        storage.open(gcs.url("x.jsonl"), "a")


def test_copies_and_moves_between_a_local_folder_and_the_bucket(tmp_path, gcs):
    local, bucket = str(tmp_path / "local"), gcs.url("bucket")
    storage.write_text(storage.join(local, "step", "state", "a"), "A")
    storage.write_bytes(storage.join(local, "step", "b"), b"B" * 100_000)
    storage.copytree(storage.join(local, "step"), storage.join(bucket, "step"))  # uploads
    assert gcs.objects("bucket") == ["step/b", "step/state/a"]
    storage.copytree(storage.join(bucket, "step"), storage.join(bucket, "copy"))  # in the store
    storage.copytree(storage.join(bucket, "copy"), storage.join(local, "back"))  # downloads
    assert storage.read_bytes(storage.join(local, "back", "b")) == b"B" * 100_000
    assert storage.read_text(storage.join(local, "back", "state", "a")) == "A"

    # A move on an object store: a copy of every file, then the originals go.
    storage.move(storage.join(bucket, "step"), storage.join(bucket, "step.corrupt-1"))
    assert gcs.objects("bucket") == [
        "copy/b", "copy/state/a", "step.corrupt-1/b", "step.corrupt-1/state/a",
    ]  # fmt: skip
    storage.move(storage.join(local, "back"), storage.join(local, "moved"))  # a rename
    assert sorted(os.listdir(local)) == ["moved", "step"]


def test_staged_and_fetched_give_local_paths_and_clean_up(root, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    url = storage.is_url(root)
    with storage.staged(storage.join(root, "tb")) as local:
        assert not storage.is_url(local) and (local.startswith(str(scratch)) == url)
        with open(os.path.join(local, "events.1"), "w") as f:
            f.write("e")
    png = storage.join(root, "img", "step_1.png")
    with storage.staged(png, kind="file") as local, open(local, "wb") as f:
        f.write(b"png")
    with storage.staged(storage.join(root, "data", "shard_0_of_1"), kind="prefix") as local:
        for suffix in (".index", ".data-00000-of-00001", ".json"):
            with open(local + suffix, "w") as f:
                f.write(suffix)
    with pytest.raises(RuntimeError), storage.staged(storage.join(root, "bad")) as local:
        with open(os.path.join(local, "half"), "w") as f:
            f.write("h")
        raise RuntimeError("the writer failed")
    # Nothing uploaded from a failure (a local folder is written in place).
    assert storage.exists(storage.join(root, "bad")) != url
    storage.write_text(storage.join(root, "data", "shard_0_of_10.json"), "another shard")
    assert storage.listdir(storage.join(root, "tb")) == ["events.1"]
    assert storage.read_bytes(storage.join(root, "img", "step_1.png")) == b"png"

    with storage.fetched(storage.join(root, "data", "shard_0_of_1"), kind="prefix") as local:
        folder = os.path.dirname(local)
        names = sorted(os.listdir(folder))
        if url:  # only this prefix's files were downloaded
            assert names == [
                f"shard_0_of_1{s}" for s in (".data-00000-of-00001", ".index", ".json")
            ]
        with open(local + ".json") as f:
            assert f.read() == ".json"
    with storage.fetched(storage.join(root, "tb")) as local:
        assert os.listdir(local) == ["events.1"]
    with storage.fetched(png, kind="file") as local, open(local, "rb") as f:
        assert f.read() == b"png"
    assert os.listdir(scratch) == []  # every temporary folder went


def test_a_listing_sees_what_another_client_wrote(gcs):
    """gcsfs's listing cache is off: TensorStore (orbax's arrays) writes behind its back."""
    import tensorstore as ts

    folder = gcs.url("steps")
    storage.write_text(storage.join(folder, "4", "x"), "x")
    assert storage.listdir(folder) == ["4"]
    store = ts.KvStore.open(folder + "/").result()
    store.write("8/commit_success.txt", b"ok").result()
    assert storage.listdir(folder) == ["4", "8"]
    assert storage.exists(storage.join(folder, "8", "commit_success.txt"))
