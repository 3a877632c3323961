"""Streamed shard sources: WebDataset tar shards and Parquet files (tiny shards in tmp)."""

import io
import json
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from parti_jax import storage
from parti_jax.data import parquet, pipeline, streaming, webdataset
from parti_jax.tasks import register_parquet_task, register_webdataset_task

pytest_plugins = ["tests.pipeline_fixtures"]


def _colour(index: int) -> tuple[int, int, int]:
    return (index * 37) % 256, (index * 91) % 256, 200


def _image(index: int, fmt: str = "PNG", size: int = 20) -> bytes:
    """A flat image of example `index`'s colour (PNG, lossless WEBP or JPEG)."""
    buffer = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(np.full((size, size, 3), _colour(index), np.uint8)).save(
        buffer, format=fmt, **kwargs
    )
    return buffer.getvalue()


def _example(index: int, caption: str | None = None) -> list[tuple[str, bytes]]:
    """img2dataset-like members of example `index`: image, .txt or .json caption, extras."""
    key = f"{index:09d}"
    caption = caption or f"picture number {index}"
    fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][index % 3]
    members = [(f"{key}.{ext}", _image(index, fmt))]
    if index % 2:
        members.append((f"{key}.json", json.dumps({"caption": caption, "url": "x"}).encode()))
    else:
        members += [(f"{key}.txt", caption.encode() + b"\n"), (f"{key}.json", b"{}")]
    return members


def _write_tars(root: str, num_shards: int, per_shard: int) -> list[str]:
    """Shards 00000.tar ... of `per_shard` examples each; example i of shard s is s*per_shard+i."""
    paths = []
    for s in range(num_shards):
        members = [m for i in range(per_shard) for m in _example(s * per_shard + i)]
        paths.append(
            storage.write_bytes(storage.join(root, f"{s:05d}.tar"), webdataset.tar_bytes(members))
        )
    return paths


def _parquet_bytes(table: pa.Table, row_group_size: int = 3) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def _hf_table(indices) -> pa.Table:
    """Hugging Face datasets' layout: image struct {bytes, path}, text."""
    images = [{"bytes": _image(i), "path": f"{i}.png"} for i in indices]
    return pa.table({"image": images, "text": [f"picture number {i}" for i in indices]})


def _read(task, **kwargs) -> tuple[list[str], np.ndarray]:
    kwargs = {"batch_size": 1, "shuffle": False, "repeat": False, "num_threads": 2, **kwargs}
    batches = list(pipeline.make_pixels_iterator(task, **kwargs))
    texts = [t for b in batches for t in b["text"]]
    return texts, np.concatenate([b["image"] for b in batches])


def _index(text: str) -> int:
    return int(text.rsplit(" ", 1)[1])


def _assert_colours(texts, images, tolerance):
    for text, image in zip(texts, images):
        expected = np.array(_colour(_index(text)), np.float32) / 255.0
        assert np.abs(image.mean(axis=(0, 1)) - expected).max() < tolerance, text


def test_webdataset_task_reads_captions_and_images(tmp_path):
    paths = _write_tars(str(tmp_path / "shards"), 3, 4)
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")
    specs = [
        str(tmp_path / "shards"),
        str(tmp_path / "shards" / "*.tar"),
        str(tmp_path / "shards" / "{00000..00002}.tar"),
        [paths[0], str(tmp_path / "shards" / "0000{1,2}.tar")],
    ]
    for spec in specs:
        task = register_webdataset_task("tars", spec, image_size=16)
        assert task.source.list_shards("train") == paths, spec
    texts, images = _read("tars_pixels", batch_size=5, image_size=16, drop_remainder=False)
    assert texts == [f"picture number {i}" for i in range(12)]  # .txt wins over .json
    assert images.shape == (12, 16, 16, 3)
    _assert_colours(texts, images, tolerance=0.03)  # PNG, lossless WEBP, JPEG

    task = register_webdataset_task(
        "tars",
        {"train": paths[:2], "validation": paths[2]},
        image_size=8,
        cycle_length=2,
        shuffle_buffer_size=8,
    )
    assert task.splits == ("train", "validation")
    assert _read("tars_pixels", split="validation")[0] == [
        f"picture number {i}" for i in range(8, 12)
    ]
    epoch = _read("tars_pixels", shuffle=True, seed=1)[0]
    assert sorted(epoch, key=_index) == [f"picture number {i}" for i in range(8)]
    assert epoch != sorted(epoch, key=_index)  # two shards interleaved, shuffled


def test_shard_lists_and_their_errors(tmp_path):
    assert streaming.expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert streaming.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    _write_tars(str(tmp_path), 2, 1)
    cases = [
        ("{00000..00002}.tar", r"shard .*00002\.tar does not exist"),
        ("*.parquet", r"matches no files"),
        ("sub*/00000.tar", r"glob characters are allowed in the file name only"),
        ("00000.tar.gz", r"neither a folder nor a \*\.tar file"),
        ("{0..1}.tar", r"0\.tar does not exist"),
        ("{x}.tar", r"neither a range"),
    ]
    for spec, message in cases:
        with pytest.raises(streaming.ShardListError, match=message):
            streaming.list_shards(str(tmp_path / spec), suffix=".tar")
    with pytest.raises(streaming.ShardListError, match="named twice"):
        streaming.list_shards([str(tmp_path), str(tmp_path / "00000.tar")], suffix=".tar")
    with pytest.raises(ValueError, match="split 'eval' of the shards is not one of"):
        register_webdataset_task("tars", {"eval": str(tmp_path)}, image_size=8)


def test_parquet_task_reads_captions_and_images(tmp_path):
    root = tmp_path / "pq"
    storage.write_bytes(str(root / "a.parquet"), _parquet_bytes(_hf_table(range(5))))
    img2dataset = pa.table(  # img2dataset's parquet output: jpg bytes, caption, url
        {
            "jpg": [_image(i, "JPEG") for i in range(5, 8)],
            "caption": [f"picture number {i}" for i in range(5, 8)],
            "url": ["http://x"] * 3,
        }
    )
    storage.write_bytes(str(root / "b.parquet"), _parquet_bytes(img2dataset))
    register_parquet_task("pq", str(root), image_size=16)
    texts, images = _read("pq_pixels", batch_size=3, image_size=16, drop_remainder=False)
    assert texts == [f"picture number {i}" for i in range(8)]
    _assert_colours(texts, images, tolerance=0.03)

    custom = pa.table({"alt": ["a red one", "a blue one"], "pixels": [_image(0), _image(1)]})
    storage.write_bytes(str(tmp_path / "c.parquet"), _parquet_bytes(custom))
    with pytest.raises(ValueError, match=r"c\.parquet: no caption column \(tried caption, text; "
                       r"columns: alt, pixels\); set caption_column"):  # fmt: skip
        register_parquet_task("custom", str(tmp_path / "c.parquet"), image_size=8)
    with pytest.raises(ValueError, match=r"image column 'alt' holds string"):
        register_parquet_task("custom", str(tmp_path / "*.parquet"), image_size=8,
                              caption_column="alt", image_column="alt")  # fmt: skip
    register_parquet_task("custom", str(tmp_path / "c.parquet"), image_size=8,
                          caption_column="alt", image_column="pixels")  # fmt: skip
    assert _read("custom_pixels")[0] == ["a red one", "a blue one"]


def test_host_sharding_splits_shards_disjointly_and_completely(tmp_path):
    _write_tars(str(tmp_path), 5, 2)
    register_webdataset_task("hosts", str(tmp_path), image_size=8, shuffle_buffer_size=4)
    per_host = [
        _read("hosts_pixels", shard_index=h, num_shards=2, shuffle=True, seed=3)[0] for h in (0, 1)
    ]
    shards = [sorted({_index(t) // 2 for t in texts}) for texts in per_host]
    assert shards == [[0, 2, 4], [1, 3]]  # whole shards: host i reads shards i, i + 2, ...
    assert sorted(per_host[0] + per_host[1], key=_index) == [
        f"picture number {i}" for i in range(10)
    ]
    with pytest.raises(ValueError, match=r"5 tar shard\(s\) cannot feed 6 hosts"):
        pipeline.make_pixels_iterator("hosts_pixels", batch_size=1, shard_index=5, num_shards=6)


def _register(kind: str, root: str, name: str, **kwargs):
    register = register_webdataset_task if kind == "tar" else register_parquet_task
    return register(name, root, image_size=8, **kwargs)


def _write(kind: str, root: str, num_shards: int, per_shard: int) -> None:
    if kind == "tar":
        _write_tars(root, num_shards, per_shard)
        return
    for s in range(num_shards):
        table = _hf_table(range(s * per_shard, (s + 1) * per_shard))
        storage.write_bytes(storage.join(root, f"{s:05d}.parquet"), _parquet_bytes(table))


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_save_restore_mid_shard_continues_exactly(tmp_path, kind, monkeypatch):
    _write(kind, str(tmp_path / "data"), 3, 30)  # more than tf.data reads ahead
    kwargs = dict(batch_size=3, seed=5, num_threads=2)
    settings = dict(cycle_length=2, shuffle_buffer_size=4)
    _register(kind, str(tmp_path / "data"), "resume", **settings)
    it = pipeline.make_pixels_iterator("resume_pixels", **kwargs)
    fresh = [next(it) for _ in range(3)]
    it.save(str(tmp_path / "pos" / "shard_0_of_1"))
    expected = [next(it) for _ in range(10)]
    # A new process: a new source, no reader left open at the saved position.
    reader = webdataset._TarReader if kind == "tar" else parquet._ParquetReader
    skipped = []
    skip = reader.skip
    monkeypatch.setattr(reader, "skip", lambda self: skipped.append(1) or skip(self))
    _register(kind, str(tmp_path / "data"), "resume", **settings)
    restored = pipeline.make_pixels_iterator("resume_pixels", **kwargs)
    restored.restore(str(tmp_path / "pos" / "shard_0_of_1"))
    got = [next(restored) for _ in range(10)]
    assert skipped, "the restore did not reopen a shard mid-way"
    assert [list(b["text"]) for b in got] != [list(b["text"]) for b in fresh]
    for want, batch in zip(expected, got):
        assert list(batch["text"]) == list(want["text"])
        np.testing.assert_array_equal(batch["image"], want["image"])


GOOD = _example(0) + _example(2)
# (case, the bad example's members, the member named, the problem)
BAD_TAR_MEMBERS = [
    ("undecodable", [("000000001.jpg", b"not an image"), ("000000001.txt", b"x")],
     "000000001.jpg", r"cannot decode image"),
    ("no_caption", [("000000001.png", _image(1))], "000000001.png", r"no caption \(a 000000001"),
    ("non_utf8", [("000000001.png", _image(1)), ("000000001.txt", b"caf\xe9")],
     "000000001.txt", r"caption is not valid UTF-8"),
    ("lone_surrogate", [("000000001.png", _image(1)), ("000000001.json", b'{"caption": "x \\ud800"}')],
     "000000001.json", r"caption is not valid Unicode \(lone surrogate .{1,4}ud800.{1,2} at char"),
    ("empty_caption", [("000000001.png", _image(1)), ("000000001.txt", b"  \n")],
     "000000001.txt", r"empty caption"),
    ("no_image", [("000000001.txt", b"x"), ("000000001.cls", b"3")],
     "000000001", r"no image \(\.jpg/\.jpeg/\.png/\.webp\) in the example \(members: 000000001\.cls"),
    ("json_without_caption", [("000000001.png", _image(1)), ("000000001.json", b'{"url": "u"}')],
     "000000001.json", r"no caption in the JSON \(a string field named caption or text\)"),
]  # fmt: skip


def _bad_tar(case_members) -> bytes:
    return webdataset.tar_bytes(GOOD[:3] + case_members + GOOD[3:])


def _check_bad(task_name: str, register, where: str, message: str, good: list[str], caplog):
    register(skip_bad_examples=False)
    with pytest.raises(pipeline.DataPipelineError) as error:
        _read(task_name)
    text = str(error.value)
    assert re.fullmatch(
        re.escape(where) + ": " + message + r".*skip_bad_examples=True to skip such examples\)",
        text,
    ), text
    task = register(skip_bad_examples=True)
    it = pipeline.make_pixels_iterator(task_name, batch_size=1, shuffle=False, repeat=False)
    assert [t for b in it for t in b["text"]] == good
    shard = where.split(": ")[0]
    assert task.source.skipped_per_shard == {shard: 1}
    assert re.fullmatch(
        re.escape(where) + ": " + message + ".*", *task.source.skipped_at_read.values()
    )
    assert it.stats["skipped_at_read"] == 1
    assert "skipped while reading" in caplog.text


@pytest.mark.parametrize(
    "case,members,member,message", BAD_TAR_MEMBERS, ids=[c[0] for c in BAD_TAR_MEMBERS]
)
def test_bad_tar_examples_name_shard_and_member(tmp_path, caplog, case, members, member, message):
    shard = storage.write_bytes(str(tmp_path / "00000.tar"), _bad_tar(members))

    def register(**kwargs):
        return register_webdataset_task("bad", str(tmp_path), image_size=8, **kwargs)

    good = ["picture number 0", "picture number 2"]
    _check_bad("bad_pixels", register, f"{shard}: {member}", message, good, caplog)


@pytest.mark.parametrize("cut", ["data", "header", "end_marker"])
def test_truncated_or_corrupt_tar_counts_one_and_ends_the_shard(tmp_path, caplog, cut):
    data = webdataset.tar_bytes(_example(0) + _example(1) + _example(2))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("000000002")][0]
    if cut == "data":  # the download stopped inside the third example's image
        data, message = data[: third.offset_data + 10], r"cannot read the member"
    elif cut == "header":  # the third example's header is garbage
        data = data[: third.offset] + b"\x07" * 512 + data[third.offset + 512 :]
        message = r"invalid tar header at byte \d+, after member 000000001\.json"
    else:  # cut at a member boundary: no end-of-archive blocks
        data = data[: third.offset]
        message = r"the shard ends after member 000000001\.json without the end-of-archive"
    shard = storage.write_bytes(str(tmp_path / "00000.tar"), data)

    def register(**kwargs):
        return register_webdataset_task("cut", str(tmp_path), image_size=8, **kwargs)

    where = f"{shard}: 000000002.webp" if cut == "data" else shard
    good = ["picture number 0", "picture number 1"]
    _check_bad("cut_pixels", register, where, message, good, caplog)


BAD_PARQUET_ROWS = [
    ("url_only", {"image": None, "text": "x", "url": "http://a/b.jpg"},
     r"no image bytes \(only a URL or path: nothing is downloaded"),
    ("null_caption", {"image": _image(1), "text": None, "url": None}, r"no caption \(null\)"),
    ("non_utf8", {"image": _image(1), "text": b"caf\xe9", "url": None},
     r"caption is not valid UTF-8"),
    ("undecodable", {"image": b"\x89PNG\r\n\x1a\n garbage", "text": "x", "url": None},
     r"cannot decode image"),
]  # fmt: skip


@pytest.mark.parametrize("case,row,message", BAD_PARQUET_ROWS, ids=[c[0] for c in BAD_PARQUET_ROWS])
def test_bad_parquet_rows_name_file_and_row(tmp_path, caplog, case, row, message):
    rows = [{"image": _image(0), "text": "picture number 0", "url": None}, row,
            {"image": _image(2), "text": "picture number 2", "url": None}]  # fmt: skip
    captions = pa.array([r["text"] for r in rows], pa.binary()).view(pa.string())  # unchecked
    table = pa.table(
        {
            "image": pa.array([r["image"] for r in rows], pa.binary()),
            "caption": captions,
            "url": pa.array([r["url"] for r in rows], pa.string()),
        }
    )
    path = storage.write_bytes(str(tmp_path / "a.parquet"), _parquet_bytes(table))

    def register(**kwargs):
        return register_parquet_task("badpq", str(tmp_path), image_size=8, **kwargs)

    good = ["picture number 0", "picture number 2"]
    _check_bad("badpq_pixels", register, f"{path}: row 1", message, good, caplog)


def test_registration_opens_no_shard(tmp_path, monkeypatch):
    _write_tars(str(tmp_path / "tars"), 150, 1)
    for s in range(30):
        path = str(tmp_path / "pq" / f"{s:05d}.parquet")
        storage.write_bytes(path, _parquet_bytes(_hf_table([s])))
    opened = []
    real_open = storage.open

    def counting_open(location, mode="r", **kwargs):
        opened.append(str(location))
        return real_open(location, mode, **kwargs)

    monkeypatch.setattr(storage, "open", counting_open)
    task = register_webdataset_task("many", str(tmp_path / "tars"), image_size=8)
    assert len(task.source.list_shards("train")) == 150 and opened == []
    register_parquet_task("manypq", str(tmp_path / "pq" / "*.parquet"), image_size=8)
    assert opened == [str(tmp_path / "pq" / "00000.parquet")]  # its schema, once
    opened.clear()
    it = pipeline.make_pixels_iterator("many_pixels", batch_size=2, shuffle=False, num_threads=2)
    assert list(next(it)["text"]) == ["picture number 0", "picture number 1"]
    assert 2 <= len(opened) < 20, opened  # the shards reached (and a few read ahead)


def test_shards_on_gcs(gcs):
    _write_tars(gcs.url("shards"), 2, 2)
    storage.write_bytes(gcs.url("pq", "a.parquet"), _parquet_bytes(_hf_table([7, 8])))
    assert gcs.objects() == ["pq/a.parquet", "shards/00000.tar", "shards/00001.tar"]
    for spec in (gcs.url("shards"), gcs.url("shards", "{00000..00001}.tar")):
        task = register_webdataset_task("ontheweb", spec, image_size=8)
        assert task.source.list_shards("train") == [gcs.url("shards", "00000.tar"),
                                                     gcs.url("shards", "00001.tar")]  # fmt: skip
    texts, images = _read("ontheweb_pixels")
    assert texts == [f"picture number {i}" for i in range(4)]
    _assert_colours(texts, images, tolerance=0.03)
    register_parquet_task("ontheweb", gcs.url("pq"), image_size=8)
    assert _read("ontheweb_pixels")[0] == ["picture number 7", "picture number 8"]


def test_precompute_codes_on_a_tar_task(tiny_pipeline, tmp_path):
    from parti_jax.data import codes as codes_lib
    from parti_jax.vqgan.precompute import precompute_codes
    from parti_jax.vqgan.tokenizer import ImageTokenizer
    from tests.pipeline_fixtures import TINY_VQGAN, shapes_examples

    size = TINY_VQGAN["image_size"]
    images, captions = shapes_examples(10, size)
    pixels = np.round(images * 255).astype(np.uint8)
    for s in range(2):
        members = []
        for i in range(s * 5, s * 5 + 5):
            png = io.BytesIO()
            Image.fromarray(pixels[i]).save(png, format="PNG")
            members += [(f"{i:05d}.png", png.getvalue()), (f"{i:05d}.txt", captions[i].encode())]
        storage.write_bytes(
            str(tmp_path / "shards" / f"{s:05d}.tar"), webdataset.tar_bytes(members)
        )
    task = register_webdataset_task("tinytars", str(tmp_path / "shards"), image_size=size)
    result = precompute_codes(
        vqgan=tiny_pipeline["vqgan"],
        task=task,
        output_dir=str(tmp_path / "codes"),
        batch_size=4,
        shard_size=4,
        progress=False,
    )
    assert result.status == "done" and result.meta["num_examples"] == 10
    assert result.meta["source_task"] == "tinytars_pixels"
    records = list(codes_lib.read_codes(str(tmp_path / "codes")))
    assert [r.text for r in records] == captions
    expected = ImageTokenizer.load(tiny_pipeline["vqgan"]).encode(pixels / np.float32(255))
    np.testing.assert_array_equal(
        np.stack([r.image_codes for r in records]), expected.reshape(10, -1)
    )
