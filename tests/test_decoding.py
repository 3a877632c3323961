"""Tests for parti_jax.decoding: the sampler against a stand-in model with a real cache.

The stand-in is a logits table: bigram(previous token) + position + prompt +
the mean of a table over every earlier input token (so the cache matters).
Its tables are multiples of 1/8, which makes cached and recomputed logits
bit-identical, so sampled tokens can be compared exactly.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax import decoding
from parti_jax.partitioning import ACT_BATCH

VOCAB = 16
CODEBOOK = 10
NUM_VALID = CODEBOOK + 1  # ids 1..10 are image tokens, 11..15 pad the vocabulary
STEPS = 6  # a 2x3 grid
NUM_PROMPTS = 5
EMPTY = NUM_PROMPTS - 1  # the stand-in's unconditional prompt


def make_tables(seed: int = 0, favour_invalid: float = 0.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)

    def grid(*shape, scale):
        return np.round(rng.normal(size=shape) * scale * 8) / 8

    bias = np.zeros(VOCAB)
    bias[0] = bias[NUM_VALID:] = favour_invalid
    tables = dict(
        bigram=grid(VOCAB, VOCAB, scale=1.5),
        pos=grid(STEPS, VOCAB, scale=1.0),
        prompt=grid(NUM_PROMPTS, VOCAB, scale=2.0),
        hist=grid(VOCAB, VOCAB, scale=1.0),
        bias=bias,
    )
    return {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}


def full_logits(t, prompts, decoder_input_tokens):
    """Teacher-forced logits [R, N, V] of the stand-in (no cache)."""
    n = decoder_input_tokens.shape[1]
    counts = jnp.cumsum(jax.nn.one_hot(decoder_input_tokens, VOCAB), axis=1)
    hist = (counts @ t["hist"]) / jnp.arange(1, n + 1, dtype=jnp.float32)[None, :, None]
    return (
        t["bigram"][decoder_input_tokens]
        + t["pos"][None, :n]
        + t["prompt"][prompts][:, None]
        + hist
        + t["bias"]
    )


def make_cached(t, prompts):
    """(tokens_to_logits, cache) of the stand-in; the cache is stacked per 'layer' (2)."""
    prompts = jnp.asarray(prompts, jnp.int32)
    rows = prompts.shape[0]
    cache = dict(
        history=jnp.zeros((2, rows, STEPS), jnp.int32),
        prompt=jnp.stack([prompts, prompts]),
        index=jnp.zeros((2,), jnp.int32),
    )

    def tokens_to_logits(tokens, cache, step):
        token = tokens[:, 0]
        history = cache["history"].at[:, :, step].set(token)
        filled = (jnp.arange(STEPS) <= step)[None, :, None]
        counts = (jax.nn.one_hot(history[0], VOCAB) * filled).sum(1)
        hist = (counts @ t["hist"]) / (step + 1).astype(jnp.float32)
        logits = t["bigram"][token] + t["pos"][step] + t["prompt"][cache["prompt"][0]] + hist
        logits = logits + t["bias"]
        # A cache that disagrees with `step` poisons the logits.
        logits = jnp.where(cache["index"][0] == step, logits, jnp.nan)
        return logits, dict(history=history, prompt=cache["prompt"], index=cache["index"] + 1)

    return tokens_to_logits, cache


# Sampler settings that may be traced: passing them as jit arguments lets tests
# share compilations (and shows that a guidance sweep need not recompile).
TRACED = ("seed", "temperature", "top_p", "guidance_scale")


@functools.cache
def _jitted(static_items, traced_names):
    """One jitted prefill + sample per static setting; shapes re-use compilations."""

    @jax.jit
    def go(tables, cache_prompts, prompt_ids, sample_indices, traced):
        ttl, cache = make_cached(tables, cache_prompts)
        return decoding.sample(
            ttl,
            cache,
            num_steps=STEPS,
            prompt_ids=prompt_ids,
            sample_indices=sample_indices,
            **dict(static_items),
            **traced,
        )

    return go


def run(t, prompts, prompt_ids, sample_indices, *, uncond_prompts=None, **kw):
    """Jits the stand-in's prefill + sample, as sampling.py does with the model."""
    cache_prompts = np.asarray(prompts)
    if uncond_prompts is not None:
        cache_prompts = np.concatenate([cache_prompts, np.asarray(uncond_prompts)])
    traced = {k: kw.pop(k) for k in TRACED if k in kw and not (k == "temperature" and kw[k] == 0)}
    traced = {k: jnp.int32(v) if k == "seed" else jnp.float32(v) for k, v in traced.items()}
    go = _jitted(tuple(sorted(kw.items())), tuple(sorted(traced)))
    out = go(
        t, jnp.asarray(cache_prompts), jnp.asarray(prompt_ids), jnp.asarray(sample_indices), traced
    )
    return np.asarray(out.tokens), np.asarray(out.token_log_probs)


VALID = (np.arange(VOCAB) > 0) & (np.arange(VOCAB) < NUM_VALID)


def shift_right(tokens):
    """The decoder input of a token path: BOS (0), then the path without its last token."""
    return np.concatenate([np.zeros((tokens.shape[0], 1), np.int32), tokens[:, :-1]], 1)


def path_logits(t, prompts, tokens, *, mask=True):
    """Logits [R, N, V] at every step along the sampled path, invalid ids masked."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    decoder_input = shift_right(tokens)
    counts = np.cumsum(np.eye(VOCAB)[decoder_input], axis=1)
    hist = counts @ t["hist"] / np.arange(1, STEPS + 1)[None, :, None]
    logits = (
        t["bigram"][decoder_input]
        + t["pos"][None]
        + t["prompt"][np.asarray(prompts)][:, None]
        + hist
        + t["bias"]
    )
    return np.where(VALID, logits, -np.inf) if mask else logits


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


PROMPTS4 = np.arange(4, dtype=np.int32)
# Shared static settings (values such as temperature and top_p are traced).
FILTERED = dict(top_k=6, num_valid_tokens=NUM_VALID)
MASKED = dict(num_valid_tokens=NUM_VALID)


@pytest.fixture(scope="module")
def tables():
    return make_tables()


def test_greedy_follows_argmax_path_and_reports_log_probs(tables):
    pid, sid = decoding.sample_ids(4, 1)
    tokens, log_probs = run(
        tables, PROMPTS4, pid, sid, seed=0, temperature=0.0, num_valid_tokens=NUM_VALID
    )
    assert tokens.shape == (4, STEPS) and tokens.dtype == np.int32
    logits = path_logits(tables, PROMPTS4, tokens)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    expected = np.take_along_axis(log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)
    # Greedy ignores the seed; the four prompts do not all give the same image.
    other, _ = run(tables, PROMPTS4, pid, sid, seed=7, temperature=0.0, num_valid_tokens=NUM_VALID)
    np.testing.assert_array_equal(tokens, other)
    assert len({tuple(r) for r in tokens}) > 1


def test_cached_equals_uncached(tables):
    pid, sid = decoding.sample_ids(4, 2)
    prompts = np.repeat(PROMPTS4, 2)
    kw = dict(seed=3, temperature=1.5, top_p=0.95, **FILTERED)
    cached, cached_lp = run(tables, prompts, pid, sid, **kw)

    @jax.jit
    def uncached(tables):
        """The no-cache reference: the cache is the token buffer; every step re-runs the
        teacher-forced stand-in over it."""

        def ttl(tokens, buffer, step):
            buffer = jax.lax.dynamic_update_slice(buffer, tokens, (0, step))
            return full_logits(tables, jnp.asarray(prompts), buffer)[:, step], buffer

        cache = jnp.zeros((len(prompts), STEPS), jnp.int32)
        return decoding.sample(
            ttl,
            cache,
            num_steps=STEPS,
            prompt_ids=pid,
            sample_indices=sid,
            cache_batch_axis=0,
            **kw,
        )

    out = uncached(tables)
    np.testing.assert_array_equal(cached, np.asarray(out.tokens))
    np.testing.assert_allclose(cached_lp, np.asarray(out.token_log_probs), rtol=1e-6, atol=1e-6)
    # The draw is random: samples of one prompt differ.
    assert any((cached[i] != cached[i + 1]).any() for i in range(0, 8, 2))


def test_guidance_zero_and_one_equal_unconditional_and_conditional(tables):
    pid, sid = decoding.sample_ids(4, 2, first_prompt_id=10)
    prompts = np.repeat(PROMPTS4, 2)
    empty = np.full_like(prompts, EMPTY)
    kw = dict(seed=5, temperature=1.0, top_p=1.0, **FILTERED)
    cond, cond_lp = run(tables, prompts, pid, sid, **kw)
    uncond, uncond_lp = run(tables, empty, pid, sid, **kw)
    g1, g1_lp = run(tables, prompts, pid, sid, uncond_prompts=empty, guidance_scale=1.0, **kw)
    g0, g0_lp = run(tables, prompts, pid, sid, uncond_prompts=empty, guidance_scale=0.0, **kw)
    np.testing.assert_array_equal(g1, cond)
    np.testing.assert_array_equal(g0, uncond)
    np.testing.assert_allclose(g1_lp, cond_lp, atol=1e-6)
    np.testing.assert_allclose(g0_lp, uncond_lp, atol=1e-6)
    assert not np.array_equal(cond, uncond)


def test_guided_token_is_fed_to_both_halves(tables):
    """Greedy λ=3 against a numpy loop that guides over the shared prefix."""
    scale = 3.0
    pid, sid = decoding.sample_ids(4, 1)
    empty = np.full(4, EMPTY, np.int32)
    kw = dict(seed=0, temperature=0.0, guidance_scale=scale, **MASKED)
    tokens, _ = run(tables, PROMPTS4, pid, sid, uncond_prompts=empty, **kw)
    cond = path_logits(tables, PROMPTS4, tokens, mask=False)
    uncond = path_logits(tables, empty, tokens, mask=False)
    guided = np.where(VALID, uncond + scale * (cond - uncond), -np.inf)
    np.testing.assert_array_equal(tokens, guided.argmax(-1))
    assert not np.array_equal(tokens, np.where(VALID, cond, -np.inf).argmax(-1))


def test_top_k_never_leaves_the_top_k(tables):
    pid, sid = decoding.sample_ids(4, 16)
    prompts = np.repeat(PROMPTS4, 16)
    kw = dict(seed=11, temperature=3.0, **MASKED)
    tokens, _ = run(tables, prompts, pid, sid, top_k=3, **kw)
    logits = path_logits(tables, prompts, tokens)
    # rank 0 = most likely valid token at that step of that row's own path
    rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
    assert rank.max() <= 2
    assert set(np.unique(rank)) == {0, 1, 2}  # hot enough to use all three
    # Without the filter the same randomness leaves the top 3.
    free, _ = run(tables, prompts, pid, sid, **kw)
    free_logits = path_logits(tables, prompts, free)
    free_rank = (free_logits > np.take_along_axis(free_logits, free[..., None], -1)).sum(-1)
    assert free_rank.max() > 2


def test_top_p_keeps_the_nucleus(tables):
    pid, sid = decoding.sample_ids(4, 16)
    prompts = np.repeat(PROMPTS4, 16)
    top_p, temperature = 0.6, 1.3
    kw = dict(seed=2, temperature=temperature, **MASKED)

    def in_nucleus(tokens):
        logits = path_logits(tables, prompts, tokens) / temperature
        probs = np.exp(log_softmax(logits))
        chosen = np.take_along_axis(probs, tokens[..., None], -1)
        mass_above = np.where(probs > chosen, probs, 0).sum(-1)
        return mass_above < top_p

    tokens, _ = run(tables, prompts, pid, sid, top_p=top_p, **kw)
    assert in_nucleus(tokens).all()
    logits = path_logits(tables, prompts, tokens)
    assert (tokens != logits.argmax(-1)).any()  # the nucleus holds more than the argmax
    free, _ = run(tables, prompts, pid, sid, **kw)
    assert not in_nucleus(free).all()
    # A tiny nucleus is the argmax alone: greedy (same compilation, top_p is traced).
    tiny, _ = run(tables, prompts, pid, sid, top_p=1e-4, **kw)
    np.testing.assert_array_equal(tiny, path_logits(tables, prompts, tiny).argmax(-1))


def test_pad_bos_and_padding_ids_are_never_sampled():
    tables = make_tables(favour_invalid=6.0)  # id 0 and ids 11..15 are the likeliest
    pid, sid = decoding.sample_ids(4, 16)
    prompts = np.repeat(PROMPTS4, 16)
    tokens, log_probs = run(tables, prompts, pid, sid, seed=1, temperature=3.0, **MASKED)
    assert tokens.min() >= 1 and tokens.max() < NUM_VALID
    assert np.isfinite(log_probs).all()
    codes = decoding.tokens_to_codes(tokens, codebook_size=CODEBOOK)
    np.testing.assert_array_equal(codes, tokens - 1)
    # Masking only id 0 lets the padding ids through: the bias is real.
    loose, _ = run(tables, prompts, pid, sid, seed=1, temperature=3.0)
    assert loose.min() >= 1 and loose.max() >= NUM_VALID


def test_rows_do_not_depend_on_batch_composition(tables):
    pid, sid = decoding.sample_ids(4, 2)  # prompts {0..3} x 2 samples
    prompts = pid.copy()
    kw = dict(seed=9, temperature=1.0, top_p=0.9, **FILTERED)
    whole, _ = run(tables, prompts, pid, sid, **kw)
    for size in (1, 2):
        parts = [
            run(tables, prompts[i : i + size], pid[i : i + size], sid[i : i + size], **kw)[0]
            for i in range(0, 8, size)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    # Reversed order, same rows.
    rev, _ = run(tables, prompts[::-1], pid[::-1], sid[::-1], **kw)
    np.testing.assert_array_equal(rev[::-1], whole)
    # With guidance as well (2 prompts x 2 samples per batch).
    g = dict(kw, guidance_scale=1.2)
    empty = np.full(8, EMPTY, np.int32)
    whole_g, _ = run(tables, prompts, pid, sid, uncond_prompts=empty, **g)
    halves = [
        run(tables, prompts[s], pid[s], sid[s], uncond_prompts=empty[:4], **g)[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    np.testing.assert_array_equal(np.concatenate(halves), whole_g)
    # Another seed draws other images.
    assert not np.array_equal(run(tables, prompts, pid, sid, **dict(kw, seed=10))[0], whole)


def _mesh():
    return jax.make_mesh(
        (2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def test_sharded_over_eight_devices_equals_unsharded(tables, cpu_devices):
    mesh = _mesh()
    pid, sid = decoding.sample_ids(4, 2)
    prompts = pid.copy()
    empty = np.full(8, EMPTY, np.int32)
    kw = dict(seed=4, temperature=1.0, top_p=0.9, guidance_scale=1.2, **FILTERED)
    plain, plain_lp = run(tables, prompts, pid, sid, uncond_prompts=empty, **kw)

    @functools.partial(jax.jit, static_argnames="mesh")
    def sharded(tables, cache_prompts, mesh=None):
        ttl, cache = make_cached(tables, cache_prompts)
        return decoding.sample(
            ttl, cache, num_steps=STEPS, prompt_ids=pid, sample_indices=sid, mesh=mesh, **kw
        )

    both = jnp.asarray(np.concatenate([prompts, empty]))
    out = sharded(tables, both, mesh)
    expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    assert out.tokens.sharding.is_equivalent_to(expected, 2)
    np.testing.assert_array_equal(np.asarray(out.tokens), plain)
    np.testing.assert_allclose(np.asarray(out.token_log_probs), plain_lp, atol=1e-6)

    # The logical route: ACT_BATCH rules under jax.set_mesh, no mesh argument.
    with jax.set_mesh(mesh), nn.logical_axis_rules([(ACT_BATCH, ("data", "fsdp"))]):
        out = sharded(tables, both)
    assert out.tokens.sharding.is_equivalent_to(expected, 2)
    np.testing.assert_array_equal(np.asarray(out.tokens), plain)

    three = dict(num_steps=STEPS, prompt_ids=pid[:3], sample_indices=sid[:3], seed=0, mesh=mesh)
    with pytest.raises(ValueError, match="multiple of 8"):
        decoding.sample(*make_cached(tables, prompts[:3]), **three)


def test_bad_arguments_are_named(tables):
    ttl, cache = make_cached(tables, PROMPTS4)
    pid, sid = decoding.sample_ids(4, 1)
    base = dict(num_steps=STEPS, prompt_ids=pid, sample_indices=sid, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(ttl, cache, temperature=-1.0, **base)
    with pytest.raises(ValueError, match="top_k"):
        decoding.sample(ttl, cache, top_k=0, **base)
    with pytest.raises(ValueError, match="top_p"):
        decoding.sample(ttl, cache, top_p=1.5, **base)
    with pytest.raises(ValueError, match="num_valid_tokens"):
        decoding.sample(ttl, cache, num_valid_tokens=VOCAB + 1, **base)
    # Guidance needs 2B cache rows: the error says so instead of a shape error.
    with pytest.raises(ValueError, match="guidance"):
        decoding.sample(ttl, cache, guidance_scale=1.2, **base)
    with pytest.raises(ValueError, match=r"index \(1, 2\)"):
        decoding.tokens_to_codes(np.array([[1, 2, 3], [4, 5, 0]]))
    with pytest.raises(ValueError, match="1..10"):
        decoding.tokens_to_codes(np.array([[1, 11]]), codebook_size=10)
    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
        decoding.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="SamplingConfig.num_samples"):
        decoding.SamplingConfig(num_samples=0)


def test_sampling_config_gin_binding():
    import gin
    from parti_jax.cli import configurables

    configurables.register_all()
    with gin.unlock_config():
        gin.parse_config(["SamplingConfig.top_k = 5", "SamplingConfig.guidance_scale = 2.0"])
    try:
        cfg = gin.get_configurable("SamplingConfig")()
    finally:
        gin.clear_config()
    assert (cfg.top_k, cfg.guidance_scale, cfg.num_samples, cfg.temperature) == (5, 2.0, 16, 1.0)
    assert decoding.SamplingConfig().guidance_scale == 1.2


def test_sampling_bandwidth_floor_hand_computed():
    sizes = dict(decoder_params=100, num_layers=2, kv_width=4, text_length=3, num_steps=4, rows=2)
    floor = decoding.sampling_bandwidth_floor(
        **sizes, memory_bandwidth=1000.0, param_bytes=2, cache_bytes=2
    )
    # weights: 4 steps x 100 params x 2 B = 800
    # one position's K/V: 2 layers x 2 (K, V) x 2 rows x 4 x 2 B = 64
    # cross K/V: 4 steps x 64 x 3 text positions = 768
    # self K/V: 64 x (1 + 2 + 3 + 4) filled positions = 640
    assert floor.weight_bytes == 800
    assert floor.cross_attention_bytes == 768
    assert floor.self_attention_bytes == 640
    assert floor.total_bytes == 2208
    assert floor.seconds == pytest.approx(2.208)
    with pytest.raises(ValueError, match="memory_bandwidth"):
        decoding.sampling_bandwidth_floor(**sizes, memory_bandwidth=0.0)
    with pytest.raises(ValueError, match="kv_width must be a positive integer"):
        decoding.sampling_bandwidth_floor(**dict(sizes, kv_width=0), memory_bandwidth=1.0)
    # Conv-shaped attention needs only its window's positions: 64 x 6 = 384.
    conv = decoding.sampling_bandwidth_floor(
        **sizes, memory_bandwidth=1000.0, self_attention_positions=6
    )
    assert conv.self_attention_bytes == 384 and conv.total_bytes == 2208 - 640 + 384
    with pytest.raises(ValueError, match="self_attention_positions=11 must be in"):
        decoding.sampling_bandwidth_floor(
            **sizes, memory_bandwidth=1.0, self_attention_positions=11
        )


# ------------------------------------------------------------ the real model


def _tiny_model():
    from parti_jax.models.config import ModelConfig
    from parti_jax.models.transformer import EncoderDecoder
    from tests.pipeline_fixtures import TINY_MODEL

    cfg = ModelConfig(**dict(TINY_MODEL, text_vocab_size=32, codebook_size=CODEBOOK,
                             image_grid=(2, 3), max_text_length=8, num_decoder_layers=2))  # fmt: skip
    model = EncoderDecoder(cfg)
    rng = np.random.default_rng(0)
    text = rng.integers(3, cfg.text_vocab_size, size=(4, 6)).astype(np.int32)
    text[:, 4:] = 0  # right padding
    text[:, 3] = 1  # EOS
    text[1, 2:] = [1, 0, 0, 0]  # a shorter prompt
    empty = np.zeros_like(text)
    empty[:, 0] = 1  # the unconditional prompt [EOS]
    # Random weights from numpy on the abstract init: compiling the initializers'
    # random-number code costs ~10 s of CPU, and these tests need no particular init.
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), text, np.zeros((4, cfg.num_image_tokens), np.int32)
    )

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = np.ones(leaf.shape)
        elif "bias" in name:
            value = np.zeros(leaf.shape)
        else:  # embeddings ~N(0, 1), kernels ~N(0, 1/d_model)
            std = 1.0 if "embedding" in name else cfg.d_model**-0.5
            value = rng.normal(size=leaf.shape) * std
        return jnp.asarray(value, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return cfg, model, variables, text, empty


def test_real_model_cached_sampling_matches_teacher_forced_decoder(cpu_devices):
    from parti_jax.models.transformer import make_tokens_to_logits

    cfg, model, variables, text, empty = _tiny_model()
    assert cfg.decoder_vocab_size == 128 and cfg.num_image_tokens == STEPS
    pid, sid = decoding.sample_ids(4, 1)
    common = dict(num_steps=cfg.num_image_tokens, prompt_ids=pid, sample_indices=sid, seed=0)

    apply = jax.jit(model.apply)

    def full(enc, dec):
        return np.asarray(apply(variables, jnp.asarray(enc), jnp.asarray(dec)))

    valid = np.isin(np.arange(cfg.decoder_vocab_size), np.arange(1, CODEBOOK + 1))

    @functools.partial(jax.jit, static_argnames=("temperature", "guidance_scale", "mesh"))
    def cached(variables, enc, temperature, guidance_scale=None, mesh=None):
        ttl, cache = make_tokens_to_logits(model, variables, enc)
        return decoding.sample(
            ttl, cache, temperature=temperature, guidance_scale=guidance_scale,
            num_valid_tokens=cfg.codebook_size + 1, mesh=mesh, **common,
        )  # fmt: skip

    # Greedy: the cached loop follows the argmax of the full decoder at every step.
    out = cached(variables, jnp.asarray(text), 0.0)
    tokens = np.asarray(out.tokens)
    logits = np.where(valid, full(text, shift_right(tokens)), -np.inf)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    expected = np.take_along_axis(log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.token_log_probs), expected, atol=2e-5)
    assert len({tuple(r) for r in tokens}) > 1

    # Guided greedy over 2B rows equals guiding the full decoder's logits on the shared path.
    both = jnp.asarray(np.concatenate([text, empty]))
    guided = np.asarray(cached(variables, both, 0.0, guidance_scale=1.2).tokens)
    cond, uncond = full(text, shift_right(guided)), full(empty, shift_right(guided))
    reference_logits = np.where(valid, uncond + 1.2 * (cond - uncond), -np.inf)
    np.testing.assert_array_equal(guided, reference_logits.argmax(-1))

    # Sampled with guidance, rows sharded over a 2-way 'data' axis (x4 'tensor'):
    # along the drawn path the log-probs are those of the guided full decoder.
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = cached(variables, both, 1.0, guidance_scale=1.2, mesh=mesh)
    assert sharded.tokens.sharding.spec[0] in ("data", ("data",)), sharded.tokens.sharding
    drawn = np.asarray(sharded.tokens)
    assert not np.array_equal(drawn, guided)
    cond, uncond = full(text, shift_right(drawn)), full(empty, shift_right(drawn))
    logits = np.where(valid, uncond + 1.2 * (cond - uncond), -np.inf)
    expected = np.take_along_axis(log_softmax(logits), drawn[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(sharded.token_log_probs), expected, atol=2e-5)
