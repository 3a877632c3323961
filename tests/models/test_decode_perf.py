"""Cached decoding performance properties, checked on XLA's compiled analysis (no timings).

One decoding step must write its key/value into the stacked cache in place
and read the cache once: the compiled step's bytes accessed stay near
weights + cache + cross-attention K/V, the cache buffers are donated and
aliased to the outputs, and no full-size copy of the cache appears in the
HLO. One decoder layer, so the layer's slice of the stack is a bitcast: with
more layers XLA:CPU (not GPU) materialises each layer's dynamic slice, which
would hide the property under a CPU artefact. Also: the blocked and windowed
attention variants decode exactly like the teacher-forced pass.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder, make_tokens_to_logits, scan_to_unscanned
from tests.models.test_model import CFG, ENC, greedy_fn, logits_of, random_params

# Cache-dominated sizes: K+V of one layer for 8 rows x 256 positions (2 MiB)
# against ~0.4 MB of weights, embeddings and cross-attention K/V.
PERF_CFG = CFG.replace(
    codebook_size=64,
    image_grid=(16, 16),
    d_model=64,
    head_dim=64,
    mlp_dim=128,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
)
ROWS, TEXT = 8, 8


def _compiled_step(cfg: ModelConfig):
    model = EncoderDecoder(cfg)
    text = jax.ShapeDtypeStruct((ROWS, TEXT), jnp.int32)
    dec = jax.ShapeDtypeStruct((ROWS, cfg.num_image_tokens), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), text, dec)["params"])
    cache = jax.eval_shape(lambda p, t: make_tokens_to_logits(model, p, t)[1], params, text)

    def step(params, tokens, cache, index):
        return model.apply({"params": params}, tokens, cache, index, method=model.decode_step)

    tokens = jax.ShapeDtypeStruct((ROWS, 1), jnp.int32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = jax.jit(step, donate_argnums=(2,)).lower(params, tokens, cache, index).compile()
    return compiled, params, cache


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _bytes_accessed(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


@pytest.fixture(scope="module")
def compiled_step():
    return _compiled_step(PERF_CFG)


def test_decode_step_reads_the_cache_once(compiled_step):
    compiled, params, cache = compiled_step
    decoder = params["decoder"]
    cross_kv_kernels = sum(
        _nbytes(decoder["layers"]["cross_attention"][name]) for name in ("key", "value")
    )
    # One read of: every decoder weight the step uses (XLA's cost model counts
    # a gather as reading its whole table, so the embeddings count in full;
    # the cross-attention K/V kernels are not used), the self-attention cache
    # and the cross-attention K/V; plus the logits written.
    self_cache = _nbytes((cache["self_key"], cache["self_value"]))
    expected = (
        _nbytes(decoder)
        - cross_kv_kernels
        + self_cache
        + _nbytes((cache["cross_key"], cache["cross_value"]))
        + ROWS * PERF_CFG.decoder_vocab_size * 4
    )
    assert self_cache > 0.75 * expected  # the check is about the cache
    # A copy of the cache per step (read + write + read again) would be ~2.5x.
    total = _bytes_accessed(compiled)
    assert 0.9 * expected < total < 1.2 * expected, (
        f"decode step accesses {total:.0f} bytes, expected ~{expected}"
    )
    # Bytes per cache position, from a second grid size: K and V read once
    # (plus [rows, heads] float32 scores and probabilities, ~1/64 of that each).
    half, *_ = _compiled_step(PERF_CFG.replace(image_grid=(8, 16)))
    per_position = (total - _bytes_accessed(half)) / (256 - 128)
    ideal = self_cache / 256
    assert per_position < 1.2 * ideal, f"{per_position:.0f} bytes per position, ideal {ideal:.0f}"


def test_decode_step_updates_the_cache_in_place(compiled_step):
    compiled, _, cache = compiled_step
    hlo = compiled.as_text()
    aliases = re.search(r"input_output_alias=\{(.*?) \}, entry_computation_layout", hlo)
    assert aliases, "the donated cache is not aliased to the step's outputs"
    # Outputs 1.. are the cache leaves (dict order: cross_key, cross_value,
    # self_key, self_value, text_lengths); the self-attention ones must alias.
    assert re.search(r"\{3\}: \(\d+, \{\}", aliases.group(1))
    assert re.search(r"\{4\}: \(\d+, \{\}", aliases.group(1))
    layers, rows, length, heads, kv = cache["self_key"].shape
    full = f"f32[{layers},{rows},{length},{heads},{kv}]"
    copies = [line for line in hlo.splitlines() if full in line and " copy(" in line]
    assert not copies, f"full-cache copies in the compiled step: {copies}"
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < _nbytes(cache["self_key"]) // 4


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.mark.parametrize(
    "changes",
    [
        dict(decode_block_size=4),  # 3 blocks over the 12 slots
        dict(decode_block_size=3, scan_layers=False),
        dict(decoder_attention="conv_sparse"),  # scanned; window of 5 of 12 slots
        dict(decode_attention_kernel="fused"),  # jax.nn.dot_product_attention with lengths
        dict(decode_attention_kernel="fused", scan_layers=False),
    ],
    ids=["blocked_scanned", "blocked_unscanned", "conv_sparse_scanned", "fused", "fused_unscanned"],
)
def test_decoding_variants_match_teacher_forcing(changes, params):
    cfg = CFG.replace(**changes)
    p = params if cfg.scan_layers else scan_to_unscanned(params)
    inputs, step_logits, _ = greedy_fn(cfg)(p, ENC)
    full = logits_of(cfg, p, dec=np.asarray(inputs))
    np.testing.assert_allclose(np.asarray(step_logits), full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(decode_block_size=5), "decode_block_size=5 must divide the 12 image tokens"),
        (
            dict(decode_block_size=4, decoder_attention="conv_sparse"),
            "decode_block_size=4 applies to decoder_attention='full'",
        ),
        (dict(decode_block_size=0), "decode_block_size=0 must be a positive integer"),
        (dict(decode_segments=13), "decode_segments=13 exceeds the 12 image tokens"),
        (
            dict(decode_segments=2, decoder_attention="conv_sparse"),
            "decode_segments=2 applies to decoder_attention='full'",
        ),
        (dict(decode_segments=0), "decode_segments=0 must be a positive integer"),
        (
            dict(decode_attention_kernel="fused", decode_block_size=4),
            "decode_attention_kernel='fused' applies to decoder_attention='full'",
        ),
        (dict(decode_attention_kernel="cudnn"), "decode_attention_kernel"),
    ],
)
def test_decode_options_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        CFG.replace(**changes)


def _sample_fn(cfg: ModelConfig, guidance_scale=1.5):
    from parti_jax import decoding, sampling

    model = EncoderDecoder(cfg)
    prompt_ids, sample_indices = decoding.sample_ids(ENC.shape[0], 1)

    def run(params, text):
        return sampling.sample_tokens(
            model, params, text, prompt_ids, sample_indices, seed=3,
            guidance_scale=guidance_scale, temperature=0.7,
        )  # fmt: skip

    return jax.jit(run)


def test_segmented_sampling_draws_the_same_tokens_from_static_prefixes():
    cfg = CFG.replace(dropout_rate=0.0)
    params = random_params(cfg)
    whole = np.asarray(_sample_fn(cfg)(params, ENC))
    segmented_cfg = cfg.replace(decode_segments=3)
    segmented = _sample_fn(segmented_cfg)
    np.testing.assert_array_equal(np.asarray(segmented(params, ENC)), whole)
    # Each segment's loop carries a cache of its end's length (4, 8, 12 positions
    # for 2 prompts x 2 guidance rows), not the whole grid's.
    hlo = segmented.lower(params, ENC).compile().as_text()
    heads, kv = cfg.num_heads, cfg.kv_dim
    for length in (4, 8, 12):
        assert f"f32[2,4,{length},{heads},{kv}]" in hlo, length
    plain = _sample_fn(cfg).lower(params, ENC).compile().as_text()
    assert f"f32[2,4,4,{heads},{kv}]" not in plain


def test_segments_need_the_models_resize_cache():
    from parti_jax import decoding

    with pytest.raises(ValueError, match="segments=2 needs resize_cache"):
        decoding.sample(
            lambda *a: None, {}, num_steps=4, prompt_ids=[0], sample_indices=[0], seed=0,
            segments=2, cache_batch_axis=None,
        )  # fmt: skip
