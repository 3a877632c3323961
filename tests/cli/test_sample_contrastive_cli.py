"""`parti-jax sample` reranked by the contrastive model (tiny pipeline): bound through gin
(`sample.scorer`, `sample.contrastive_path`) or the --contrastive flag; the manifest
records the contrastive model; without one, scorer='contrastive' is a one-line error."""

from __future__ import annotations

import json

import numpy as np

from tests.cli.test_sample_cli import model_flags, run

pytest_plugins = ["tests.pipeline_fixtures"]

SETTINGS = [
    "--gin.sample.sampling_config=@SamplingConfig()",
    "--gin.SamplingConfig.num_samples=3",
    "--gin.SamplingConfig.top_k=32",
    "--gin.SamplingConfig.seed=5",
    "--gin.sample.keep_top_k=2",
    "--gin.sample.scorer='contrastive'",
    "--no_progress",
]
PROMPTS = ["--prompt=a red circle", "--prompt=a small blue square on the left"]


def test_sample_reranked_by_contrastive_model(tiny_pipeline, tmp_path, capsys):
    clip = tiny_pipeline["contrastive"]
    out = tmp_path / "gin"
    code = run(f"--workdir={out}", *model_flags(tiny_pipeline), *PROMPTS, *SETTINGS,
               f"--gin.sample.contrastive_path='{clip}'")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["scorer"] == "contrastive" and len(manifest["images"]) == 4
    record = manifest["models"]["contrastive"]
    assert record["checkpoint"].startswith(clip) and record["step"] > 0
    assert record["image_size"] == 16 and len(record["vocab_sha256"]) == 64
    for pid in (0, 1):
        scores = [e["score"] for e in manifest["images"] if e["prompt_id"] == pid]
        assert np.all(np.isfinite(scores)) and all(abs(s) <= 1.0 + 1e-5 for s in scores)
        assert scores[0] >= scores[1]

    # The --contrastive flag binds the same parameter: the same images and scores.
    flag = tmp_path / "flag"
    code = run(f"--workdir={flag}", *model_flags(tiny_pipeline), *PROMPTS, *SETTINGS,
               f"--contrastive={clip}")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    again = json.loads((flag / "manifest.json").read_text())
    assert [e["score"] for e in again["images"]] == [e["score"] for e in manifest["images"]]

    # Without a contrastive model: one line, before any model loads.
    capsys.readouterr()
    assert run(f"--workdir={tmp_path / 'none'}", *model_flags(tiny_pipeline), *PROMPTS,
               *SETTINGS) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "sample.contrastive_path" in err and "Traceback" not in err
