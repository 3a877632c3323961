"""Eval suites on the tiny trained checkpoints (tests/pipeline_fixtures.py).

The PartiPrompts test generates all 1632 prompts x 2 samples with the tiny
encoder-decoder (4x4 grid, 16px VQGAN) in 512-row batches: one compile, seven
sampling calls (about 22 s on the loaded 2-core machine). The other tests
reuse that batch size, so they reuse the compiled sampler.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

import gin
from parti_jax.cli import main as cli
from parti_jax.data import prompts as P
from parti_jax.eval import gallery, parti_prompts_suite, reconstruction, shapes_suite
from parti_jax.eval import records as R
from parti_jax.eval import suites as S

pytest_plugins = ["tests.pipeline_fixtures"]
# Shapes captions and PartiPrompts run past the tiny model's 16 text tokens.
pytestmark = pytest.mark.filterwarnings("ignore::parti_jax.sampling.PromptTruncatedWarning")


class Counting:
    """Wraps a generator and counts generate() calls and prompts."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.prompt_ids: list[int] = []

    def generate(self, prompts, **kw):
        self.calls += 1
        self.prompt_ids += list(kw["prompt_ids"])
        return self.inner.generate(prompts, **kw)


@pytest.fixture(scope="module")
def generator(tiny_pipeline):
    from parti_jax.sampling import Generator

    p = tiny_pipeline
    return Generator.load(p["t2i"], p["vqgan"], vocab_path=p["vocab"])


def test_parti_prompts_all_1632_prompts_resume_and_shards(generator, tmp_path):
    out = tmp_path / "p2"
    kw = dict(num_samples=2, keep_top_k=1, seed=0, batch_size=512, prompts_per_call=256)
    gen = Counting(generator)
    start = time.perf_counter()
    metrics = parti_prompts_suite.run_parti_prompts(
        gen, out, process_index=0, process_count=1, **kw
    )
    first_run = time.perf_counter() - start
    print(f"PartiPrompts 1632 prompts x 2 samples: {first_run:.1f} s, {gen.calls} calls")
    assert gen.calls == 7 and sorted(gen.prompt_ids) == list(range(P.NUM_PROMPTS))

    rows = P.load_parti_prompts()
    records = R.read_manifest(out, check_images=True)
    assert len(records) == P.NUM_PROMPTS == metrics["num_prompts"] == metrics["num_images"]
    assert metrics["prompts_per_category"] == dict(Counter(r.category for r in rows))
    assert metrics["prompts_per_challenge"] == dict(Counter(r.challenge for r in rows))
    assert (
        len(metrics["prompts_per_category"]) == 12 and len(metrics["prompts_per_challenge"]) == 11
    )
    assert np.isfinite(metrics["mean_rerank_score"])
    by_id = {r.prompt_id: r for r in records}
    assert all(by_id[r.index].prompt == r.prompt for r in rows)
    assert S.load_png(out / records[0].images[0]).shape == (16, 16, 3)

    page = (out / R.INDEX).read_text()
    assert "1632 prompts · 1632 images · 12 categories · 11 challenges" in page
    for name, count in metrics["prompts_per_category"].items():
        esc = name.replace("&", "&amp;")
        assert f'data-name="{esc}">{esc}</button></td><td class="num count">{count}<' in page
    for name in gallery.PARTI_CHALLENGES:
        assert f'data-group="challenge" data-name="{name.replace("&", "&amp;")}"' in page

    # Resume: nothing left to generate.
    again = Counting(generator)
    start = time.perf_counter()
    m2 = parti_prompts_suite.run_parti_prompts(again, out, process_index=0, process_count=1, **kw)
    print(f"resume: {time.perf_counter() - start:.1f} s")
    assert again.calls == 0 and m2["this_run"]["skipped"] == P.NUM_PROMPTS
    assert m2["prompts_per_category"] == metrics["prompts_per_category"]

    # Two processes over the first 40 prompts: disjoint halves whose union is everything,
    # and the same images as the single-process run (seeds fold in the prompt id).
    shards = tmp_path / "shards"
    gens = [Counting(generator), Counting(generator)]
    for i in (1, 0):
        parti_prompts_suite.run_parti_prompts(
            gens[i], shards, limit=40, process_index=i, process_count=2, **kw
        )
    halves = [set(g.prompt_ids) for g in gens]
    assert halves == [set(range(0, 40, 2)), set(range(1, 40, 2))]
    merged = R.read_manifest(shards, check_images=True)
    assert sorted(r.prompt_id for r in merged) == list(range(40))
    for r in merged:
        a = S.load_png(shards / r.images[0])
        b = S.load_png(out / by_id[r.prompt_id].images[0])
        np.testing.assert_array_equal(a, b)
    assert (shards / R.INDEX).exists() and R.read_metrics(shards)["num_prompts"] == 40


def test_shapes_suite_metrics_structure_on_tiny_checkpoints(generator, tmp_path):
    n = 12
    m = shapes_suite.run_shapes(
        generator, tmp_path / "shapes", num_in_distribution=n, num_heldout=n, num_samples=2,
        keep_top_k=2, scorer="shapes_judge", batch_size=512, process_index=0, process_count=1,
    )  # fmt: skip
    scenes = shapes_suite.shapes_scenes(n, n)
    for group in ("in_distribution", "heldout"):
        g = m[group]
        two = sum(s.num_objects == 2 for s in scenes if s.group == group)
        assert g["num_scenes"] == n and g["num_two_object"] == two
        assert g["two_object_share"] == pytest.approx(two / n)
        assert g["one_object"]["num_scenes"] == n - two and g["two_objects"]["num_scenes"] == two
        assert g["all_kept_images"]["num_images"] == 2 * n
        assert 0.0 <= g["accuracy"] <= 1.0
        assert set(g["attributes"]) == {"color", "shape", "size", "position", "relation", "count"}
        assert g["attributes"]["count"]["num_stated"] == n
        for v in g["attributes"].values():
            assert v["accuracy"] is None or 0.0 <= v["accuracy"] <= 1.0
        near = g["near_miss"]
        assert near["num_captions"] + near["num_excluded"] >= 5 * n
        assert near["false_accept_rate"] is None or 0.0 <= near["false_accept_rate"] <= 1.0
    records = R.read_manifest(tmp_path / "shapes", check_images=True)
    assert len(records) == 2 * n and all(len(r.images) == 2 for r in records)
    assert S.load_png(tmp_path / "shapes" / records[0].images[0]).shape == (16, 16, 3)
    assert all(r.scores[0] >= r.scores[1] for r in records)  # reranked by the judge
    assert "the reranker is the judge itself" in (tmp_path / "shapes" / S.REPORT).read_text()


def test_reconstruction_suite_on_tiny_vqgan_and_upsampler(tiny_pipeline, tmp_path):
    from parti_jax.loading import load_upsampler
    from parti_jax.vqgan.tokenizer import ImageTokenizer

    tok = ImageTokenizer.load(tiny_pipeline["vqgan"])
    up = load_upsampler(tiny_pipeline["upsampler"])

    def mean_abs(a, b):  # LPIPS itself costs ~20 s of compiling per image size here
        return np.abs(np.asarray(a) - np.asarray(b)).mean(axis=(1, 2, 3))

    m = reconstruction.run_reconstruction(
        tok, tmp_path / "recon", upsampler=up, num_images=12, batch_size=6, lpips_fn=mean_abs,
        process_index=0,
    )  # fmt: skip
    vq, us = m["vqgan"], m["upsampler"]
    assert m["num_images"] == 12 and vq["image_size"] == 16 and m["lpips_net"] == "custom"
    for value in (vq["psnr"], vq["lpips"], us["psnr"], us["lpips"], us["bicubic"]["psnr"],
                  us["bicubic"]["lpips"], vq["codebook_perplexity"]):  # fmt: skip
        assert np.isfinite(value)
    assert 0.0 < vq["codebook_usage"] <= 1.0 and vq["codebook_used"] >= 1
    assert (us["input_size"], us["output_size"]) == (16, 64)
    assert us["psnr_gain_over_bicubic"] == pytest.approx(us["psnr"] - us["bicubic"]["psnr"])
    report = (tmp_path / "recon" / S.REPORT).read_text()
    assert "vqgan.codebook_usage" in report and "images/000_upsampled.png" in report


def test_eval_cli_runs_gin_selected_suites(tiny_pipeline, tmp_path, capsys):
    p = tiny_pipeline
    work = tmp_path / "work"
    argv = [
        "eval", "--gin_file=runs/eval_shapes.gin", f"--workdir={work}",
        f"--gin.eval.checkpoint_dir='{p['t2i']}'", f"--gin.eval.vqgan_dir='{p['vqgan']}'",
        f"--gin.eval.vocab_path='{p['vocab']}'", "--gin.eval.batch_size=512",
        "--gin.shapes.num_in_distribution=4", "--gin.shapes.num_heldout=4",
        "--gin.reconstruction.num_images=8", "--gin.reconstruction.lpips_net=None",
    ]  # fmt: skip
    try:
        assert cli.main(argv) == 0
    finally:
        gin.clear_config()
    out = capsys.readouterr().out
    assert "shapes: in_distribution.accuracy=" in out and "reconstruction: vqgan.psnr=" in out
    summary = R.read_metrics(work)
    assert summary["shapes"]["in_distribution"]["num_scenes"] == 4
    assert summary["reconstruction"]["lpips_net"] is None
    assert (work / "shapes" / S.REPORT).exists() and (work / "operative_config.gin").exists()
