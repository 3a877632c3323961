"""`parti-jax sample` end to end on the tiny trained checkpoints: PNGs + manifest.json.

Runs the console script's `main` in process (no subprocess: the compiled
functions and the session's checkpoints are shared).
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import gin
from parti_jax.cli import main as cli

pytest_plugins = ["tests.pipeline_fixtures"]


def run(*argv: str) -> int:
    try:
        return cli.main(["sample", *argv])
    finally:
        gin.clear_config()


def model_flags(p: dict) -> list[str]:
    return [f"--t2i={p['t2i']}", f"--vqgan={p['vqgan']}", f"--upsampler={p['upsampler']}"]


SETTINGS = [
    "--gin.sample.sampling_config=@SamplingConfig()",
    "--gin.SamplingConfig.num_samples=3",
    "--gin.SamplingConfig.top_k=32",
    "--gin.SamplingConfig.temperature=1.5",
    "--gin.SamplingConfig.guidance_scale=1.5",
    "--gin.SamplingConfig.seed=7",
    "--gin.sample.keep_top_k=2",
    "--gin.sample.save_low_res=True",
    "--no_progress",
]


def test_sample_writes_pngs_and_manifest(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "samples"
    prompts = ["a red circle", "a small blue square on the left"]
    code = run(
        f"--workdir={out}",
        *model_flags(tiny_pipeline),
        *[f"--prompt={p}" for p in prompts],
        *SETTINGS,
    )
    assert code == 0, capsys.readouterr().err
    assert "wrote 4 image(s)" in capsys.readouterr().out
    for pid in (0, 1):
        for rank in (0, 1):
            with Image.open(out / f"{pid}_{rank}.png") as im:
                assert im.size == (64, 64) and im.mode == "RGB"  # upsampled 16 -> 64
            with Image.open(out / "low_res" / f"{pid}_{rank}.png") as im:
                assert im.size == (16, 16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_prompts"] == 2 and len(manifest["images"]) == 4
    first = manifest["images"][0]
    assert {"prompt", "prompt_id", "seed", "sample_index", "score", "rank", "file"} <= set(first)
    assert first["prompt"] == prompts[0] and first["seed"] == 7 and first["rank"] == 0
    scores = [e["score"] for e in manifest["images"] if e["prompt_id"] == 0]
    assert scores[0] >= scores[1]
    models = manifest["models"]
    assert models["encoder_decoder"]["step"] == 12 and models["upsampler"]["step"] == 4
    assert models["vqgan"]["codebook_hash"] == manifest["codebook_hash"]
    assert len(models["encoder_decoder"]["params_hash"]) == 16
    assert manifest["sampling"]["num_samples"] == 3 and manifest["sampling"]["keep_top_k"] == 2
    assert (out / "config.gin").exists() and (out / "operative_config.gin").exists()

    # The same seed from a prompts file (same prompt ids) gives the same images.
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n\n")
    again = tmp_path / "again"
    code = run(f"--workdir={again}", *model_flags(tiny_pipeline),
               f"--prompts_file={prompts_file}", *SETTINGS)  # fmt: skip
    assert code == 0
    for name in ("0_0.png", "1_1.png"):
        a, b = np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name))
        np.testing.assert_array_equal(a, b)


def test_sample_from_shapes_world_captions(tiny_pipeline, tmp_path):
    out = tmp_path / "task"
    code = run(f"--workdir={out}", *model_flags(tiny_pipeline), "--task=shapes_world",
               "--split=validation", "--num_prompts=2", *SETTINGS,
               "--gin.sample.scorer='shapes_judge'")  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    from parti_jax.data import shapes

    assert [e["prompt"] for e in manifest["images"][::2]] == [
        shapes.generate_scene(i, "validation")[1] for i in range(2)
    ]
    assert manifest["sampling"]["scorer"] == "shapes_judge"


def test_bad_input_is_one_line_error(tiny_pipeline, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run(f"--workdir={tmp_path / 'o'}", *model_flags(tiny_pipeline),
               f"--prompts_file={empty}") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "empty.txt: no prompts (the file is empty)" in err and "Traceback" not in err

    assert run(f"--workdir={tmp_path / 'o'}", "--prompt=a red circle") == 2
    assert "sample.t2i_path" in capsys.readouterr().err

    assert run(f"--workdir={tmp_path / 'o'}") == 2
    assert "pass --prompt" in capsys.readouterr().err

    # A trio that does not belong together: the VQGAN as its own upsampler dir.
    assert run(f"--workdir={tmp_path / 'o'}", f"--t2i={tiny_pipeline['t2i']}",
               f"--vqgan={tiny_pipeline['vqgan']}", f"--upsampler={tiny_pipeline['vqgan']}",
               "--prompt=a red circle") == 2  # fmt: skip
    assert "not an upsampler work directory" in capsys.readouterr().err


def test_over_long_prompt_warns_on_stderr(tiny_pipeline, tmp_path, capsys):
    long = "a red circle " + " ".join(["and a big blue square"] * 10)
    code = run(f"--workdir={tmp_path / 'long'}", *model_flags(tiny_pipeline), f"--prompt={long}",
               *SETTINGS)  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "parti-jax: warning: 1 prompt(s) longer than the encoder's 16 text tokens" in err
    assert "#0 'a red circle and a big blue square" in err
    manifest = json.loads((tmp_path / "long" / "manifest.json").read_text())
    assert all(e["truncated"] for e in manifest["images"])


def test_prompts_checked_at_the_door(tiny_pipeline, tmp_path, capsys):
    """A non-UTF-8 --prompt (bytes in argv) was a 40-line SentencePiece traceback after the
    models loaded: now one line naming the flag, exit 2, and nothing written."""
    import os
    import subprocess
    import sys

    out = tmp_path / "bytes"
    argv = [sys.executable, "-m", "parti_jax", "sample", f"--workdir={out}",
            *model_flags(tiny_pipeline), "--prompt=a red circle", b"--prompt=a \xff circle",
            "--no_progress", *SETTINGS]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, timeout=300, env=dict(os.environ))
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 2, err[-5:]
    assert err == ["parti-jax: error: --prompt 2: not valid Unicode (lone surrogate '\\udcff' "
                   "at character 2: byte 0xff that is not UTF-8); use UTF-8 text"]  # fmt: skip
    assert not out.exists()

    # An empty prompt samples unconditionally: refused unless asked for.
    assert run(f"--workdir={out}", *model_flags(tiny_pipeline), "--prompt=", *SETTINGS) == 2
    assert "--prompt 1: empty prompt" in capsys.readouterr().err and not out.exists()
    code = run(f"--workdir={out}", *model_flags(tiny_pipeline), "--prompt=", "--allow_empty_prompt",
               *SETTINGS)  # fmt: skip
    assert (
        code == 0 and json.loads((out / "manifest.json").read_text())["images"][0]["prompt"] == ""
    )
