"""A bundle with the contrastive reranker (`parti-jax export --contrastive`): its files
are listed and hashed in bundle.json, `load_bundle` loads the model, and
`generate(..., scorer='contrastive')` scores as the work directory's model does;
a bundle without one names what is missing; damaged files name the file; a bundle
at a gs:// URL works the same."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from parti_jax.bundle import BundleError, load_bundle
from parti_jax.decoding import SamplingConfig
from parti_jax.export import export_bundle, inspect_path
from tests.pipeline_fixtures import export_tiny_bundle

pytest_plugins = ["tests.pipeline_fixtures"]

PROMPT = "a red circle above a blue square"
CONFIG = SamplingConfig(temperature=1.0, top_k=32, num_samples=2, seed=3)
FILES = ("contrastive.safetensors", "contrastive_config.json")


@pytest.fixture(scope="module")
def contrastive_bundle(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive_export") / "bundle"
    return export_tiny_bundle(tiny_pipeline, out, CONFIG)


def _check_scores(bundle, contrastive_dir):
    from parti_jax.contrastive.scorer import ContrastiveModel

    [result] = bundle.generate([PROMPT], keep_top_k=2, scorer="contrastive")
    assert result.scores.shape == (2,) and np.all(np.isfinite(result.scores))
    assert np.all(np.abs(result.scores) <= 1.0 + 1e-5)  # cosine similarities
    assert result.scores[0] >= result.scores[1]
    # The bundle's weights score (the VQGAN's images, as reranking does) as the work
    # directory's model does.
    model = ContrastiveModel.load(contrastive_dir)
    expected = model.similarity(result.low_res_images, [PROMPT] * 2)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    return result


def test_bundle_reranks_with_its_contrastive_model(contrastive_bundle, tiny_pipeline):
    info = json.loads((contrastive_bundle / "bundle.json").read_text())
    for name in FILES:
        entry = info["files"][name]
        assert entry["bytes"] == (contrastive_bundle / name).stat().st_size
        assert len(entry["sha256"]) == 64 and entry["role"]
    assert info["weights"]["contrastive"]["file"] == "contrastive.safetensors"
    # The same vocabulary as the encoder-decoder's: spm.model serves both.
    record = json.loads((contrastive_bundle / "contrastive_config.json").read_text())
    assert record["vocab_file"] == "spm.model" and "contrastive_spm.model" not in info["files"]
    assert record["vocab_sha256"] == info["files"]["spm.model"]["sha256"]
    source = info["sources"]["contrastive"]
    assert source["workdir"] == tiny_pipeline["contrastive"] and source["step"] == record["step"]
    assert len(source["params_hash"]) == 16
    assert inspect_path(contrastive_bundle)["groups"]["contrastive"]["params"] > 0

    bundle = load_bundle(contrastive_bundle)
    model = bundle.generator.contrastive
    assert model is not None and model.text_length == record["text_length"]
    assert bundle.records["contrastive"]["step"] == record["step"]
    assert bundle.records["contrastive"]["params_hash"] == source["params_hash"]
    result = _check_scores(bundle, tiny_pipeline["contrastive"])
    assert result.images.shape == (2, 64, 64, 3)  # upsampled after reranking


def test_bundle_without_contrastive_model_or_with_damaged_files(contrastive_bundle, tmp_path):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(contrastive_bundle, dst)
        return dst

    # Without one (as exported before, or without --contrastive): the clear error.
    bare = copy("bare")
    info = json.loads((bare / "bundle.json").read_text())
    del info["weights"]["contrastive"]
    for name in FILES:
        del info["files"][name]
        (bare / name).unlink()
    (bare / "bundle.json").write_text(json.dumps(info))
    bundle = load_bundle(bare)
    assert bundle.generator.contrastive is None
    with pytest.raises(ValueError, match="needs a contrastive model"):
        bundle.generate([PROMPT], scorer="contrastive")

    flipped = copy("flipped")
    data = bytearray((flipped / "contrastive.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (flipped / "contrastive.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"contrastive.safetensors: sha256 differs"):
        load_bundle(flipped)
    missing = copy("missing")
    (missing / "contrastive_config.json").unlink()
    with pytest.raises(BundleError, match=r"contrastive_config.json: missing"):
        load_bundle(missing)
    # An edited config (past the hashes): the weights no longer fit it.
    edited = copy("edited")
    record = json.loads((edited / "contrastive_config.json").read_text())
    record["config"]["embed_dim"] += 8
    (edited / "contrastive_config.json").write_text(json.dumps(record))
    with pytest.raises(BundleError, match=r"contrastive.safetensors: does not match"):
        load_bundle(edited, verify=False)


def test_contrastive_bundle_at_a_url(gcs, tiny_pipeline, tmp_path):
    from parti_jax import storage
    from tests.test_gcs_artifacts import upload_tree

    p = tiny_pipeline
    clip, url = gcs.url("clip"), gcs.url("bundle")
    upload_tree(p["contrastive"], clip)  # its checkpoint read through orbax/TensorStore
    export_bundle(url, t2i_path=p["t2i"], vqgan_path=p["vqgan"], contrastive_path=clip,
                  sampling_config=CONFIG, jax_export=False)  # fmt: skip
    info = json.loads(storage.read_text(storage.join(url, "bundle.json")))
    assert set(FILES) <= set(gcs.objects("bundle")) and info["sources"]["contrastive"]["workdir"]
    result = _check_scores(load_bundle(url), p["contrastive"])
    assert result.images.shape == (2, 16, 16, 3)  # no upsampler
