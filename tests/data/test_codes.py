"""Codes shards: writer -> reader round trip, crash safety, range and meta checks."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from parti_jax.data import codes, pipeline
from tests.data.data_testing import write_codes_folder


def test_round_trip(tmp_path):
    written = write_codes_folder(tmp_path, num_shards=3, per_shard=5)
    meta = codes.load_codes_meta(str(tmp_path))
    assert meta["num_examples"] == 15 and meta["codes_dtype"] == "uint16"
    assert meta["grid"] == [2, 3] and meta["codebook_size"] == 16
    assert [s["count"] for s in meta["shards"]] == [5, 5, 5]
    assert all(os.path.exists(tmp_path / s["path"]) for s in meta["shards"])
    for key in codes.REQUIRED_META_KEYS:
        assert key in meta
    records = list(codes.read_codes(str(tmp_path), codebook_size=16, grid=(2, 3)))
    assert len(records) == 15
    for r in records:
        text, expected = written[r.id.decode()]
        assert r.text == text
        assert r.image_codes.dtype == np.int32
        np.testing.assert_array_equal(r.image_codes, expected)
    # 2 bytes a code: the shard is compact.
    size = os.path.getsize(tmp_path / meta["shards"][0]["path"])
    assert size < 5 * (6 * 4 + 120)

    # The seqio data source yields the same records.
    source = codes.CodesDataSource({"train": str(tmp_path)})
    rows = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert sorted(r["id"].decode() for r in rows) == sorted(written)
    for r in rows:
        np.testing.assert_array_equal(r["image_codes"], written[r["id"].decode()][1])


def test_large_codebook_uses_int32(tmp_path):
    write_codes_folder(tmp_path, num_shards=1, per_shard=2, codebook_size=70_000, fill=69_999)
    meta = codes.load_codes_meta(str(tmp_path))
    assert meta["codes_dtype"] == "int32"
    (first, _) = list(codes.read_codes(str(tmp_path)))
    assert first.image_codes.max() == 69_999


def test_interrupted_writer_loses_nothing_already_written(tmp_path):
    with codes.CodesShardWriter(
        str(tmp_path), "shard-000-00000.tfrecord", codebook_size=8, grid=(1, 2)
    ) as w:
        w.write("a", "first", [1, 2])
    second = codes.CodesShardWriter(
        str(tmp_path), "shard-000-00001.tfrecord", codebook_size=8, grid=(1, 2)
    )
    with pytest.raises(RuntimeError, match="preempted"), second as w:
        w.write("b", "second", [3, 4])
        raise RuntimeError("preempted")
    assert codes.shard_is_complete(str(tmp_path), "shard-000-00000.tfrecord")
    assert not codes.shard_is_complete(str(tmp_path), "shard-000-00001.tfrecord")
    assert sorted(os.listdir(tmp_path)) == ["shard-000-00000.tfrecord"]

    # A writer killed without cleanup leaves only an .incomplete file; finalize refuses.
    killed = codes.CodesShardWriter(
        str(tmp_path), "shard-000-00002.tfrecord", codebook_size=8, grid=(1, 2)
    )
    killed.write("c", "third", [5, 6])
    killed._writer.flush()
    assert not codes.shard_is_complete(str(tmp_path), "shard-000-00002.tfrecord")
    kwargs = dict(
        codebook_size=8,
        grid=(1, 2),
        codebook_hash="h",
        image_size=8,
        vqgan_checkpoint="v",
        vqgan_step=1,
        source_task="t",
        split="train",
    )
    with pytest.raises(
        ValueError, match=r"unfinished shard.*shard-000-00002\.tfrecord\.incomplete"
    ):
        codes.finalize_codes_meta(str(tmp_path), **kwargs)
    assert not (tmp_path / codes.META_FILE).exists()
    killed.abort()
    # Resume: rewrite the missing shard, then finalize gathers both.
    with codes.CodesShardWriter(
        str(tmp_path), "shard-000-00001.tfrecord", codebook_size=8, grid=(1, 2)
    ) as w:
        w.write("b", "second", [3, 4])
    meta = codes.finalize_codes_meta(str(tmp_path), **kwargs)
    assert meta["num_examples"] == 2
    assert [r.text for r in codes.read_codes(str(tmp_path))] == ["first", "second"]
    with pytest.raises(
        FileExistsError, match="shard-000-00000.tfrecord: a complete shard already exists"
    ):
        codes.CodesShardWriter(
            str(tmp_path), "shard-000-00000.tfrecord", codebook_size=8, grid=(1, 2)
        )


def test_writer_rejects_bad_codes(tmp_path):
    with codes.CodesShardWriter(str(tmp_path), "s.tfrecord", codebook_size=8, grid=(1, 2)) as w:
        w.write("ok", "fine", [0, 7])
        with pytest.raises(
            ValueError, match=r"s\.tfrecord: record 1 \(id 'bad'\): image code 8 .*outside \[0, 8\)"
        ):
            w.write("bad", "x", [8, 0])
        with pytest.raises(ValueError, match=r"record 1 .*3 image codes, expected 2"):
            w.write("short", "x", [1, 2, 3])
        with pytest.raises(ValueError, match="must be integers"):
            w.write("float", "x", [0.5, 1.0])
    assert codes.count_records(str(tmp_path / "s.tfrecord")) == 1


def _write_raw_shard(path, codes_u16):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, c in enumerate(codes_u16):
            feats = {
                "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"r{i}".encode()])),
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a red circle"])),
                "image_codes": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[np.asarray(c, "<u2").tobytes()])
                ),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()
            )


def test_out_of_range_shard_names_file_and_record(tmp_path):
    write_codes_folder(tmp_path, num_shards=1, per_shard=3)
    meta_path = tmp_path / codes.META_FILE
    meta = json.loads(meta_path.read_text())
    bad = tmp_path / "bad.tfrecord"
    _write_raw_shard(bad, [[0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], [2, 3, 99, 0, 0, 0]])
    meta["shards"] = [{"path": "bad.tfrecord", "count": 3}]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        ValueError,
        match=r"bad\.tfrecord: record 2: image code 99 at position 2 is outside \[0, 16\)",
    ):
        list(codes.read_codes(str(tmp_path)))
    # The tf.data path fails on the same record with the same coordinates.
    source = codes.CodesDataSource({"train": str(tmp_path)})
    it = pipeline.DataIterator(
        source.get_dataset("train", shuffle=False)
        .map(lambda ex: {**ex, "text_truncated": 0})
        .batch(1),
        kind="codes",
        description={},
    )
    next(it), next(it)
    with pytest.raises(
        pipeline.DataPipelineError,
        match=r"bad\.tfrecord: record 2: image code outside \[0, 16\) \(min 0, max 99\)",
    ):
        next(it)


def test_meta_mismatch_names_both_values_and_file(tmp_path):
    write_codes_folder(tmp_path, num_shards=1, per_shard=2, codebook_size=16, grid=(2, 3))
    meta = codes.load_codes_meta(str(tmp_path))
    codes.validate_codes_meta(meta, codebook_size=16, grid=[2, 3], codebook_hash="feedc0de")
    with pytest.raises(
        ValueError,
        match=r"codes_meta\.json: codes do not match: codebook_size 16 != expected 8192; "
        r"grid \[2, 3\] != expected \[32, 32\]; codebook_hash feedc0de != expected abc",
    ):
        codes.validate_codes_meta(meta, codebook_size=8192, grid=(32, 32), codebook_hash="abc")
    with pytest.raises(ValueError, match=r"codebook_hash feedc0de != expected 0123"):
        list(codes.read_codes(str(tmp_path), codebook_hash="0123"))
    with pytest.raises(ValueError, match=r"codes_meta\.json: codes do not match: grid"):
        codes.CodesDataSource({"train": str(tmp_path)}, grid=(4, 4))


def test_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"codes_meta\.json: not found"):
        codes.load_codes_meta(str(tmp_path))
    (tmp_path / codes.META_FILE).write_text('{"codebook_size": 16}')
    with pytest.raises(ValueError, match=r"codes_meta\.json: missing key\(s\) \['grid'"):
        codes.load_codes_meta(str(tmp_path))
    (tmp_path / codes.META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        codes.load_codes_meta(str(tmp_path))
    sub = tmp_path / "gone"
    write_codes_folder(sub, num_shards=1, per_shard=1)
    os.remove(sub / "shard-000-00000.tfrecord")
    with pytest.raises(
        FileNotFoundError, match=r"lists shard .*shard-000-00000\.tfrecord, which is missing"
    ):
        list(codes.read_codes(str(sub)))


def test_shard_at_a_url_appears_only_when_closed(gcs, tmp_path, monkeypatch):
    """A URL's shard is written locally and uploaded once, at close; an aborted one leaves
    no object and no local file."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = gcs.url("codes")
    with codes.CodesShardWriter(folder, "a.tfrecord", codebook_size=8, grid=(1, 2)) as w:
        w.write("a", "first", [1, 2])
        assert gcs.objects() == [] and len(os.listdir(tmp_path)) == 1  # the staging folder
    second = codes.CodesShardWriter(folder, "b.tfrecord", codebook_size=8, grid=(1, 2))
    with pytest.raises(RuntimeError, match="preempted"), second as w:
        w.write("b", "second", [3, 4])
        raise RuntimeError("preempted")
    assert gcs.objects("codes") == ["a.tfrecord"] and os.listdir(tmp_path) == []
    assert codes.shard_is_complete(folder, "a.tfrecord")
    assert not codes.shard_is_complete(folder, "b.tfrecord")
    assert codes.count_records(f"{folder}/a.tfrecord") == 1
    with pytest.raises(FileExistsError, match="a.tfrecord: a complete shard already exists"):
        codes.CodesShardWriter(folder, "a.tfrecord", codebook_size=8, grid=(1, 2))
