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


@pytest.fixture()
def with_contrastive(generator, tiny_pipeline, monkeypatch):
    """The module's generator carrying the tiny contrastive model (as eval.contrastive_dir
    loads it), so the compiled sampler is reused."""
    from parti_jax.contrastive.scorer import ContrastiveModel

    model = ContrastiveModel.load(tiny_pipeline["contrastive"])
    monkeypatch.setattr(generator, "contrastive", model, raising=False)
    return generator


def _in(value, low=0.0, high=1.0):
    return value is None or low <= value <= high


def test_shapes_suite_every_draw_and_contrastive_blocks(with_contrastive, tmp_path):
    n, out = 8, tmp_path / "shapes"
    kw = dict(num_in_distribution=n, num_heldout=n, batch_size=512, process_index=0,
              process_count=1)  # fmt: skip
    m = shapes_suite.run_shapes(
        with_contrastive, out, num_samples=2, keep_top_k=2, scorer="contrastive", **kw
    )
    assert m["scorer"] == "contrastive" and m["contrastive_model"]["image_size"] == 16
    for group in ("in_distribution", "heldout"):
        g = m[group]
        for name in ("one_draw", "best_of_n", "oracle"):
            block = g[name]
            assert block["num_scenes"] == n and _in(block["accuracy"]), (group, name)
            assert block["one_object"]["num_scenes"] + block["two_objects"]["num_scenes"] == n
        assert g["best_of_n"]["accuracy"] == g["accuracy"]
        assert g["oracle"]["accuracy"] >= g["best_of_n"]["accuracy"]
        assert g["oracle"]["accuracy"] >= g["one_draw"]["accuracy"]
        agree = g["scorer_agreement"]
        assert 0 <= agree["num_scenes"] <= n and _in(agree["rate"])
        c = g["contrastive"]
        assert c["num_scenes"] == n
        assert _in(c["clip_score"], -1.0, 1.0) and _in(c["clip_score_real"], -1.0, 1.0)
        for kind in ("r_precision_generated", "r_precision_real"):
            rp = c[kind]
            assert rp["num_scenes"] == n and 0.0 <= rp["r_precision"] <= 1.0
            assert set(rp["per_attribute"]) == set(g["attributes"])
            assert rp["num_near_misses"] >= 3 * n  # colour, shape and count at least
            for a in ("color", "shape", "count"):
                assert rp["per_attribute"][a]["num_near_misses"] == n
            assert all(_in(v["r_precision"]) for v in rp["per_attribute"].values())
        agreement = c["agreement_with_judge"]
        assert agreement["num_images"] == 2 * n and _in(agreement["auc"])
    records = R.read_manifest(out, check_images=True)
    assert all(sorted(r.extra["sample_indices"]) == [0, 1] for r in records)
    assert all(r.scores[0] >= r.scores[1] for r in records)  # reranked by the contrastive model
    # The clip score is the contrastive model's similarity of the saved best images.
    ind = [r for r in records if r.category == "in_distribution"]
    images = np.stack([S.load_png(out / r.images[0]) for r in ind]).astype(np.float32) / 255
    sims = with_contrastive.contrastive.similarity(images, [r.prompt for r in ind])
    assert m["in_distribution"]["contrastive"]["clip_score"] == pytest.approx(sims.mean(), abs=1e-5)
    report = (out / S.REPORT).read_text()
    expected = [
        "one draw (draw 0", "best of 2", "oracle (any of 2 draws", "scorer agreement",
        "An in-project contrastive model scores in-project images", "R-precision, real",
        "agreement with the judge (AUC", "contrastive model&#x27;s image-caption",
    ]  # fmt: skip
    for text in expected:
        assert text in report, text

    # Draw 0 is the image of a 1-draw eval with the same seed.
    one = shapes_suite.run_shapes(with_contrastive, tmp_path / "one", scorer="none", **kw)
    assert "one_draw" not in one["in_distribution"]
    singles = {r.prompt_id: r for r in R.read_manifest(tmp_path / "one")}
    for r in records:
        first = S.load_png(out / r.images[r.extra["sample_indices"].index(0)])
        np.testing.assert_array_equal(
            first, S.load_png(tmp_path / "one" / singles[r.prompt_id].images[0])
        )
    for group in ("in_distribution", "heldout"):
        assert m[group]["one_draw"]["accuracy"] == one[group]["accuracy"]


def test_parti_prompts_and_coco_with_a_contrastive_model(with_contrastive, tmp_path):
    from parti_jax.eval import fid_suite

    kw = dict(num_samples=1, seed=0, batch_size=512, process_index=0, process_count=1)
    m = parti_prompts_suite.run_parti_prompts(with_contrastive, tmp_path / "p2", limit=30, **kw)
    assert m["contrastive_num_images"] == 30 and m["r_precision_distractors"] == 29
    assert -1.0 <= m["clip_score"] <= 1.0 and 0.0 <= m["r_precision"] <= 1.0
    for group in ("category", "challenge"):
        assert list(m[f"clip_score_per_{group}"]) == list(m[f"prompts_per_{group}"])
        assert set(m[f"r_precision_per_{group}"]) == set(m[f"prompts_per_{group}"])
        assert all(0.0 <= v <= 1.0 for v in m[f"r_precision_per_{group}"].values())
    assert R.read_metrics(tmp_path / "p2")["contrastive_model"]["step"] > 0

    captions = [s.caption for s in shapes_suite.shapes_scenes(12, 0)]
    c = fid_suite.run_coco_fid(with_contrastive, tmp_path / "coco", captions=captions,
                               num_prompts=12, image_size=None, generate_without_fid=True,
                               **kw)  # fmt: skip
    assert c["fid_status"] == "skipped" and c["contrastive_num_images"] == 12
    assert -1.0 <= c["clip_score"] <= 1.0 and 0.0 <= c["r_precision"] <= 1.0
    assert c["r_precision_distractors"] == len(set(captions)) - 1
    assert "clip_score" in (tmp_path / "coco" / S.REPORT).read_text()


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


def test_eval_cli_contrastive_dir_and_its_clear_absence(tiny_pipeline, tmp_path, capsys):
    p = tiny_pipeline
    common = [
        "eval", "--gin_file=runs/eval_shapes.gin", f"--gin.eval.checkpoint_dir='{p['t2i']}'",
        f"--gin.eval.vqgan_dir='{p['vqgan']}'", f"--gin.eval.vocab_path='{p['vocab']}'",
        "--gin.eval.batch_size=512", "--gin.eval.suites=['shapes']",
        "--gin.shapes.num_in_distribution=4", "--gin.shapes.num_heldout=4",
        "--gin.shapes.num_samples=2", "--gin.shapes.keep_top_k=2",
        "--gin.shapes.scorer='contrastive'",
    ]  # fmt: skip
    work = tmp_path / "work"
    try:
        argv = [*common, f"--workdir={work}", f"--gin.eval.contrastive_dir='{p['contrastive']}'"]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "in_distribution.oracle.accuracy=" in out
        assert "in_distribution.contrastive.clip_score=" in out
        shapes = R.read_metrics(work)["shapes"]
        assert shapes["scorer"] == "contrastive" and "contrastive" in shapes["heldout"]
        assert "contrastive_dir" in (work / "operative_config.gin").read_text()
    finally:
        gin.clear_config()
    try:
        assert cli.main([*common, f"--workdir={tmp_path / 'none'}"]) == 2
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert "shapes.scorer='contrastive' needs a contrastive model" in err
    assert "eval.contrastive_dir" in err
