"""Run artefacts on an object store: codes, bundles, samples and eval reports at gs:// URLs.

Against the in-process GCS emulator (tests/gcs_testing.py, fixture `gcs`) and the
tiny trained pipeline (tests/pipeline_fixtures.py): each CLI runs once, as a
subprocess started in an empty folder with TMPDIR in another, and both must be
empty afterwards (no `gs:` folder, no staging file left behind): every artefact is
an object in the bucket. TensorFlow never sees a URL (parti_jax/storage.py): code
shards at URLs are read through storage and split in Python (parti_jax/data/tfrecords.py),
and must give the examples, order and saved data positions of a local copy.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from parti_jax import storage
from parti_jax.data import codes as codes_lib
from parti_jax.data import pipeline, tfrecords
from parti_jax.decoding import SamplingConfig
from parti_jax.eval import records as R
from tests.data.data_testing import write_codes_folder

pytest_plugins = ["tests.pipeline_fixtures"]

PROMPTS = ["a red circle", "a small blue square on the left"]


def run_cli(gcs, tmp_path, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m parti_jax ARGV` in an empty folder with TMPDIR in another; both stay empty."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, **gcs.env, TMPDIR=str(tmp))
    proc = subprocess.run([sys.executable, "-m", "parti_jax", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(cwd)) == [] and sorted(os.listdir(tmp)) == []
    return proc


def upload_tree(local, url: str) -> None:
    """Copies a local folder to `url`, each file in one request (storage.write_bytes: gcsfs's
    put_file, under storage.copy, loses a last b"\r" of a file on the emulator)."""
    for file in pathlib.Path(local).rglob("*"):
        if file.is_file():
            storage.write_bytes(storage.join(url, str(file.relative_to(local))), file.read_bytes())


# ------------------------------------------------------------------ TFRecord framing


def _tfrecord_bytes(tmp_path, records: list[bytes]) -> bytes:
    path = tmp_path / "raw.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for r in records:
            writer.write(r)
    return path.read_bytes()


def test_framing_reader_matches_tensorflow_and_catches_damage(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 3, b"last record"]
    data = _tfrecord_bytes(tmp_path, records)
    starts, lengths = tfrecords.record_offsets(data, "raw.tfrecord")
    assert [data[b : b + n] for b, n in zip(starts, lengths)] == records
    footer = int(starts[1] + lengths[1])  # the crc after record 1's data, b"x"
    assert tfrecords.masked_crc32c(b"x") == struct.unpack_from("<I", data, footer)[0]

    # A flipped byte in a record's data: its crc does not match.
    third = int(starts[2]) + 100
    flipped = data[:third] + bytes([data[third] ^ 1]) + data[third + 1 :]
    with pytest.raises(ValueError, match=r"^shard-7: record 2 at byte \d+: corrupt data \(crc"):
        tfrecords.record_offsets(flipped, "shard-7")
    # A flipped byte in a length: the header crc catches it before any read past the end.
    length_byte = int(starts[1]) - 12
    flipped = data[:length_byte] + bytes([data[length_byte] ^ 4]) + data[length_byte + 1 :]
    with pytest.raises(ValueError, match=r"^shard-7: record 1 at byte \d+: corrupt length"):
        tfrecords.record_offsets(flipped, "shard-7")
    # Cut inside the last record, and inside a header.
    for cut, what in ((len(data) - 6, r"\(11 bytes from byte"), (int(starts[3]) - 4, "header")):
        with pytest.raises(ValueError, match=rf"^shard-7: record 3 is truncated .*{what}") as e:
            tfrecords.record_offsets(data[:cut], "shard-7")
        assert "\n" not in str(e.value)


def test_truncated_shard_at_a_url_is_a_one_line_pipeline_error(gcs, tmp_path):
    folder = gcs.url("codes")
    write_codes_folder(folder, num_shards=2, per_shard=3)
    assert gcs.objects("codes") == [
        "codes_meta.json",
        "shard-000-00000.tfrecord",
        "shard-000-00001.tfrecord",
    ]  # fmt: skip (no .incomplete objects: a shard is uploaded once, when closed)
    shard = storage.join(folder, "shard-000-00001.tfrecord")
    storage.write_bytes(shard, storage.read_bytes(shard)[:-10])
    source = codes_lib.CodesDataSource({"train": folder})
    ds = source.get_dataset("train", shuffle=False).map(lambda ex: {**ex, "text_truncated": 0})
    it = pipeline.DataIterator(ds.batch(1), kind="codes", description={})
    with pytest.raises(pipeline.DataPipelineError) as e:
        for _ in range(6):
            next(it)
    assert str(e.value).startswith(f"{shard}: record 2 is truncated") and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"shard-000-00001\.tfrecord: record 2 is truncated"):
        list(codes_lib.read_codes(folder))


# ------------------------------------------------------------------ precompute-codes


def test_precompute_to_gcs_then_read_like_a_local_copy(gcs, tiny_pipeline, tmp_path):
    import parti_jax.tasks

    out = gcs.url("codes")
    proc = run_cli(
        gcs, tmp_path, "precompute-codes",
        "--gin.precompute_codes.task=@register_shapes_task()",
        "--gin.register_shapes_task.name='gcs_precompute'",
        "--gin.register_shapes_task.num_examples={'train': 11, 'validation': 2}",
        "--gin.register_shapes_task.image_size=16",
        "--gin.precompute_codes.shard_size=4", "--gin.precompute_codes.batch_size=8",
        f"--vqgan={tiny_pipeline['vqgan']}", f"--output_dir={out}",
    )  # fmt: skip
    assert "train: 11 examples in 3 shard(s)" in proc.stdout
    shards = [f"shard-000-0000{i}.tfrecord" for i in range(3)]
    assert set(gcs.objects("codes")) >= {
        "codes_meta.json", "precompute.json", "host-000.done", "config.gin",
        "operative_config.gin", *shards,
    }  # fmt: skip
    assert not [o for o in gcs.objects("codes") if o.endswith((".incomplete", ".tmp"))]
    meta = codes_lib.load_codes_meta(out)
    assert meta["num_examples"] == 11 and [s["count"] for s in meta["shards"]] == [4, 4, 3]

    local = tmp_path / "local_codes"
    for name in ["codes_meta.json", *shards]:
        storage.copy(storage.join(out, name), local / name)
    remote_task = parti_jax.tasks.register_codes_task("gcs_codes_remote", out)
    local_task = parti_jax.tasks.register_codes_task("gcs_codes_local", str(local))

    def iterator(task):
        return pipeline.make_codes_iterator(
            task, batch_size=3, feature_lengths={"inputs": 16}, seed=5, num_shards=1
        )

    # The same examples in the same order (shuffled, repeated: past one epoch).
    remote, copy = iterator(remote_task), iterator(local_task)
    for _ in range(5):
        a, b = next(remote), next(copy)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # The saved data position resumes exactly (the record index is all tf.data keeps).
    position = str(tmp_path / "position" / "data")
    remote.save(position)
    expected = [next(remote) for _ in range(3)]
    resumed = iterator(remote_task)
    resumed.restore(position)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    for it in (remote, copy, resumed):
        it.close()

    # `train` reads those shards, its work dir in the bucket too.
    from parti_jax.models.config import ModelConfig
    from parti_jax.train import t2i
    from parti_jax.train.optimizers import OptimizerConfig
    from tests.pipeline_fixtures import TINY_MODEL, _loop, _mesh_config

    result = t2i.train(
        workdir=gcs.url("t2i"),
        model_config=ModelConfig(**TINY_MODEL),
        batch_size=8,
        loop=_loop(2),
        mesh_config=_mesh_config(),
        optimizer_config=OptimizerConfig(learning_rate=1e-2, min_dim_size_to_factor=16),
        task=remote_task,
        text_length=16,
        codebook_hash=meta["codebook_hash"],
    )
    assert result.status == "done", result
    objects = gcs.objects("t2i")
    assert "metrics.jsonl" in objects and "checkpoints/2/commit_success.txt" in objects, objects


# ------------------------------------------------------------------ export / load_bundle


def test_export_to_gcs_and_load_bundle_from_it(gcs, tiny_pipeline, tmp_path):
    from parti_jax.bundle import BundleError, ExportedSampler, load_bundle
    from parti_jax.export import export_bundle, inspect_path

    p, url = tiny_pipeline, gcs.url("bundle")
    run_cli(gcs, tmp_path, "export", f"--workdir={url}", "--t2i", p["t2i"], "--vqgan", p["vqgan"],
            "--upsampler", p["upsampler"], "--platforms=cpu", "--export_batch_size=2")  # fmt: skip
    info = json.loads(storage.read_text(storage.join(url, "bundle.json")))
    objects = set(gcs.objects("bundle")) - {"parti_jax_workdir.json"}
    assert objects == {*info["files"], "bundle.json", "config.gin", "operative_config.gin"}

    local = tmp_path / "local_bundle"
    storage.copytree(url, local)
    config = SamplingConfig(temperature=1.5, top_k=32, guidance_scale=1.5, num_samples=2, seed=7)
    remote = load_bundle(url)  # every file's size and sha256 read through storage
    assert remote.records["bundle"]["path"] == url
    results = [
        b.generate(PROMPTS, keep_top_k=2, sampling_config=config, scorer="none")
        for b in (remote, load_bundle(local))
    ]
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.images, b.images)
    sampler = ExportedSampler(url, verify=False)
    assert sampler.encode_prompts(PROMPTS).shape == (2, sampler.text_length)
    report = inspect_path(url)  # from the safetensors headers, read through storage
    assert report["kind"] == "bundle" and report["total_params"] == sum(
        w["params"] for w in info["weights"].values()
    )
    # A damaged object is found by its sha256, read through storage.
    weights = storage.join(url, "vqgan_decoder.safetensors")
    good = storage.read_bytes(weights)
    storage.write_bytes(weights, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(BundleError, match=r"vqgan_decoder\.safetensors: sha256 differs"):
        load_bundle(url)
    storage.write_bytes(weights, good)

    # Replacing it: the old bundle.json goes first, the new one comes last.
    storage.write_text(storage.join(url, "stale.txt"), "from an older export")
    export_bundle(url, t2i_path=p["t2i"], vqgan_path=p["vqgan"], jax_export=False,
                  overwrite=True)  # fmt: skip
    after = gcs.objects("bundle")
    assert "stale.txt" not in after and "upsampler.safetensors" not in after
    assert "upsampler" not in load_bundle(url).info["weights"]


# ------------------------------------------------------------------ sample, eval


def test_sample_from_models_at_urls_writes_its_files_as_objects(gcs, tiny_pipeline, tmp_path):
    # The three trained work directories are read from the bucket too (records through
    # storage, checkpoints through orbax/TensorStore).
    p = {k: gcs.url("models", k) for k in ("t2i", "vqgan", "upsampler")}
    for key, url in p.items():
        upload_tree(tiny_pipeline[key], url)
    out = gcs.url("samples")
    prompts = storage.write_text(gcs.url("prompts.txt"), "\n".join(PROMPTS) + "\n")
    proc = run_cli(
        gcs, tmp_path, "sample", f"--workdir={out}", f"--t2i={p['t2i']}",
        f"--vqgan={p['vqgan']}", f"--upsampler={p['upsampler']}", f"--prompts_file={prompts}",
        "--gin.sample.sampling_config=@SamplingConfig()", "--gin.SamplingConfig.num_samples=2",
        "--gin.sample.keep_top_k=1", "--gin.sample.save_low_res=True", "--no_progress",
    )  # fmt: skip
    assert f"wrote 2 image(s) and manifest.json to {out}" in proc.stdout
    objects = set(gcs.objects("samples"))
    assert {"manifest.json", "0_0.png", "1_0.png", "low_res/0_0.png", "config.gin",
            "operative_config.gin"} <= objects  # fmt: skip
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert [e["prompt"] for e in manifest["images"]] == PROMPTS
    models = manifest["models"]
    assert models["encoder_decoder"]["checkpoint"] == f"{p['t2i']}/checkpoints/12"
    assert models["vqgan"]["workdir"] == p["vqgan"] and models["upsampler"]["step"] == 4
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "1_0.png")))) as im:
        assert im.size == (64, 64)


def test_eval_writes_its_reports_as_objects(gcs, tiny_pipeline, tmp_path):
    p, out = tiny_pipeline, gcs.url("eval")
    proc = run_cli(
        gcs, tmp_path, "eval", "--gin_file=runs/eval_shapes.gin", f"--workdir={out}",
        "--gin.eval.suites=['shapes']", f"--gin.eval.checkpoint_dir='{p['t2i']}'",
        f"--gin.eval.vqgan_dir='{p['vqgan']}'", f"--gin.eval.vocab_path='{p['vocab']}'",
        "--gin.shapes.num_in_distribution=2", "--gin.shapes.num_heldout=1",
    )  # fmt: skip
    assert f"report: {out}/index.html" in proc.stdout
    objects = set(gcs.objects("eval"))
    assert {"metrics.json", "index.html", "config.gin", "operative_config.gin",
            "shapes/metrics.json", "shapes/manifest.jsonl", "shapes/generation.json",
            "shapes/index.html", "shapes/report.html"} <= objects  # fmt: skip
    records = R.read_manifest(storage.join(out, "shapes"), check_images=True)
    assert len(records) == 3 and {f"shapes/{i}" for r in records for i in r.images} <= objects
    assert R.read_metrics(out)["shapes"]["in_distribution"]["num_scenes"] == 2
    summary = storage.read_text(storage.join(out, "index.html"))
    assert 'href="shapes/report.html"' in summary


def test_manifest_at_a_url_resumes_and_gallery_links_relatively(gcs):
    from parti_jax.eval import gallery
    from parti_jax.eval import suites as S

    folder = gcs.url("run", "eval")
    images = ["images/00000_0.png", "images/00001_0.png"]
    for image in images:
        S.save_png(storage.join(folder, image), np.zeros((4, 4, 3), np.uint8))
    with R.ManifestWriter(folder) as writer:
        writer.append(R.PromptRecord(0, "a red circle", images=images[:1]))
        # Durable at once: the object holds the line before the writer closes.
        assert len(R.read_manifest(folder)) == 1
    with R.ManifestWriter(folder) as writer:
        assert writer.done_ids == {0}
        writer.append(R.PromptRecord(1, "a blue square", images=images[1:]))
        with pytest.raises(R.RecordError, match="images/9.png.*write the image first"):
            writer.append(R.PromptRecord(2, "a cross", images=["images/9.png"]))
    assert [r.prompt_id for r in R.read_manifest(folder, check_images=True)] == [0, 1]
    page = gallery.write_gallery(folder, out_path=gcs.url("run", "pages", "gallery.html"))
    assert 'src="../eval/images/00001_0.png"' in storage.read_text(page)
    assert S.load_png(storage.join(folder, images[0])).shape == (4, 4, 3)
