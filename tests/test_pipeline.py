"""`parti_jax.Pipeline` on the tiny trained pipeline (tests/pipeline_fixtures.py).

A seed draws the codes `Bundle.generate` draws with the same settings, from a
bundle, a run folder, a t2i work directory or a dict alike; a negative prompt
takes the empty prompt's place in guidance ("" is the default); reranked
images come best first; `save_pretrained` writes a bundle that loads back with
the same images; the bundle's model card states the data, sizes, steps and
logged eval figures and is verified like the weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import parti_jax
from parti_jax import bundle as bundle_lib
from parti_jax.bundle import BundleError, load_bundle
from parti_jax.decoding import SamplingConfig
from parti_jax.pipeline import Pipeline, PipelineOutput
from tests.pipeline_fixtures import export_tiny_bundle

pytest_plugins = ["tests.pipeline_fixtures"]

PROMPTS = ["a red circle above a blue square", "a small green cross"]
CONFIG = SamplingConfig(temperature=1.0, top_k=32, guidance_scale=1.5, num_samples=4, seed=3)


@pytest.fixture(scope="module")
def bundle_dir(tiny_pipeline, tmp_path_factory):
    return export_tiny_bundle(tiny_pipeline, tmp_path_factory.mktemp("pipeline") / "bundle", CONFIG)


@pytest.fixture(scope="module")
def pipe(bundle_dir):
    return parti_jax.Pipeline.from_pretrained(bundle_dir)


def test_same_seed_same_codes_as_bundle_generate(pipe, bundle_dir):
    out = pipe(PROMPTS, num_images=4, seed=5, output_type="np")
    again = pipe(PROMPTS, num_images=4, seed=5, output_type="np")
    assert isinstance(out, PipelineOutput) and out.scores is None and out.seed == 5
    assert out.codes.shape == (2, 4, 4, 4) and out.images.shape == (2, 4, 64, 64, 3)
    np.testing.assert_array_equal(out.codes, again.codes)
    np.testing.assert_array_equal(out.sample_indices, np.tile(np.arange(4), (2, 1)))
    # Bundle.generate with the same settings (the bundle's sampling_config, draw order).
    results = load_bundle(bundle_dir).generate(PROMPTS, num_samples=4, keep_top_k=4,
                                               scorer="none", seed=5)  # fmt: skip
    np.testing.assert_array_equal(out.codes, np.stack([r.codes for r in results]))
    np.testing.assert_allclose(out.images, np.stack([r.images for r in results]))
    other = pipe(PROMPTS, num_images=4, seed=6, output_type="np")
    assert not np.array_equal(other.codes, out.codes)
    # One prompt alone draws what it drew in the batch (prompt id 0).
    [first] = pipe(PROMPTS[0], num_images=4, seed=5, output_type="np").codes
    np.testing.assert_array_equal(first, out.codes[0])


def test_pil_output_reranked_best_first(pipe):
    out = pipe(PROMPTS, num_images=4, seed=5, rerank="likelihood", keep=2)
    assert len(out.images) == 2 and all(len(images) == 2 for images in out.images)
    image = out.images[0][0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert out.scores.shape == (2, 2) and np.all(np.diff(out.scores, axis=1) <= 0)
    # The kept images are the best draws of the unreranked call.
    drawn = pipe(PROMPTS, num_images=4, seed=5, output_type="np")
    for p in range(2):
        np.testing.assert_array_equal(out.codes[p], drawn.codes[p][out.sample_indices[p]])
    contrastive = pipe(PROMPTS[0], num_images=4, seed=5, rerank="contrastive")
    assert np.all(np.abs(contrastive.scores) <= 1 + 1e-5)  # cosine similarities


def test_negative_prompt(pipe):
    base = pipe(PROMPTS, num_images=4, seed=5, output_type="np")
    empty = pipe(PROMPTS, num_images=4, seed=5, output_type="np", negative_prompt="")
    np.testing.assert_array_equal(empty.codes, base.codes)  # "" is the default
    negative = pipe(PROMPTS, num_images=4, seed=5, output_type="np",
                    negative_prompt="a large yellow triangle")  # fmt: skip
    assert not np.array_equal(negative.codes, base.codes)
    # One per prompt: prompt 0 with "" keeps its default draws, prompt 1 changes.
    mixed = pipe(PROMPTS, num_images=4, seed=5, output_type="np",
                 negative_prompt=["", "a large yellow triangle"])  # fmt: skip
    np.testing.assert_array_equal(mixed.codes[0], base.codes[0])
    np.testing.assert_array_equal(mixed.codes[1], negative.codes[1])
    with pytest.raises(ValueError, match="negative_prompt needs classifier-free guidance"):
        pipe(PROMPTS[0], negative_prompt="x", sampling_config=SamplingConfig(guidance_scale=None))
    with pytest.raises(ValueError, match="negative_prompts: 3 given for 2 prompts"):
        pipe(PROMPTS, negative_prompt=["a", "b", "c"])


def test_bad_arguments_name_the_field(pipe, tmp_path):
    for kwargs, field in (
        ({"num_images": 0}, "num_images"),
        ({"num_images": 2.5}, "num_images"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"temperature": float("nan")}, "temperature"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"rerank": "clip"}, "rerank"),
        ({"keep": 9}, "keep"),
    ):
        with pytest.raises(ValueError, match=field):
            pipe(PROMPTS[0], **kwargs)
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        Pipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a bundle holds its own models"):
        Pipeline.from_pretrained(pipe.source["bundle"], vqgan="/elsewhere")


def test_save_pretrained_round_trip_from_bundle(pipe, tmp_path):
    out = tmp_path / "saved"
    info = pipe.save_pretrained(out)
    assert set(info["files"]) | {"bundle.json"} == {f.name for f in out.iterdir()}
    loaded = Pipeline.from_pretrained(out)
    assert loaded.sampling_config == CONFIG
    a = pipe(PROMPTS, num_images=4, seed=9, output_type="np")
    b = loaded(PROMPTS, num_images=4, seed=9, output_type="np")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.images, b.images)
    with pytest.raises(BundleError, match="a bundle is already there"):
        pipe.save_pretrained(out)
    pipe.save_pretrained(out, overwrite=True)


def test_work_directories_every_form(tiny_pipeline, bundle_dir, tmp_path):
    p = tiny_pipeline
    config = dict(sampling_config=CONFIG)
    run_folder = Pipeline.from_pretrained(p["root"], **config)  # t2i/, vqgan/, upsampler/, ...
    assert run_folder.source["upsampler"] and run_folder.source["contrastive"]
    inferred = Pipeline.from_pretrained(p["t2i"], upsampler=p["upsampler"], **config)
    assert inferred.source["vqgan"] == p["vqgan"]  # from codes_meta.vqgan_checkpoint
    as_dict = Pipeline.from_pretrained(
        {"t2i": p["t2i"], "vqgan": p["vqgan"], "upsampler": p["upsampler"]}, **config
    )
    bundle = Pipeline.from_pretrained(bundle_dir)
    codes = [x(PROMPTS, num_images=4, seed=2).codes for x in (run_folder, inferred, as_dict)]
    expected = bundle(PROMPTS, num_images=4, seed=2).codes
    for c in codes:
        np.testing.assert_array_equal(c, expected)
    no_upsampler = Pipeline.from_pretrained(p["root"], upsampler=False, **config)
    assert no_upsampler(PROMPTS[0], num_images=1).images[0][0].size == (16, 16)
    # save_pretrained from work directories: the export writer; loads back, same draws.
    saved = tmp_path / "from_workdirs"
    info = run_folder.save_pretrained(saved, jax_export=False)
    assert "README.md" in info["files"] and "contrastive" in info["weights"]
    reloaded = Pipeline.from_pretrained(saved)
    assert reloaded.sampling_config == CONFIG
    np.testing.assert_array_equal(reloaded(PROMPTS, num_images=4, seed=2).codes, expected)
    with pytest.raises(ValueError, match="no vqgan work directory|pass vqgan="):
        Pipeline.from_pretrained({"t2i": p["t2i"]})


def test_model_card(bundle_dir, tmp_path):
    info = json.loads((bundle_dir / "bundle.json").read_text())
    card = (bundle_dir / "README.md").read_text()
    assert info["files"]["README.md"]["sha256"] == bundle_lib.file_sha256(bundle_dir / "README.md")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: parti_jax" in front and "- text-to-image" in front
    assert "license: other" in front and "shapes-world" in front  # synthetic data
    assert "`shapes_pixels`" in body  # the source task
    for group in ("t2i", "vqgan", "upsampler", "contrastive"):
        assert f"| {info['weights'][group]['params']:,} |" in body
    assert "| 12 |" in body and "| 300 |" in body  # training steps (t2i, contrastive)
    # The contrastive trainer's last logged evaluation (tests/pipeline_fixtures.py).
    assert "| contrastive (step 300) | near_miss_accuracy |" in body
    assert "## Intended use and limits" in body
    # Verified like the weights: a changed card fails the load, naming it.
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    (copy / "README.md").write_text(card + "\nedited\n")
    with pytest.raises(BundleError, match="README.md"):
        load_bundle(copy)


def test_model_card_of_a_demo_folder_has_its_eval_headline(tiny_pipeline, tmp_path):
    demo = tmp_path / "demo"
    for part in ("t2i", "vqgan"):
        shutil.copytree(tiny_pipeline[part], demo / part)
    (demo / "demo.json").write_text("{}")
    (demo / "stages").mkdir()
    headline = {"in_distribution_accuracy": 0.955, "heldout_accuracy": 0.0,
                "total_seconds": 12.0, "scorer": "contrastive"}  # fmt: skip
    (demo / "stages" / "eval.json").write_text(
        json.dumps({"stage": "eval", "summary": {"headline": headline}})
    )
    Pipeline.from_pretrained(demo).save_pretrained(tmp_path / "bundle", jax_export=False)
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "| demo eval | in_distribution_accuracy | 0.955 |" in card
    assert "| demo eval | heldout_accuracy | 0 |" in card
    assert "total_seconds" not in card and "scorer |" not in card  # timing, text: left out


def test_save_to_and_load_from_a_url(pipe, gcs):
    url = gcs.url("saved")
    info = pipe.save_pretrained(url)  # copied and uploaded, bundle.json last
    assert set(info["files"]) | {"bundle.json"} <= set(gcs.objects("saved"))
    loaded = Pipeline.from_pretrained(url)
    a = pipe(PROMPTS, num_images=4, seed=4, output_type="np")
    np.testing.assert_array_equal(loaded(PROMPTS, num_images=4, seed=4, output_type="np").codes,
                                  a.codes)  # fmt: skip
    back = Pipeline.from_pretrained(url).save_pretrained(gcs.url("saved_again"))
    assert back["files"]["README.md"] == info["files"]["README.md"]
