"""The metric writers behind `MetricWriter`: TensorBoard event files that TensorBoard's own
reader reads back (scalars, an image, a histogram), gin choosing the writers
(`LoopConfig.writers = @WriterConfig()`), Weights & Biases offline (or, without wandb,
the error that says how to get it), and a tiny VQGAN run whose TensorBoard holds the
codebook-usage histogram and the reconstruction grid."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import time

import numpy as np
import pytest

import gin
from parti_jax.cli import flags
from parti_jax.train import loop, metrics
from tests.vqgan.vqgan_testing import train_tiny

HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # whatever a test binds, nothing goes out
    yield
    gin.clear_config()


def events_of(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    return events


def wandb_history(workdir, *, rows: int) -> list[dict]:
    """The logged rows of the offline W&B run under <workdir>/wandb, read back from its log
    (W&B's own process may still be writing it for a moment after `finish()`)."""
    deadline = time.monotonic() + 30
    while len(history := _read_wandb_history(workdir)) < rows and time.monotonic() < deadline:
        time.sleep(0.2)
    return history


def _read_wandb_history(workdir) -> list[dict]:
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (log,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(log)
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def write_a_little(writer: metrics.MetricWriter) -> None:
    writer.write_scalars(1, {"loss": 2.0})
    writer.write_scalars(2, {"loss": 1.5})
    writer.write_images(2, {"eval/grid": np.full((4, 6, 3), 200, np.uint8)})
    writer.write_histogram(2, "codebook/code_counts", np.array([0, 0, 0, 3, 5, 9]))


def test_tensorboard_reads_back_scalars_an_image_and_a_histogram(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    write_a_little(writer)
    writer.close()
    events = events_of(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.5)]
    (image,) = events.Images("eval/grid")
    assert (image.step, image.width, image.height) == (2, 6, 4)
    (hist,) = events.Histograms("codebook/code_counts")
    value = hist.histogram_value
    assert hist.step == 2 and (value.min, value.max, value.num, value.sum) == (0, 9, 6, 17)
    assert value.bucket[0] == 3  # the three unused codes: the first bucket
    # metrics.jsonl is written whatever the writers.
    assert [m["step"] for m in metrics.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_writers_off_leave_only_metrics_jsonl(tmp_path):
    for name, kwargs in (("a", {"writers": metrics.WriterConfig(tensorboard=False)}),
                         ("b", {"tensorboard": False})):  # fmt: skip
        writer = metrics.MetricWriter(tmp_path / name, **kwargs)
        assert not writer.writes_summaries  # the loop then skips fetching histogram values
        write_a_little(writer)
        writer.close()
        assert sorted(os.listdir(tmp_path / name)) == ["metrics.jsonl"]


def test_gin_chooses_the_writers(tmp_path):
    run_file = tmp_path / "writers.gin"
    run_file.write_text(
        "train/LoopConfig.num_steps = 3\n"
        "train/LoopConfig.writers = @WriterConfig()\n"
        "WriterConfig.tensorboard = False\n"
        "WriterConfig.wandb_project = 'shapes'\n"
    )
    flags.setup_gin(flags.CommonArgs([str(run_file)], [], [], None, argparse.Namespace()))
    with gin.config_scope("train"):
        config = gin.get_configurable("LoopConfig")()
    assert config.writers == metrics.WriterConfig(tensorboard=False, wandb_project="shapes")
    gin.clear_config()
    run_file.write_text("WriterConfig.wandb_mode = 'offlien'\n")
    flags.setup_gin(flags.CommonArgs([str(run_file)], [], [], None, argparse.Namespace()))
    with pytest.raises(ValueError, match=r"WriterConfig.wandb_mode='offlien': expected one of"):
        gin.get_configurable("WriterConfig")()
    with pytest.raises(ValueError, match="LoopConfig.writers=.* must be a WriterConfig"):
        loop.LoopConfig(num_steps=1, writers={"wandb": True})


def test_wandb_without_the_package_names_the_binding_and_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ValueError) as e:
        metrics.WriterConfig(wandb=True)
    message = str(e.value)
    assert "WriterConfig.wandb=True" in message and "pip install wandb" in message
    assert "WriterConfig.wandb = False" in message
    metrics.WriterConfig(wandb=False)  # off, wandb is never looked for


@needs_wandb
def test_wandb_offline_run_logs_scalars_images_and_histograms(tmp_path):
    writers = metrics.WriterConfig(wandb=True, tensorboard=False)
    writer = metrics.MetricWriter(tmp_path, writers=writers, run_config={"batch_size": 8})
    write_a_little(writer)
    writer.close()
    rows = wandb_history(tmp_path, rows=2)
    assert [(r["_step"], r["loss"]) for r in rows if "loss" in r] == [(1, 2.0), (2, 1.5)]
    last = rows[-1]
    assert last["eval/grid/_type"] == "image-file" and last["eval/grid/width"] == 6
    assert last["codebook/code_counts/_type"] == "histogram"
    assert sum(last["codebook/code_counts/values"]) == 6
    run_id = (tmp_path / metrics.WANDB_RUN_ID_FILE).read_text().strip()
    # A resumed run continues the same W&B run (the id kept in the work dir).
    writer = metrics.MetricWriter(tmp_path, writers=writers, start_step=2)
    writer.write_scalars(3, {"loss": 1.0})
    writer.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in os.path.basename(r) for r in runs)


@needs_wandb
def test_wandb_and_tensorboard_on_a_gs_work_dir(gcs):
    run = gcs.url("run")
    writer = metrics.MetricWriter(run, writers=metrics.WriterConfig(wandb=True), flush_secs=3600)
    write_a_little(writer)
    writer.close()
    names = gcs.objects()
    assert "run/metrics.jsonl" in names and "run/wandb_run_id.txt" in names
    assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
    assert any(n.startswith("run/wandb/offline-run-") and n.endswith(".wandb") for n in names)


def test_tiny_vqgan_tensorboard_has_the_codebook_histogram_and_an_image(tmp_path):
    workdir = tmp_path / "vqgan"
    result = train_tiny(
        workdir, num_steps=4, log_every=2, eval_every=4, num_eval_images=4, num_grid_images=2,
        tensorboard=True,
    )  # fmt: skip
    assert result.status == "done"
    events = events_of(workdir / "tensorboard")
    hists = events.Histograms("codebook/code_counts")
    assert [h.step for h in hists] == [2, 4]
    # The window's per-code counts: every code of the 64 once, summing to the codes drawn.
    grid_tokens = 8 * 4 * 4  # batch 8, a 4x4 grid; codebook_window=2 steps
    assert all(h.histogram_value.num == 64 for h in hists)
    assert hists[-1].histogram_value.sum == 2 * grid_tokens
    assert [e.step for e in events.Images("eval/reconstructions")] == [4]
    assert [e.step for e in events.Scalars("eval/psnr")] == [4]
