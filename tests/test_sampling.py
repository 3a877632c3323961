"""`parti_jax.sampling.Generator` on the tiny trained pipeline (tests/pipeline_fixtures.py).

Seeds reproduce across batch sizes and meshes; outputs are reranked and
upsampled; over-long prompts are truncated with a warning naming them; a
trio whose grid, codebook hash or resolution disagree fails naming both values.
The likelihood / PMI scorer (`token_scores`) runs on the device a chunk of
logits at a time: tested on its own tiny models, without the pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax import partitioning
from parti_jax.data.vocab import EOS_ID
from parti_jax.decoding import SamplingConfig
from parti_jax.loading import CompatibilityError, LoadError
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder
from parti_jax.sampling import (
    Generator,
    PromptTruncatedWarning,
    check_prompts,
    read_prompts_file,
    sample_to_folder,
    score_chunk_size,
    token_scores,
)
from tests.test_rerank import mean_log_probs_reference

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


# ------------------------------------------------------------------ scoring on the device


def _config(**changes) -> ModelConfig:
    """The pipeline's tiny model with `changes` (imported here: the module is a plugin)."""
    from tests.pipeline_fixtures import TINY_MODEL

    return ModelConfig(**dict(TINY_MODEL, **changes))


def _abstract_params(model, rows, text_length):
    text = jax.ShapeDtypeStruct((rows, text_length), jnp.int32)
    tokens = jax.ShapeDtypeStruct((rows, model.config.num_image_tokens), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), text, tokens)["params"])


def _small_model():
    """The tiny model with 100 codes (the vocabulary pads to 128: ids 101..127 and 0 are
    masked) and random weights spread enough that every token differs; 4 prompts and
    sampled tokens (codes + 1)."""
    cfg = _config(codebook_size=100)
    model, rng = EncoderDecoder(cfg), np.random.default_rng(0)
    text = np.zeros((4, cfg.max_text_length), np.int32)
    text[:, :3] = rng.integers(2, cfg.text_vocab_size, (4, 3))
    text[:, 3] = EOS_ID
    tokens = rng.integers(1, cfg.codebook_size + 1, (4, cfg.num_image_tokens), dtype=np.int32)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
        _abstract_params(model, 4, cfg.max_text_length),
    )
    return model, params, text, tokens


def _reference(model, params, text, tokens):
    """The float64 host computation on the whole logits."""
    decoder_input = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits = jax.jit(model.apply)({"params": params}, text, decoder_input)
    return mean_log_probs_reference(logits, tokens, model.config.codebook_size + 1)


def test_token_scores_match_the_float64_reference_in_any_chunking():
    model, params, text, tokens = _small_model()
    empty = np.zeros_like(text)
    empty[:, 0] = EOS_ID
    cond, uncond = _reference(model, params, text, tokens), _reference(model, params, empty, tokens)
    assert np.ptp(cond) > 0.1 and np.ptp(cond - uncond) > 0.01  # rows really differ
    # The default chunking (here all 16 tokens in one chunk), the likelihood alone.
    scores = jax.jit(functools.partial(token_scores, model))(params, text, tokens)
    assert scores.shape == (4,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(scores, cond, rtol=1e-5)
    # 4 chunks of 4 tokens, with the unconditional pass: weight 0 is the likelihood, 1 PMI.
    chunked = jax.jit(functools.partial(token_scores, model, chunk_size=4))
    for weight in (0.0, 1.0, 0.5):
        pmi = chunked(params, text, tokens, empty, weight)
        assert pmi.shape == (4,) and pmi.dtype == jnp.float32
        np.testing.assert_allclose(pmi, cond - weight * uncond, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size=5 must be None or a positive divisor"):
        token_scores(model, params, text, tokens, chunk_size=5)


def _shapes_made(jaxpr) -> set[tuple[int, ...]]:
    """The shape of every value a jaxpr, and every jaxpr inside it, makes."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = sub.jaxpr if isinstance(sub, jax_core.ClosedJaxpr) else sub
                if isinstance(sub, jax_core.Jaxpr):
                    shapes |= _shapes_made(sub)
    return shapes


def test_token_scores_never_make_the_whole_logits():
    model, params, text, tokens = _small_model()
    vocab = model.config.decoder_vocab_size
    whole = (4, model.config.num_image_tokens, vocab)
    fn = functools.partial(token_scores, model, chunk_size=4)
    shapes = _shapes_made(jax.make_jaxpr(fn)(params, text, tokens, text, 1.0).jaxpr)
    assert (4, 4, vocab) in shapes and whole not in shapes
    # What the scorer copied to the host before: the whole logits, found by the same walk.
    logits = jax.make_jaxpr(lambda p, e, d: model.apply({"params": p}, e, d))(params, text, tokens)
    assert whole in _shapes_made(logits.jaxpr)


def test_token_scores_compile_far_below_the_whole_logits():
    """64 rows x 1,024 tokens x 8,192 codes, the default chunking, compiled (not run) on the
    CPU: the whole float32 logits would be 2 GiB; the PMI scorer's temporaries are much less
    (the decoder's attention over 1,024 tokens is most of them) and 64 floats come back."""
    config = _config(codebook_size=8191, image_grid=(32, 32), d_model=64, num_heads=1)
    rows, n, vocab = 64, config.num_image_tokens, config.decoder_vocab_size
    assert (n, vocab) == (1024, 8192) and score_chunk_size(rows, n, vocab) == 64
    model = EncoderDecoder(config)
    text = jax.ShapeDtypeStruct((rows, 8), jnp.int32)
    tokens = jax.ShapeDtypeStruct((rows, n), jnp.int32)
    weight = jax.ShapeDtypeStruct((), jnp.float32)
    fn = jax.jit(functools.partial(token_scores, model))
    compiled = fn.lower(_abstract_params(model, rows, 8), text, tokens, text, weight).compile()
    memory = compiled.memory_analysis()
    whole_logits = rows * n * vocab * 4
    assert memory.output_size_in_bytes == rows * 4
    assert memory.temp_size_in_bytes < whole_logits / 2, memory.temp_size_in_bytes


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
