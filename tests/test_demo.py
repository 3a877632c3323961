"""`parti-jax demo` end to end with tiny sizes: stages, report, resume, bad input.

The demo runs through the CLI (gin/runs/demo.gin plus a tiny override file),
so the gin wiring of every stage is exercised: a 32px VQGAN with a 4x4 grid, a
one-layer encoder-decoder, a one-block upsampler, a few steps each, a
handful of eval scenes. Built once per session; the tests then read it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from parti_jax import demo as demo_lib
from parti_jax.cli import main as cli_main

TINY_GIN = """
VQGANConfig.image_size = 32
VQGANConfig.patch_size = 8
VQGANConfig.encoder_width = 32
VQGANConfig.encoder_depth = 1
VQGANConfig.encoder_heads = 2
VQGANConfig.encoder_mlp_dim = 64
VQGANConfig.decoder_width = 32
VQGANConfig.decoder_depth = 1
VQGANConfig.decoder_heads = 2
VQGANConfig.decoder_mlp_dim = 64
VQGANConfig.codebook_size = 64
VQGANConfig.code_dim = 8
shapes_world_pixels.image_size = 32
generator/adamw_optimizer.warmup_steps = 1
generator/adamw_optimizer.decay_end_step = 4
train_vqgan.batch_size = 8
train_vqgan/LoopConfig.num_steps = 4
train_vqgan/LoopConfig.log_every = 2
train_vqgan/LoopConfig.eval_every = None
train_vqgan.num_grid_images = 4
train_vqgan.num_eval_images = 8
train_vqgan/LoopConfig.checkpoint_every = 4

register_shapes_task.num_examples = {'train': 24, 'validation': 8}
register_shapes_task.image_size = 32
precompute_codes.batch_size = 16
precompute_codes.shard_size = 16

ModelConfig.codebook_size = 64
ModelConfig.image_grid = (4, 4)
ModelConfig.max_text_length = 16
ModelConfig.num_encoder_layers = 1
ModelConfig.num_decoder_layers = 1
ModelConfig.d_model = 32
ModelConfig.mlp_dim = 64
ModelConfig.num_heads = 2
OptimizerConfig.learning_rate = 1e-2
OptimizerConfig.warmup_steps = 1
OptimizerConfig.decay_start_step = 2
OptimizerConfig.decay_end_step = 4
OptimizerConfig.min_dim_size_to_factor = 16
register_codes_task.shuffle_buffer_size = 16
train.batch_size = 8
train/LoopConfig.num_steps = 4
train.text_length = 16
train/LoopConfig.log_every = 2
train/LoopConfig.checkpoint_every = 4
train/LoopConfig.eval_every = 4
train.eval_steps = 1

UpsamplerConfig.input_size = 32
UpsamplerConfig.scale = 2
UpsamplerConfig.num_blocks = 1
UpsamplerConfig.channels = 8
UpsamplerConfig.expansion = 2
upsampler/LossConfig.perceptual_weight = 0.0
train_upsampler.batch_size = 8
train_upsampler/LoopConfig.num_steps = 2
train_upsampler/LoopConfig.log_every = 1
train_upsampler/LoopConfig.checkpoint_every = 2
train_upsampler/LoopConfig.eval_every = None

ContrastiveConfig.image_size = 16
ContrastiveConfig.patch_size = 4
ContrastiveConfig.image_width = 32
ContrastiveConfig.image_depth = 1
ContrastiveConfig.image_heads = 2
ContrastiveConfig.image_mlp_dim = 64
ContrastiveConfig.embed_dim = 32
ContrastiveConfig.image_pool_grid = 2
contrastive/adamw_optimizer.warmup_steps = 1
CONTRASTIVE_STEPS = 4
train_contrastive.batch_size = 8
train_contrastive.text_length = 16
train_contrastive.hard_negatives = 2
train_contrastive.eval_steps = 1

SamplingConfig.num_samples = 1
sample.keep_top_k = 1
shapes.num_samples = 2
shapes.keep_top_k = 2
shapes.num_in_distribution = 3
shapes.num_heldout = 2
shapes.report_scenes = 3
reconstruction.num_images = 8
reconstruction.batch_size = 8
reconstruction.lpips_net = None
eval.batch_size = 8

demo.world_resolution = 32
demo.world_num_examples = {'train': 24, 'validation': 8}
demo.num_preview = 4
demo.vqgan_judge_images = 8
demo.sample_prompts = ['a red circle', 'a large blue triangle above a green square']
demo.num_heldout_sample_prompts = 1
demo.progress = True
demo.inspect_options = {'num_probe_scenes': 4, 'num_probe_captions': 40}
"""


def run_cli(*args: str) -> int:
    return cli_main.main(["demo", *args])


@pytest.fixture(scope="session")
def tiny_gin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo_gin") / "tiny_demo.gin"
    path.write_text(TINY_GIN)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_gin) -> dict:
    """The tiny demo, run once: its folder and what the first run printed."""
    import contextlib
    import io

    workdir = tmp_path_factory.mktemp("demo") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli(f"--workdir={workdir}", f"--gin_file={tiny_gin}")
    assert code == 0, out.getvalue()[-3000:]
    return {"workdir": workdir, "stdout": out.getvalue()}


def test_demo_runs_every_stage_and_writes_the_report(demo_run):
    wd = demo_run["workdir"]
    for stage in demo_lib.STAGES[:-1]:
        record = json.loads((wd / "stages" / f"{stage}.json").read_text())
        assert record["stage"] == stage and record["seconds"] >= 0
    page = (wd / "report" / "index.html").read_text()
    # Stage-time table: one row per stage with its seconds, and the total.
    table = page[page.index('id="stage-times"') :]
    for stage in demo_lib.STAGES[:-1]:
        assert re.search(rf"<td>{stage}</td><td>[^<]*</td><td class=num>\d+\.\d</td>", table)
    assert "<td>total</td>" in table
    # Loss curves drawn from each trainer's metrics.jsonl.
    for stage in ("vqgan", "t2i", "upsampler"):
        png = wd / "report" / "plots" / f"{stage}_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{stage}_loss.png" in page
    # The judge's acceptance of VQGAN reconstructions (issue 4's criterion), measured.
    vqgan = json.loads((wd / "stages" / "vqgan.json").read_text())["summary"]
    assert vqgan["judged_images"] == 8 and 0.0 <= vqgan["reconstruction_judge_acceptance"] <= 1
    # Every summary value is in the stage table whole (floats to 4 digits), none cut off.
    accepted = vqgan["reconstruction_judge_acceptance"]
    assert f"reconstruction_judge_acceptance {accepted:.4g}" in table
    assert f"codebook_hash {vqgan['codebook_hash']}" in table
    # Accuracy numbers from the eval stage, as in eval/metrics.json.
    metrics = json.loads((wd / "eval" / "metrics.json").read_text())["shapes"]
    ind = metrics["in_distribution"]["accuracy"]
    assert ind is not None and 0.0 <= ind <= 1.0
    assert f"{100 * ind:.1f}%" in page[page.index('id="headline"') :]
    assert metrics["in_distribution"]["num_scenes"] == 3 and metrics["heldout"]["num_scenes"] == 2
    # Sample grid: both prompts, their images linked relatively (opens from file://).
    assert "a large blue triangle above a green square" in page
    assert 'src="../samples/0_0.png"' in page and (wd / "samples" / "0_0.png").exists()
    # The headline printed at the end.
    out = demo_run["stdout"]
    assert f"demo report: {wd / 'report' / 'index.html'}" in out
    assert "in-distribution accuracy" in out and "held-out accuracy" in out
    assert "two-object share" in out and "total time" in out
    # Two judged draws per caption: one draw beside best-of-2 by the contrastive
    # model (the contrastive stage's) and by the judge, in the printout and the page.
    one = metrics["in_distribution"]["one_draw"]["accuracy"]
    assert f"in-distribution accuracy (judge, one draw): {100 * one:.1f}%" in out
    assert "best of 2 draws, in-distribution / held-out" in out and "(oracle)" in out
    assert "near-miss R-precision on real scenes" in out
    assert metrics["scorer"] == "contrastive"
    assert "best of 2 by the contrastive scorer" in page
    contrastive = json.loads((wd / "stages" / "contrastive.json").read_text())["summary"]
    assert contrastive["step"] == 4 and "near_miss_accuracy" in contrastive
    accepted = vqgan["reconstruction_judge_acceptance"]
    assert f"VQGAN reconstructions accepted by the judge: {100 * accepted:.1f}%" in out
    # The inspect stage: its page framed in the report, its figures in the stage record.
    inspect = json.loads((wd / "stages" / "inspect.json").read_text())["summary"]
    assert set(inspect) >= {"in_distribution", "heldout", "probe_color_at_shape_word"}
    assert 0.0 <= inspect["heldout"]["p_true_first_object_cell"] <= 1.0
    section = page[page.index('id="inspect"') :]
    assert 'src="../inspect/index.html"' in section and "Where held-out pairs fail" in section
    assert (wd / "inspect" / "index.html").exists()


def test_second_run_skips_completed_stages(demo_run, tiny_gin, capsys):
    wd = demo_run["workdir"]
    before = {s: (wd / "stages" / f"{s}.json").read_text() for s in demo_lib.STAGES[:-1]}
    assert run_cli(f"--workdir={wd}", f"--gin_file={tiny_gin}") == 0
    out = capsys.readouterr().out
    for stage in demo_lib.STAGES[:-1]:
        assert f"stage {stage} already complete, skipped" in out
        assert (wd / "stages" / f"{stage}.json").read_text() == before[stage]
    assert "demo: stage report done" in out


def test_interrupted_stage_resumes_from_its_checkpoint(demo_run, tiny_gin, capsys):
    """A stage without its record (killed mid-way) runs again; the trainer resumes."""
    wd = demo_run["workdir"]
    (wd / "stages" / "upsampler.json").unlink()
    # What an interrupted attempt leaves: the time it spent.
    partial = wd / "stages" / "upsampler.partial.json"
    partial.write_text(json.dumps({"stage": "upsampler", "seconds": 100.0}))
    lines = (wd / "upsampler" / "metrics.jsonl").read_text().splitlines()
    assert run_cli(f"--workdir={wd}", f"--gin_file={tiny_gin}", "--stage=upsampler") == 0
    out = capsys.readouterr().out
    assert "demo: stage upsampler done" in out and "resumed from" in out
    # Resumed at its last step: nothing trained twice.
    assert (wd / "upsampler" / "metrics.jsonl").read_text().splitlines() == lines
    record = json.loads((wd / "stages" / "upsampler.json").read_text())
    assert record["stage"] == "upsampler" and record["interrupted_seconds"] == 100.0
    assert record["seconds"] >= 100.0 and not partial.exists()


def test_refuses_another_jobs_folder(tmp_path, capsys):
    other = tmp_path / "other_job"
    (other / "checkpoints").mkdir(parents=True)
    assert run_cli(f"--workdir={other}") == 2
    err = capsys.readouterr().err
    assert str(other) in err and "holds no demo" in err and "demo.json" in err
    assert not (other / "demo.json").exists()


def test_bad_stage_name(tmp_path, capsys):
    assert run_cli(f"--workdir={tmp_path / 'd'}", "--stage=vqgann") == 2
    err = capsys.readouterr().err
    assert "vqgann" in err and "choose from" in err and "t2i" in err
    assert not (tmp_path / "d").exists()


def test_stage_without_its_inputs(tmp_path, tiny_gin, capsys):
    assert run_cli(f"--workdir={tmp_path / 'd'}", f"--gin_file={tiny_gin}", "--stage=eval") == 2
    err = capsys.readouterr().err
    assert "stage 'eval' needs stage(s) ['vqgan', 't2i', 'upsampler', 'contrastive']" in err


def test_headline_names_what_each_figure_is():
    """Every draw judged: one draw (draw 0) beside best-of-N and the oracle; a reranked
    eval that judged only its pick: the figure is named as the scorer's best-of-N."""

    def lines(shapes: dict) -> str:
        h = demo_lib.headline({"shapes": shapes}, {"eval": 1.0})
        return demo_lib.format_headline(
            demo_lib.DemoResult(Path("w"), Path("w/report/index.html"), {"eval": 1.0}, [], [], h)
        )

    group = {"accuracy": 0.9, "num_scenes": 10, "one_draw": {"accuracy": 0.8},
             "oracle": {"accuracy": 1.0}, "scorer_agreement": {"rate": 0.5}}  # fmt: skip
    every = lines({"num_samples": 4, "scorer": "contrastive", "in_distribution": group,
                   "heldout": dict(group, accuracy=0.1)})  # fmt: skip
    assert "in-distribution accuracy (judge, one draw): 80.0% of 10 scenes" in every
    assert "best of 4 draws, in-distribution / held-out: 90.0% / 10.0% by the contrastive " in every
    assert "100.0% / 100.0% by the judge (oracle)" in every
    picked = {"accuracy": 0.7, "num_scenes": 10}
    only = lines({"num_samples": 4, "scorer": "contrastive", "in_distribution": picked,
                  "heldout": picked})  # fmt: skip
    assert "in-distribution accuracy (judge, best of 4 by the contrastive scorer): 70.0%" in only
    assert "oracle" not in only
