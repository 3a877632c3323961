"""Eval suites with stand-in generators: sharding, resume, shapes accuracy, reconstruction, FID.

The stand-ins have the Generator's `generate` interface, so these tests check
the suites' logic cheaply; tests/eval/test_suites_pipeline.py runs them on the
tiny trained checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parti_jax.data import prompts as P
from parti_jax.data.shapes import HELDOUT_COMBINATIONS
from parti_jax.eval import contrastive_metrics as CM
from parti_jax.eval import fid as F
from parti_jax.eval import fid_suite, gallery, parti_prompts_suite, reconstruction, shapes_suite
from parti_jax.eval import records as R
from parti_jax.eval import suites as S
from tests.eval.stand_ins import RecordingGenerator, SceneGenerator
from tests.eval.test_inception import random_weights  # noqa: F401 - a fixture (random .npz)

ALL_IDS = set(range(P.NUM_PROMPTS))


def test_parti_prompts_two_processes_then_resume(tmp_path):
    out = tmp_path / "p2"
    gens = [RecordingGenerator(), RecordingGenerator()]
    kw = dict(num_samples=2, keep_top_k=1, seed=3, prompts_per_call=300)
    pending = parti_prompts_suite.run_parti_prompts(
        gens[1], out, process_index=1, process_count=2, **kw
    )
    assert pending["status"] == "pending" and not (out / R.INDEX).exists()
    metrics = parti_prompts_suite.run_parti_prompts(
        gens[0], out, process_index=0, process_count=2, **kw
    )
    halves = [set(g.prompt_ids) for g in gens]
    assert halves[0] == set(range(0, P.NUM_PROMPTS, 2)) and halves[1] == set(
        range(1, P.NUM_PROMPTS, 2)
    )
    assert not halves[0] & halves[1] and halves[0] | halves[1] == ALL_IDS
    assert all(len(c["prompt_ids"]) <= 300 and c["num_samples"] == 2 for c in gens[0].calls)

    records = R.read_manifest(out, check_images=True)
    assert {r.prompt_id for r in records} == ALL_IDS
    assert metrics["num_prompts"] == P.NUM_PROMPTS == metrics["num_images"]
    assert (
        len(metrics["prompts_per_category"]) == 12 and len(metrics["prompts_per_challenge"]) == 11
    )
    rows = P.load_parti_prompts()
    want = {c: sum(r.category == c for r in rows) for c in gallery.PARTI_CATEGORIES}
    assert metrics["prompts_per_category"] == want
    assert metrics["mean_rerank_score"] == pytest.approx(np.mean([r.scores[0] for r in records]))
    assert R.read_metrics(out)["num_prompts"] == P.NUM_PROMPTS
    page = (out / R.INDEX).read_text()
    assert "12 categories · 11 challenges" in page and f"{P.NUM_PROMPTS} prompts" in page

    # A single-process rerun skips everything: no generate call, same records.
    again = RecordingGenerator()
    m2 = parti_prompts_suite.run_parti_prompts(again, out, process_index=0, process_count=1, **kw)
    assert again.calls == [] and m2["this_run"] == {
        "generated": 0,
        "skipped": 1632,
        "seconds": m2["this_run"]["seconds"],
    }
    assert len(R.read_manifest(out)) == P.NUM_PROMPTS

    # Other settings on the same folder are refused, naming the field.
    with pytest.raises(S.SuiteError, match="num_samples=2.*num_samples=4"):
        parti_prompts_suite.run_parti_prompts(
            again, out, process_index=0, process_count=1, **{**kw, "num_samples": 4}
        )


def test_settings_from_a_suites_arguments():
    """A suite's own arguments pick the settings; num_samples / seed default to the config's."""
    from parti_jax.decoding import SamplingConfig

    config = SamplingConfig(num_samples=3, seed=9)
    args = dict(generator=None, num_samples=None, seed=None, keep_top_k=2, world_seed=5,
                sampling_config=config, scorer=_Crash("not a name"), batch_size=None)  # fmt: skip
    settings = S.GenerationSettings.from_args(args)
    assert (settings.num_samples, settings.seed, settings.keep_top_k) == (3, 9, 2)
    assert settings.record()["scorer"] == "_Crash" and settings.image_size is None
    bare = S.GenerationSettings.from_args({"num_samples": None, "seed": None})
    assert (bare.num_samples, bare.seed) == (1, 0)
    with pytest.raises(S.SuiteError, match=r"keep_top_k=4 must be in \[1, num_samples=3\]"):
        S.GenerationSettings.from_args(dict(args, keep_top_k=4))


class _Crash(RuntimeError):
    pass


class _CrashingGenerator(RecordingGenerator):
    def __init__(self, crash_on_call: int):
        super().__init__()
        self.crash_on_call = crash_on_call

    def generate(self, prompts, **kw):
        if len(self.calls) == self.crash_on_call:
            raise _Crash("pre-empted")
        return super().generate(prompts, **kw)


def test_interrupted_run_keeps_its_records_and_resumes(tmp_path):
    out = tmp_path / "p2"
    kw = dict(categories=["Animals"], num_samples=1, seed=0, prompts_per_call=10,
              process_index=0, process_count=1)  # fmt: skip
    animals = [p.index for p in P.load_parti_prompts(categories=["Animals"])]
    with pytest.raises(_Crash):
        parti_prompts_suite.run_parti_prompts(_CrashingGenerator(3), out, **kw)
    kept = {r.prompt_id for r in R.read_manifest(out, check_images=True)}
    assert kept == set(animals[:30])
    gen = RecordingGenerator()
    metrics = parti_prompts_suite.run_parti_prompts(gen, out, **kw)
    assert set(gen.prompt_ids) == set(animals[30:])
    assert metrics["num_prompts"] == len(animals) and metrics["this_run"]["skipped"] == 30
    assert metrics["prompts_per_category"] == {"Animals": len(animals)}


def test_resume_refuses_other_prompts_under_the_same_ids(tmp_path):
    out = tmp_path / "shapes"
    scenes = shapes_suite.shapes_scenes(2, 0)
    shapes_suite.run_shapes(SceneGenerator(scenes), out, num_in_distribution=2, num_heldout=0,
                            process_index=0, process_count=1)  # fmt: skip
    other = shapes_suite.shapes_scenes(2, 0, world_seed=1)
    with pytest.raises(S.SuiteError, match="prompt_id 0 was generated for"):
        shapes_suite.run_shapes(SceneGenerator(other), out, num_in_distribution=2, num_heldout=0,
                                world_seed=1, process_index=0, process_count=1)  # fmt: skip


# --------------------------------------------------------------------------- shapes

N_SCENES = 24


@pytest.fixture(scope="module")
def scenes():
    return shapes_suite.shapes_scenes(N_SCENES, N_SCENES)


def test_perfect_generator_scores_one_and_the_judge_rejects_near_misses(tmp_path, scenes):
    out = tmp_path / "shapes"
    gen = SceneGenerator(scenes)
    m = shapes_suite.run_shapes(gen, out, num_in_distribution=N_SCENES, num_heldout=N_SCENES,
                                prompts_per_call=16, process_index=0, process_count=1)  # fmt: skip
    assert gen.calls == 3
    for group in ("in_distribution", "heldout"):
        g = m[group]
        two = sum(s.num_objects == 2 for s in scenes if s.group == group)
        assert g["num_scenes"] == N_SCENES and g["num_two_object"] == two
        assert g["two_object_share"] == pytest.approx(two / N_SCENES)
        assert 0 < two < N_SCENES
        assert g["accuracy"] == 1.0
        assert g["one_object"]["num_scenes"] + g["two_objects"]["num_scenes"] == N_SCENES
        for a, v in g["attributes"].items():
            assert v["num_stated"] > 0 and v["accuracy"] == 1.0, (group, a)
        assert g["attributes"]["count"]["num_stated"] == N_SCENES
        near = g["near_miss"]
        assert near["num_captions"] >= 3 * N_SCENES and near["false_accept_rate"] <= 0.02
        assert set(near["per_attribute"]) >= {"color", "shape", "count"}
    # The held-out scenes use held-out pairs; in-distribution ones never do.
    held = set(HELDOUT_COMBINATIONS)
    for s in scenes:
        pairs = {(o.color, o.shape) for o in s.spec.objects}
        assert bool(pairs & held) == (s.group == "heldout")
    assert json.loads((out / R.METRICS).read_text())["heldout"]["accuracy"] == 1.0
    report = (out / S.REPORT).read_text()
    assert "two-object share" in report and "judge false-accept rate" in report
    assert report.count('class="card match"') == 2 * N_SCENES


def test_wrong_colour_generator_gets_colour_accuracy_zero(tmp_path, scenes):
    gen = SceneGenerator(scenes, wrong_color=True)
    m = shapes_suite.run_shapes(gen, tmp_path / "shapes", num_in_distribution=N_SCENES,
                                num_heldout=N_SCENES, process_index=0, process_count=1)  # fmt: skip
    for group in ("in_distribution", "heldout"):
        g = m[group]
        assert g["attributes"]["color"]["accuracy"] == 0.0 and g["accuracy"] == 0.0
        assert g["attributes"]["shape"]["accuracy"] == 1.0
        assert g["attributes"]["count"]["accuracy"] == 1.0
        # No image was accepted, so no near miss is certainly wrong: none counted.
        assert g["near_miss"]["num_captions"] == 0 and g["near_miss"]["false_accept_rate"] is None


def test_shapes_report_escapes_captions(tmp_path):
    records = [
        R.PromptRecord(0, "<script>alert(1)</script>", "in_distribution", "one object",
                       images=("images/x.png",), extra={
                           "num_objects": 1, "verdicts": [{"match": False, "attributes": {"color": False}}],
                           "near_misses": []})
    ]  # fmt: skip
    metrics = {
        "num_samples": 1,
        "keep_top_k": 1,
        "scorer": None,
        **shapes_suite.shapes_metrics(records),
    }
    page = shapes_suite.write_report(tmp_path, records, metrics).read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def _judged(pid, group, num_objects, matches, draws=None):
    extra = {
        "num_objects": num_objects,
        "verdicts": [{"match": m, "attributes": {"color": m}} for m in matches],
        "near_misses": [],
    }
    if draws is not None:
        extra["sample_indices"] = draws
    images = tuple(f"images/{pid:05d}_{i}.png" for i in range(len(matches)))
    challenge = shapes_suite.ONE if num_objects == 1 else shapes_suite.TWO
    return R.PromptRecord(pid, f"caption {pid}", group, challenge, images=images, extra=extra)


def test_every_draw_judged_gives_one_draw_best_of_n_oracle_and_scorer_agreement(tmp_path):
    ind, held = "in_distribution", "heldout"
    records = [
        _judged(0, ind, 1, [True, False, False], [2, 0, 1]),  # pick accepted, draw 0 not
        _judged(1, ind, 2, [False, True, False], [0, 1, 2]),  # pick (draw 0) rejected
        _judged(2, ind, 1, [False, False, True], [1, 2, 0]),  # draw 0 accepted, pick not
        _judged(3, ind, 2, [True, True, True], [0, 1, 2]),  # all accepted: no disagreement
        _judged(1_000_000, held, 1, [False, False, False], [0, 1, 2]),
        _judged(1_000_001, held, 2, [False, True, False]),  # judged before draws were recorded
    ]
    m = shapes_suite.shapes_metrics(records, num_samples=3, keep_top_k=3)
    g = m[ind]
    assert (g["one_draw"]["num_accepted"], g["one_draw"]["num_scenes"]) == (2, 4)
    assert g["one_draw"]["one_object"]["accuracy"] == 0.5
    assert g["one_draw"]["two_objects"]["accuracy"] == 0.5
    assert g["best_of_n"]["accuracy"] == g["accuracy"] == 0.5
    assert g["oracle"]["accuracy"] == 1.0 and g["oracle"]["num_accepted"] == 4
    agree = g["scorer_agreement"]
    assert (agree["num_agree"], agree["num_scenes"]) == (1, 3)
    assert agree["rate"] == pytest.approx(1 / 3)
    assert (agree["one_object"]["num_scenes"], agree["two_objects"]["num_scenes"]) == (2, 1)
    h = m[held]
    assert h["one_draw"]["num_scenes"] == 1 and h["one_draw"]["accuracy"] == 0.0
    assert h["oracle"]["accuracy"] == 0.5 and h["best_of_n"]["accuracy"] == 0.0
    assert h["scorer_agreement"]["num_scenes"] == 1 and h["scorer_agreement"]["rate"] == 0.0
    # Not every draw kept (or one draw): no such blocks.
    for kw in ({}, {"num_samples": 4, "keep_top_k": 3}):
        assert not {"one_draw", "oracle"} & set(shapes_suite.shapes_metrics(records, **kw)[ind])
    metrics = {"num_samples": 3, "keep_top_k": 3, "scorer": "contrastive", **m}
    page = shapes_suite.write_report(tmp_path, records, metrics).read_text()
    assert "one draw (draw 0" in page and "oracle (any of 3 draws accepted)" in page
    assert "scorer agreement" in page and "contrastive model&#x27;s image-caption" in page
    assert 'id="contrastive"' not in page


def test_auc_and_r_precision_distractors():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)
    labels = rng.uniform(size=40) < 0.4
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in scores[labels] for b in scores[~labels]])
    assert CM.auc(scores, labels) == pytest.approx(brute)
    assert CM.auc([0.1, 0.9], [False, True]) == 1.0 and CM.auc([1, 2], [True, True]) is None
    d = CM.distractors(5, 200, prompt_id=7, seed=0)
    assert len(set(d.tolist())) == 99 and 5 not in d and d.min() >= 0 and d.max() < 200
    np.testing.assert_array_equal(d, CM.distractors(5, 200, prompt_id=7, seed=0))
    assert sorted(CM.distractors(3, 10, prompt_id=1, seed=0).tolist()) == [
        0,
        1,
        2,
        4,
        5,
        6,
        7,
        8,
        9,
    ]
    assert len(CM.distractors(0, 1, prompt_id=1, seed=0)) == 0


def test_contrastive_scorer_without_a_model_names_eval_contrastive_dir(tmp_path):
    gen = RecordingGenerator()
    with pytest.raises(S.SuiteError, match="eval.contrastive_dir"):
        parti_prompts_suite.run_parti_prompts(gen, tmp_path / "p2", limit=2, scorer="contrastive",
                                              process_index=0, process_count=1)  # fmt: skip
    assert gen.calls == [] and not (tmp_path / "p2").exists()


# --------------------------------------------------------------------------- reconstruction


class _IdentityTokenizer:
    """decode(encode(x)) == x: codes index the images it has seen."""

    image_size = 16
    codebook_size = 64

    def __init__(self):
        self.store = {}

    def encode(self, images):
        codes = np.zeros((len(images), 2, 2), np.int32)
        for i, im in enumerate(images):
            key = len(self.store)
            self.store[key] = np.array(im)
            codes[i] = [[key % 64, 0], [1, 2]]
            codes[i, 1, 1] = key
        return codes

    def decode(self, codes):
        return np.stack([self.store[int(c[1, 1])] for c in codes])


def test_reconstruction_identity_psnr_is_capped_and_usage_counted(tmp_path):
    images = reconstruction.shapes_world_images(image_size=16, batch_size=4)
    m = reconstruction.evaluate_reconstruction(
        _IdentityTokenizer(), tmp_path, images, num_images=8, lpips_net="vgg16"
    )
    vq = m["vqgan"]
    assert m["num_images"] == 8 and vq["psnr"] == reconstruction.PSNR_CAP_DB
    assert vq["psnr_num_identical"] == 8 and vq["mse"] == 0.0
    assert m["lpips_net"] == "vgg16" and vq["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert vq["codebook_used"] == 8 and vq["codebook_usage"] == pytest.approx(8 / 64)
    assert 1.0 < vq["codebook_perplexity"] < 8
    assert json.loads((tmp_path / R.METRICS).read_text())["vqgan"]["psnr"] == 100.0
    assert (tmp_path / S.REPORT).exists() and (tmp_path / "images" / "000_original.png").exists()


def test_psnr_and_codebook_numbers():
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[1] += 0.1  # MSE 0.01 -> 20 dB
    value, identical, _ = reconstruction.psnr_per_image(a, b)
    assert value.tolist() == pytest.approx([100.0, 20.0]) and identical.tolist() == [True, False]
    stats = reconstruction.codebook_stats(np.array([5, 5, 0, 0]))
    assert stats["codebook_usage"] == 0.5 and stats["codebook_perplexity"] == pytest.approx(2.0)
    assert reconstruction.lpips_problem("vgg16", 8) is not None
    assert reconstruction.lpips_problem("vgg16", 16) is None


# --------------------------------------------------------------------------- FID


def _eval_folder(path, n=6, size=8):
    gen = RecordingGenerator(size=size)
    prompts = [R.PromptRecord(i, f"prompt {i}") for i in range(n)]
    settings = S.GenerationSettings(num_samples=1)
    S.generate_suite(gen, path, prompts, settings, process_index=0, process_count=1)
    return path


def test_fid_is_skipped_with_a_clear_message(tmp_path):
    folder = _eval_folder(tmp_path / "gen")
    m = fid_suite.run_fid(tmp_path / "fid", eval_dir="gen", workdir=tmp_path,
                          ref_stats_path=str(tmp_path / "ref.npz"), process_index=0)  # fmt: skip
    assert m["fid"] is None and m["fid_status"] == "skipped"
    assert (
        "no Inception weights given" in m["fid_reason"]
        and "convert_fid_inception" in m["fid_reason"]
    )
    assert "skipped" in (tmp_path / "fid" / S.REPORT).read_text()
    gen = RecordingGenerator()
    m = fid_suite.run_coco_fid(gen, tmp_path / "coco", captions=["a cat"] * 3, num_prompts=2,
                               process_index=0, process_count=1)  # fmt: skip
    assert (
        gen.calls == []
        and m["fid_status"] == "skipped"
        and "no images generated" in m["fid_reason"]
    )
    assert folder.exists()


def _pixel_features(images):
    x = np.asarray(images, np.float64)
    return x.reshape(len(x), -1)[:, :4] + x.mean(axis=(1, 2))[:, :1]


def test_coco_fid_with_injected_features_is_unvalidated_and_resumes(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"caption {i}" for i in range(40)) + "\n")
    rng = np.random.default_rng(0)
    ref = F.save_stats(tmp_path / "ref.npz", rng.uniform(size=4), np.eye(4) * 0.05)
    gen = RecordingGenerator(size=8)
    kw = dict(captions=str(captions), num_prompts=12, prompt_seed=1, image_size=16,
              ref_stats_path=str(ref), feature_fn=_pixel_features, process_index=0,
              process_count=1, inception_batch_size=5)  # fmt: skip
    m = fid_suite.run_coco_fid(gen, tmp_path / "coco", **kw)
    assert m["fid_status"] == "unvalidated" and m["fid_num_images"] == 12
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    records = R.read_manifest(tmp_path / "coco", check_images=True)
    assert len(records) == 12 and len({r.prompt for r in records}) == 12
    assert all(S.load_png(tmp_path / "coco" / r.images[0]).shape == (16, 16, 3) for r in records)
    again = RecordingGenerator(size=8)
    m2 = fid_suite.run_coco_fid(again, tmp_path / "coco", **kw)
    assert again.calls == [] and m2["fid"] == pytest.approx(m["fid"])
    with pytest.raises(S.SuiteError, match="captions were drawn with"):
        fid_suite.run_coco_fid(again, tmp_path / "coco", **{**kw, "num_prompts": 13})


def test_fid_suite_with_random_inception_weights_is_unvalidated(
    tmp_path,
    monkeypatch,
    random_weights,  # noqa: F811 - the imported fixture
):
    """The weights file reaches the network loader and its provenance decides the label.

    The network itself is stubbed: its forward pass on these weights is tested in
    test_inception.py (~15 s on 2 cores), and a 2048-d sqrtm takes minutes here.
    """
    loaded = []

    def stub_network(path):
        loaded.append(path)
        return lambda images: np.asarray(images, np.float64).reshape(len(images), -1)[:, :3]

    monkeypatch.setattr(F, "inception_feature_fn", stub_network)
    _eval_folder(tmp_path / "gen", n=5)
    ref = F.save_stats(tmp_path / "ref.npz", np.full(3, 0.5), np.eye(3) * 0.1)
    m = fid_suite.run_fid(tmp_path / "fid", eval_dir=tmp_path / "gen",
                          inception_params_path=str(random_weights), ref_stats_path=str(ref),
                          batch_size=2, process_index=0)  # fmt: skip
    assert loaded == [str(random_weights)] and m["fid_num_images"] == 5
    assert m["fid_status"] == "unvalidated" and "no provenance record" in m["fid_reason"]
    assert m["fid"] > 0 and "unvalidated" in (tmp_path / "fid" / S.REPORT).read_text()


def test_runner_shares_one_generator_and_settings_and_writes_a_summary(tmp_path):
    import functools

    from parti_jax.decoding import SamplingConfig
    from parti_jax.eval import runner

    gen = RecordingGenerator()
    loads = []
    inputs = runner.SuiteInputs(load_generator=lambda: loads.append(1) or gen)
    fns = {
        "parti_prompts": functools.partial(parti_prompts_suite.run_parti_prompts, limit=7),
        "coco_fid": functools.partial(
            fid_suite.run_coco_fid, captions=["x", "y", "z"], num_prompts=3,
            generate_without_fid=True),
        "fid": functools.partial(fid_suite.run_fid, eval_dir="parti_prompts"),
    }  # fmt: skip
    results = runner.run_eval_suites(
        tmp_path, suites=["parti_prompts", "coco_fid", "fid"], suite_fns=fns, inputs=inputs,
        sampling_config=SamplingConfig(num_samples=3, seed=9), batch_size=6,
        process_index=0, process_count=1,
    )  # fmt: skip
    assert loads == [1] and {c["seed"] for c in gen.calls} == {9}
    # num_samples: the sampling config's, except where a suite sets its own (COCO: 1).
    assert [(c["num_samples"], c["batch_size"]) for c in gen.calls] == [(3, 6)] * 4 + [(1, 6)]
    assert results["parti_prompts"]["num_prompts"] == 7 and results["coco_fid"]["num_prompts"] == 3
    assert results["fid"]["fid_status"] == "skipped"
    summary = R.read_metrics(tmp_path)
    assert set(summary) == {"parti_prompts", "coco_fid", "fid"}
    page = (tmp_path / R.INDEX).read_text()
    assert 'href="parti_prompts/index.html"' in page and 'href="fid/report.html"' in page
    assert "num_prompts = 7" in page
