"""Folder + captions source: real photos in many formats, and every bad-row case."""

import io
import json
import logging
import os

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from parti_jax.data import folder, pipeline
from parti_jax.tasks import register_folder_task


def _save(image: Image.Image, path, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four scikit-image photos (CC0) in six encodings, plus captions.jsonl."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    astronaut = Image.fromarray(skimage.data.astronaut())
    coffee = Image.fromarray(skimage.data.coffee())
    _save(astronaut, root / "astronaut.jpg", "JPEG", quality=90)
    _save(coffee, root / "coffee.png", "PNG")
    (root / "sub" / "chelsea16.png").write_bytes(
        tf.io.encode_png(skimage.data.chelsea().astype(np.uint16) * 257).numpy()
    )
    _save(Image.fromarray(skimage.data.rocket()).convert("L"), root / "rocket_gray.png", "PNG")
    rgba = np.dstack([skimage.data.astronaut(), np.full((512, 512), 255, np.uint8)])
    rgba[:, :256, 3] = 0
    _save(Image.fromarray(rgba, "RGBA"), root / "astronaut_rgba.png", "PNG")
    _save(coffee.convert("CMYK"), root / "coffee_cmyk.jpg", "JPEG", quality=95)
    rows = [
        {"file": "astronaut.jpg", "caption": "an astronaut with a flag"},
        {"file": "coffee.png", "caption": "a cup of coffee"},
        {"image": "sub/chelsea16.png", "text": "a tabby cat"},
        {"file": "rocket_gray.png", "caption": "a rocket on the launch pad"},
        {"file": "astronaut_rgba.png", "caption": "half an astronaut"},
        {"file": "coffee_cmyk.jpg", "caption": "a cup of coffee, in CMYK"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_folder_task_reads_every_format(photos):
    register_folder_task("photos", str(photos), image_size=32)
    register_folder_task("photos", str(photos), image_size=32)  # re-registration replaces
    it = pipeline.make_pixels_iterator(
        "photos_pixels", batch_size=3, image_size=32, shuffle=False, repeat=False, num_threads=2
    )
    batches = list(it)
    assert len(batches) == 2
    images = np.concatenate([b["image"] for b in batches])
    texts = [t for b in batches for t in b["text"]]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert texts[2] == "a tabby cat" and texts[5] == "a cup of coffee, in CMYK"
    assert np.abs(images[1] - images[5]).mean() < 0.05  # CMYK JPEG ~ the PNG
    gray = images[3]
    np.testing.assert_allclose(gray[..., 0], gray[..., 1])
    assert images[4][:, :10].min() > 0.95  # transparent half composited on white
    assert it.stats == {"examples": 6, "text_truncated": 0, "skipped_at_read": 0}
    with pytest.raises(ValueError, match="image_size=64 was asked"):
        pipeline.make_pixels_iterator("photos_pixels", batch_size=2, image_size=64)


def test_tsv_header_split_column_and_hash_split(tmp_path):
    image = Image.fromarray(skimage.data.coffee()[::8, ::8])
    names = [f"img{i:02d}.png" for i in range(24)]
    for n in names:
        _save(image, tmp_path / n, "PNG")
    lines = ["file\tcaption\tsplit"] + [
        f"{n}\tcoffee number {i}\t{'validation' if i < 4 else 'train'}" for i, n in enumerate(names)
    ]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    index = folder.scan_folder(str(tmp_path))
    assert len(index.split_records("validation")) == 4 and len(index.split_records("train")) == 20
    assert index.records[0].line == 2 and index.records[0].caption == "coffee number 0"

    (tmp_path / "captions.tsv").write_text(
        "".join(f"{n}\tcoffee {i}\n" for i, n in enumerate(names))
    )
    a = folder.scan_folder(str(tmp_path), validation_fraction=0.5, verify_images=False)
    b = folder.scan_folder(str(tmp_path), validation_fraction=0.5, verify_images=False)
    val = {r.file for r in a.split_records("validation")}
    assert val == {r.file for r in b.split_records("validation")}, "hash split is not deterministic"
    assert 0 < len(val) < 24
    assert val.isdisjoint({r.file for r in a.split_records("train")})
    assert folder.scan_folder(str(tmp_path), verify_images=False).splits == ["train"]


def _good_png(path):
    _save(Image.fromarray(skimage.data.astronaut()[::16, ::16]), path, "PNG")


def _jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG")
    return buffer.getvalue()


# (name, bad line as bytes for captions.jsonl, files to create, expected message)
BAD_JSONL = [
    (
        "undecodable",
        b'{"file": "bad.jpg", "caption": "x"}',
        {"bad.jpg": b"not an image at all"},
        r"bad\.jpg: cannot decode image",
    ),
    (
        "truncated",
        b'{"file": "cut.jpg", "caption": "x"}',
        {"cut.jpg": _jpeg_bytes()[:3000]},
        r"cut\.jpg: cannot decode image.*truncated",
    ),
    (
        "zero_size",
        b'{"file": "empty.png", "caption": "x"}',
        {"empty.png": b""},
        r"empty\.png: image file is empty",
    ),
    ("empty_caption", b'{"file": "good.png", "caption": "  "}', {}, r"empty caption"),
    ("non_utf8", b'{"file": "good.png", "caption": "caf\xe9"}', {}, r"not valid UTF-8"),
    (
        "lone_surrogate_caption",  # legal JSON, but no UTF-8: used to fail inside TensorFlow
        b'{"file": "good.png", "caption": "x \\ud800"}',
        {},
        r"\"caption\" is not valid Unicode \(lone surrogate '\\ud800' at character 2\)",
    ),
    (
        "lone_surrogate_file",
        b'{"file": "good\\udc80.png", "caption": "x"}',
        {},
        r"\"file\" is not valid Unicode",
    ),
    (
        "split_case",
        b'{"file": "good.png", "caption": "x", "split": "TRAIN"}',
        {},
        r"\"split\" 'TRAIN' is not a split: use one of train, validation, test "
        r"\(did you mean 'train'\?\)",
    ),
    ("split_number", b'{"file": "good.png", "caption": "x", "split": 1}', {}, r"1 is not a split"),
    ("malformed_json", b'{"file": "good.png", "caption": ', {}, r"malformed JSON"),
    ("missing_file_key", b'{"caption": "x"}', {}, r'missing key "file"'),
    ("missing_caption_key", b'{"file": "good.png"}', {}, r'missing key "caption"'),
    ("absolute_path", b'{"file": "/etc/passwd", "caption": "x"}', {}, r"absolute path"),
    ("dotdot_escape", b'{"file": "../outside.png", "caption": "x"}', {}, r"leaves the folder"),
    (
        "missing_file",
        b'{"file": "nowhere.png", "caption": "x"}',
        {},
        r"'nowhere\.png' does not exist",
    ),
]


@pytest.mark.parametrize("name,line,files,message", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_rows_name_file_and_line(tmp_path, name, line, files, message):
    root = tmp_path / "data"
    root.mkdir()
    _good_png(root / "good.png")
    _good_png(tmp_path / "outside.png")
    for file_name, data in files.items():
        (root / file_name).write_bytes(data)
    good = b'{"file": "good.png", "caption": "an astronaut"}'
    (root / "captions.jsonl").write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    with pytest.raises(folder.FolderDataError, match=r"captions\.jsonl: line 2: .*" + message):
        folder.scan_folder(str(root))
    index = folder.scan_folder(str(root), skip_bad_examples=True)
    assert len(index.skipped) == 1 and len(index.records) == 2
    assert [r.line for r in index.records] == [1, 3]
    assert "line 2" in index.skipped[0]


def test_symlink_leaving_folder_and_tsv_missing_column(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _good_png(root / "good.png")
    _good_png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    (root / "captions.tsv").write_text("good.png\tan astronaut\nlink.png\tsneaky\ngood.png\n")
    with pytest.raises(
        folder.FolderDataError, match=r"captions\.tsv: line 2: path 'link\.png' leaves the folder"
    ):
        folder.scan_folder(str(root))
    index = folder.scan_folder(str(root), skip_bad_examples=True)
    assert len(index.skipped) == 2 and len(index.records) == 1
    assert "line 3: missing caption column" in index.skipped[1]
    task = register_folder_task("skippy", str(root), image_size=16, skip_bad_examples=True)
    assert len(task.source.index.skipped) == 2


def test_tsv_extra_columns_and_unknown_splits_are_bad_rows(tmp_path):
    _good_png(tmp_path / "good.png")
    (tmp_path / "captions.tsv").write_bytes(
        b"\xef\xbb\xbffile\tcaption\tsplit\n"  # a BOM before the header
        b"good.png\tfine\ttrain\n"
        b"good.png\ta tab\tinside the caption\n"
        b"good.png\tshouting\tVALIDATION\n"
        b"good.png\ttoo\tmany\tcolumns\n"
    )
    with pytest.raises(
        folder.FolderDataError,
        match=r"captions\.tsv: line 3: third column \(file<TAB>caption<TAB>split\) "
        r"'inside the caption' is not a split: use one of train, validation, test "
        r"\(fix the row, or pass skip_bad_examples=True to skip it\)",
    ):
        folder.scan_folder(str(tmp_path))
    index = folder.scan_folder(str(tmp_path), skip_bad_examples=True)
    assert [r.line for r in index.records] == [2] and index.splits == ["train"]
    assert [m.split(": ")[1] for m in index.skipped] == ["line 3", "line 4", "line 5"]
    assert "did you mean 'validation'?" in index.skipped[1]
    assert "4 columns" in index.skipped[2]


def test_bom_is_stripped_and_invalid_unicode_never_reaches_tensorflow(tmp_path):
    _good_png(tmp_path / "good.png")
    (tmp_path / "captions.jsonl").write_bytes(
        b'\xef\xbb\xbf{"file": "good.png", "caption": "first"}\n'
        b'{"file": "good.png", "caption": "x \\ud800"}\n'
        b'{"file": "good.png", "caption": "third"}\n'
    )
    task = register_folder_task("unicode", str(tmp_path), image_size=16, skip_bad_examples=True)
    assert [r.caption for r in task.source.index.records] == ["first", "third"]
    assert 'line 2: "caption" is not valid Unicode' in task.source.index.skipped[0]
    it = pipeline.make_pixels_iterator("unicode_pixels", batch_size=2, shuffle=False, repeat=False)
    assert list(next(it)["text"]) == ["first", "third"]


def test_bad_image_found_while_reading_names_the_file(tmp_path):
    _good_png(tmp_path / "good.png")
    (tmp_path / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "captions.jsonl").write_text(
        '{"file": "good.png", "caption": "fine"}\n{"file": "late.png", "caption": "broken"}\n'
    )
    register_folder_task("late", str(tmp_path), image_size=16, verify_images=False)
    it = pipeline.make_pixels_iterator("late_pixels", batch_size=1, shuffle=False, repeat=False)
    next(it)
    with pytest.raises(pipeline.DataPipelineError, match=r"late\.png: cannot decode image"):
        next(it)


def test_no_captions_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no captions file"):
        folder.scan_folder(str(tmp_path))


def test_verify_images_auto_decodes_small_folders_only(tmp_path, monkeypatch, caplog):
    """'auto' (the default) decodes every image at registration up to EAGER_VERIFY_LIMIT
    rows; a larger folder is checked as it is read: the same one-line error, later."""
    _good_png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    row = '{"file": "%s.png", "caption": "%s"}\n'
    (tmp_path / "captions.jsonl").write_text((row % ("good", "fine") + row % ("bad", "broken")) * 2)
    monkeypatch.setattr(folder, "EAGER_VERIFY_LIMIT", 4)
    with pytest.raises(folder.FolderDataError, match=r"line 2: bad\.png: cannot decode image"):
        folder.scan_folder(str(tmp_path))
    monkeypatch.setattr(folder, "EAGER_VERIFY_LIMIT", 3)
    with caplog.at_level(logging.INFO, logger=folder.__name__):
        assert len(folder.scan_folder(str(tmp_path)).records) == 4
    assert "4 rows; images are checked as they are read" in caplog.text
    with pytest.raises(folder.FolderDataError, match=r"line 2: bad\.png"):
        folder.scan_folder(str(tmp_path), verify_images=True)
    with pytest.raises(ValueError, match=r"verify_images must be True, False or 'auto', got 'yes'"):
        folder.scan_folder(str(tmp_path), verify_images="yes")
    register_folder_task("auto", str(tmp_path), image_size=16)
    it = pipeline.make_pixels_iterator("auto_pixels", batch_size=1, shuffle=False, repeat=False)
    assert list(next(it)["text"]) == ["fine"]
    with pytest.raises(pipeline.DataPipelineError, match=r"line 2: bad\.png: cannot decode image"):
        next(it)
