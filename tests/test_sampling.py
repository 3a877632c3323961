"""`parti_jax.sampling.Generator` on the tiny trained pipeline (tests/pipeline_fixtures.py).

Seeds reproduce across batch sizes and meshes; outputs are reranked and
upsampled; over-long prompts are truncated with a warning naming them; a
trio whose grid, codebook hash or resolution disagree fails naming both values.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from parti_jax import partitioning
from parti_jax.data.vocab import EOS_ID
from parti_jax.decoding import SamplingConfig
from parti_jax.loading import CompatibilityError, LoadError
from parti_jax.sampling import (
    Generator,
    PromptTruncatedWarning,
    check_prompts,
    read_prompts_file,
    sample_to_folder,
)

pytest_plugins = ["tests.pipeline_fixtures"]

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle above a cross"]
CONFIG = SamplingConfig(temperature=1.5, top_k=32, guidance_scale=1.5, num_samples=3, seed=7)


@pytest.fixture(scope="module")
def generator(tiny_pipeline):
    p = tiny_pipeline
    return Generator.load(p["t2i"], p["vqgan"], p["upsampler"], vocab_path=p["vocab"])


@pytest.fixture(scope="module")
def results(generator):
    return generator.generate(PROMPTS, keep_top_k=2, sampling_config=CONFIG, batch_size=8)


def test_generate_outputs_reranked_and_upsampled(generator, results):
    assert [r.prompt for r in results] == PROMPTS and [r.prompt_id for r in results] == [0, 1, 2]
    for r in results:
        assert r.images.shape == (2, 64, 64, 3) and r.images.dtype == np.float32
        assert r.low_res_images.shape == (2, 16, 16, 3)
        assert r.codes.shape == (2, 4, 4) and r.codes.min() >= 0 and r.codes.max() < 64
        assert r.scores[0] >= r.scores[1]  # best first
        assert len(set(r.sample_indices.tolist())) == 2 and r.sample_indices.max() < 3
        assert r.seed == 7 and not r.truncated
        # The kept low-res image is the VQGAN's decoding of the kept codes.
        np.testing.assert_allclose(
            r.low_res_images, generator.image_tokenizer.decode(r.codes), atol=1e-6
        )
        assert r.images.min() >= 0.0 and r.images.max() <= 1.0
    records = generator.records
    assert records["codebook_hash"] == records["vqgan"]["codebook_hash"]
    assert records["encoder_decoder"]["step"] == 12 and records["upsampler"]["step"] == 4
    assert len(records["encoder_decoder"]["params_hash"]) == 16


def test_seeds_reproduce_across_batch_sizes_and_meshes(tiny_pipeline, generator, results):
    """batch_size 1 on one device vs 8-row batches over 8 devices: the same codes and images."""
    p = tiny_pipeline
    one = partitioning.create_mesh(
        partitioning.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]
    )
    single = Generator.load(p["t2i"], p["vqgan"], p["upsampler"], mesh=one, fingerprint=False)
    assert single.rows_per_call(9, 1) == 1 and generator.rows_per_call(9, 1) == 8
    again = single.generate(PROMPTS, keep_top_k=2, sampling_config=CONFIG, batch_size=1)
    for a, b in zip(results, again):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.sample_indices, b.sample_indices)
        np.testing.assert_allclose(a.images, b.images, atol=1e-5)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    # A prompt keeps its images when sampled alone, under its own prompt id.
    alone = generator.generate(
        [PROMPTS[2]], prompt_ids=[2], keep_top_k=2, sampling_config=CONFIG, scorer="likelihood"
    )
    np.testing.assert_array_equal(alone[0].codes, results[2].codes)
    # Another seed gives other images.
    other = generator.generate(PROMPTS[:1], keep_top_k=2, sampling_config=CONFIG, seed=8)
    assert not np.array_equal(other[0].codes, results[0].codes)


def test_scorers(generator):
    cfg = dataclasses.replace(CONFIG, num_samples=2)  # same compiled function as `results`
    judged = generator.generate(PROMPTS[:1], keep_top_k=2, sampling_config=cfg,
                                scorer="shapes_judge")  # fmt: skip
    assert 0.0 <= judged[0].scores.min() <= judged[0].scores.max() <= 1.0
    unranked = generator.generate(PROMPTS[:1], keep_top_k=2, sampling_config=cfg, scorer="none")
    assert unranked[0].sample_indices.tolist() == [0, 1]
    greedy = generator.generate(
        PROMPTS[:1], keep_top_k=2, sampling_config=dataclasses.replace(cfg, temperature=0.0)
    )
    np.testing.assert_array_equal(greedy[0].codes[0], greedy[0].codes[1])  # argmax: no randomness
    # 'pmi': the same draws, scored as log p(x | prompt) - log p(x | "") per token,
    # where "" encodes to guidance's unconditional row [EOS, 0, ...].
    empty = generator.encode_prompts([""])[0][0]
    assert empty[0] == EOS_ID and not empty[1:].any()
    plain = generator.generate(PROMPTS[:1], keep_top_k=2, sampling_config=cfg)
    pmi = generator.generate(PROMPTS[:1], keep_top_k=2, sampling_config=cfg, scorer="pmi")
    order = np.argsort(plain[0].sample_indices)
    tokens = plain[0].codes[order].reshape(2, -1) + 1
    scorer = generator.likelihood_scorer(generator.rows_per_call(2))
    unconditional = scorer.score(None, ["", ""], image_tokens=tokens)
    expected = plain[0].scores[order] - unconditional
    np.testing.assert_allclose(
        pmi[0].scores[np.argsort(pmi[0].sample_indices)], expected, rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="scorer='clip'"):
        generator.generate(PROMPTS[:1], sampling_config=cfg, scorer="clip")


def test_bad_prompts(generator, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        generator.generate([], sampling_config=CONFIG)
    with pytest.raises(ValueError, match=r"keep_top_k=4 must be in \[1, num_samples=3\]"):
        generator.generate(PROMPTS, keep_top_k=4, sampling_config=CONFIG)
    with pytest.raises(ValueError, match="distinct"):
        generator.generate(PROMPTS[:2], prompt_ids=[5, 5], sampling_config=CONFIG)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"prompts.txt: no prompts \(the file is empty\)"):
        read_prompts_file(empty)


def test_prompts_checked_at_the_door(tmp_path):
    """Bad prompts fail in one line naming the prompt (or file and line), before any model
    is loaded (the paths here do not exist); a BOM is dropped; "" must be asked for."""
    with pytest.raises(
        ValueError, match=r"prompt 2: not valid Unicode \(lone surrogate '\\ud800' at character 2\)"
    ):
        check_prompts(["ok", "x \ud800"])  # legal JSON, not Unicode text
    with pytest.raises(
        ValueError, match=r"--prompt 1: .* at character 2: byte 0xff that is not UTF-8"
    ):
        check_prompts(["a \udcff"], "--prompt")  # a non-UTF-8 argv byte, surrogate-escaped
    with pytest.raises(ValueError, match=r"prompt 1: 3 is not a string"):
        check_prompts([3])
    assert check_prompts(["", " "]) == ["", " "]  # the library's default: allowed
    with pytest.raises(ValueError, match=r"prompt 2: empty prompt .*--allow_empty_prompt"):
        check_prompts(["a", " "], allow_empty=False)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfa red circle\r\n\r\na blue square\n")
    assert read_prompts_file(bom) == ["a red circle", "a blue square"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"a red circle\n\na caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.txt:3: not valid UTF-8 \(invalid continuation"):
        read_prompts_file(latin1)
    nowhere = {"workdir": str(tmp_path / "out"), "t2i_path": "/nonexistent/t2i",
               "vqgan_path": "/nonexistent/vqgan", "progress": False}  # fmt: skip
    for kwargs, message in (
        ({"prompts": [""]}, r"prompt 1: empty prompt"),
        ({"prompts": ["a \ud800"]}, r"prompt 1: not valid Unicode \(lone surrogate"),
        ({"prompts": ["a"], "keep_top_k": 0}, r"sample.keep_top_k=0 must be in \[1, "),
        ({"prompts": ["a"], "batch_size": 0}, r"sample.batch_size=0 must be >= 1"),
        ({"prompts": ["a"], "scorer": "clip"}, r"scorer='clip': expected one of"),
    ):
        with pytest.raises(ValueError, match=message):
            sample_to_folder(**nowhere, **kwargs)
    assert not (tmp_path / "out").exists()


def test_over_long_prompt_truncated_with_a_warning_naming_it(generator):
    long = "a red circle " + " ".join(["and a big blue square"] * 10)
    cfg = dataclasses.replace(CONFIG, num_samples=1)
    with pytest.warns(PromptTruncatedWarning, match=r"1 prompt\(s\).*#4 'a red circle and"):
        out = generator.generate(["a red circle", long], prompt_ids=[3, 4], sampling_config=cfg)
    assert [r.truncated for r in out] == [False, True]


def test_tensorflow_free():
    """Loading, sampling and upsampler training import no TensorFlow."""
    import subprocess

    code = (
        "import sys, parti_jax.sampling, parti_jax.loading, parti_jax.upsampler.train; "
        "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ mismatched trios


def _copy_meta(src: str, dst, name: str, **changes) -> str:
    """A work directory holding a copy of `src`'s checkpoints with `name` edited."""
    shutil.copytree(src, dst)
    path = dst / name
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        target = meta
        *parents, last = key.split(".")
        for k in parents:
            target = target[k]
        target[last] = value
    path.write_text(json.dumps(meta))
    return str(dst)


def test_mismatched_grid_names_both_values_and_files(tiny_pipeline, tmp_path):
    p = tiny_pipeline
    t2i = _copy_meta(p["t2i"], tmp_path / "t2i", "model_config.json",
                     **{"model_config.image_grid": [8, 8]})  # fmt: skip
    with pytest.raises(CompatibilityError) as err:
        Generator.load(t2i, p["vqgan"], p["upsampler"])
    message = str(err.value)
    assert "grid: [8, 8]" in message and "[4, 4]" in message
    assert "model_config.json: model_config.image_grid" in message
    assert "vqgan_meta.json: grid" in message


def test_mismatched_codebook_hash_names_both_values(tiny_pipeline, tmp_path):
    """Codes (and an upsampler) made with another VQGAN than the one given."""
    p = tiny_pipeline
    trained_hash = json.loads(Path(p["vqgan"], "vqgan_meta.json").read_text())["codebook_hash"]
    t2i = _copy_meta(p["t2i"], tmp_path / "t2i", "model_config.json",
                     **{"codes_meta.codebook_hash": "feedfacefeedface"})  # fmt: skip
    up = _copy_meta(p["upsampler"], tmp_path / "up", "upsampler_meta.json",
                    codebook_hash="0123456789abcdef")  # fmt: skip
    with pytest.raises(CompatibilityError) as err:
        Generator.load(t2i, p["vqgan"], up)
    message = str(err.value)
    assert "codebook hash: feedfacefeedface" in message and trained_hash in message
    assert "model_config.json: codes_meta.codebook_hash" in message
    assert "codebook hash: 0123456789abcdef" in message
    assert "upsampler_meta.json: codebook_hash" in message


def test_mismatched_resolution_names_both_values(tiny_pipeline, tmp_path):
    p = tiny_pipeline
    up = _copy_meta(p["upsampler"], tmp_path / "up", "upsampler_meta.json", input_size=32)
    with pytest.raises(CompatibilityError, match=r"resolution: 32 \(.*upsampler_meta.json: "
                       r"input_size.*\) != 16 \(.*vqgan_meta.json: image_size"):  # fmt: skip
        Generator.load(p["t2i"], p["vqgan"], up)


def test_missing_or_wrong_work_directories(tiny_pipeline, tmp_path):
    p = tiny_pipeline
    with pytest.raises(LoadError, match="not an encoder-decoder work directory"):
        Generator.load(tmp_path, p["vqgan"])
    with pytest.raises(LoadError, match="not an upsampler work directory"):
        Generator.load(p["t2i"], p["vqgan"], tmp_path)
    # Another kind's work directory: named, with what was expected.
    with pytest.raises(LoadError) as err:
        Generator.load(p["upsampler"], p["vqgan"])
    message = str(err.value)
    assert "not an encoder-decoder work directory (no model_config.json; it holds " in message
    assert "upsampler_meta.json, a `parti-jax train-upsampler` work directory" in message
    assert "pass the --workdir of `parti-jax train`" in message
    with pytest.raises(LoadError, match=r"not an upsampler work directory \(no upsampler_meta"
                       r".json; it holds vqgan_meta.json, a `parti-jax train-vqgan`"):  # fmt: skip
        Generator.load(p["t2i"], p["vqgan"], p["vqgan"])


def test_bad_model_config_names_the_file_and_field(tiny_pipeline, tmp_path):
    p = tiny_pipeline
    unknown = _copy_meta(p["t2i"], tmp_path / "unknown", "model_config.json",
                         **{"model_config.num_layerz": 2})  # fmt: skip
    with pytest.raises(LoadError, match=r"unknown/model_config.json: model_config: unknown "
                       r"ModelConfig field\(s\) \['num_layerz'\]"):  # fmt: skip
        Generator.load(unknown, p["vqgan"])
    bad = _copy_meta(p["t2i"], tmp_path / "bad", "model_config.json", **{"model_config.d_model": 0})
    with pytest.raises(LoadError, match=r"bad/model_config.json: model_config: bad ModelConfig "
                       r"\(ModelConfig[:.] ?d_model=0 must be a positive integer\)"):  # fmt: skip
        Generator.load(bad, p["vqgan"])
    with pytest.raises(LoadError, match=r"config_overrides for .*: unknown ModelConfig field"):
        Generator.load(p["t2i"], p["vqgan"], config_overrides={"atention_impl": "xla"})
    (tmp_path / "bad" / "model_config.json").write_text("{not json")
    with pytest.raises(LoadError, match=r"bad/model_config.json: not valid JSON"):
        Generator.load(bad, p["vqgan"])
