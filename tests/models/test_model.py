"""EncoderDecoder behaviour: cached decoding, masks, scan layouts, MLP/remat/dropout/dtype options.

Parameters are drawn with numpy from `jax.eval_shape(model.init)` (random
values, every leaf non-trivial) so that only the functions under test are
compiled; `model.init` itself is compiled in test_partitioning.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from parti_jax.models import transformer
from parti_jax.models.config import ModelConfig
from parti_jax.models.layers import (
    banded_attention,
    banded_block_size,
    conv_band,
    conv_sparse_mask,
    param_count,
    rotary,
    splash_attention,
)
from parti_jax.models.transformer import (
    CACHE_KEYS,
    EncoderDecoder,
    make_tokens_to_logits,
    scan_to_unscanned,
    unscanned_to_scan,
)
from parti_jax.partitioning import EMBED, LAYERS, get_rules

# A 3x4 grid (not square) so that row/column positions cannot be swapped unnoticed.
CFG = ModelConfig(
    text_vocab_size=64,
    codebook_size=40,
    image_grid=(3, 4),
    max_text_length=8,
    d_model=32,
    num_heads=2,
    mlp_dim=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dtype="float32",
    dropout_rate=0.1,
    conv_kernel_size=3,
)
N = CFG.num_image_tokens
# Two prompts of different lengths, right-padded with 0, ending in EOS (1).
ENC = np.array([[5, 6, 7, 1, 0, 0], [9, 1, 0, 0, 0, 0]], np.int32)
DEC = np.random.default_rng(0).integers(1, CFG.codebook_size + 1, (2, N)).astype(np.int32)
DEC[:, 0] = 0  # BOS


def abstract_variables(cfg: ModelConfig) -> dict:
    """The boxed abstract variables of `EncoderDecoder(cfg).init` (nothing compiled)."""
    return jax.eval_shape(EncoderDecoder(cfg).init, jax.random.key(0), ENC, DEC)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random float32 params with the model's structure (scanned or not, per cfg)."""
    shapes = nn.unbox(abstract_variables(cfg)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape).astype(np.float32)), shapes
    )


@functools.cache
def apply_fn(cfg: ModelConfig):
    return jax.jit(EncoderDecoder(cfg).apply, static_argnames=("enable_dropout",))


def logits_of(cfg, params, enc=ENC, dec=DEC, **kw):
    return np.asarray(apply_fn(cfg)({"params": params}, enc, dec, **kw))


@functools.cache
def greedy_fn(cfg: ModelConfig):
    """Greedy decoding through the sampling contract, in one jitted loop."""
    model = EncoderDecoder(cfg)

    @jax.jit
    def greedy(params, enc):
        tokens_to_logits, cache = make_tokens_to_logits(model, params, enc)
        batch = enc.shape[0]

        def body(carry, step):
            tokens, cache = carry
            logits, cache = tokens_to_logits(tokens, cache, step)
            best = jnp.argmax(logits[:, 1 : cfg.codebook_size + 1], axis=-1) + 1
            return (best[:, None].astype(jnp.int32), cache), (tokens[:, 0], logits)

        start = (jnp.zeros((batch, 1), jnp.int32), cache)
        _, (inputs, logits) = jax.lax.scan(body, start, jnp.arange(N, dtype=jnp.int32))
        return inputs.T, jnp.swapaxes(logits, 0, 1), cache

    return greedy


CASES = {
    "full_scanned": CFG,
    "conv_sparse_unscanned": CFG.replace(decoder_attention="conv_sparse", scan_layers=False),
}


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def _layout(cfg, params):
    return params if cfg.scan_layers else scan_to_unscanned(params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decoding_matches_teacher_forcing(case, params):
    cfg = CASES[case]
    p = _layout(cfg, params)
    inputs, step_logits, cache = greedy_fn(cfg)(p, ENC)
    inputs, step_logits = np.asarray(inputs), np.asarray(step_logits)
    assert inputs.shape == (2, N) and step_logits.shape == (2, N, cfg.decoder_vocab_size)
    assert step_logits.dtype == np.float32
    # Cache layout promised to samplers: every leaf [layers, batch, ...].
    assert sorted(cache) == sorted(CACHE_KEYS)
    for leaf in cache.values():
        assert leaf.shape[:2] == (cfg.num_decoder_layers, 2)
    assert cache["self_key"].shape[2] == N
    full = logits_of(cfg, p, dec=inputs)
    np.testing.assert_allclose(step_logits, full, atol=2e-4, rtol=2e-4)
    # Same greedy tokens: the token chosen at step t is the input at t + 1.
    greedy = np.argmax(full[:, :, 1 : cfg.codebook_size + 1], axis=-1) + 1
    np.testing.assert_array_equal(greedy[:, :-1], inputs[:, 1:])
    # The encoder's text lengths reached the cross-attention cache.
    np.testing.assert_array_equal(np.asarray(cache["text_lengths"][0]), [4, 2])


@pytest.mark.parametrize("case", sorted(CASES))
def test_named_decoder_methods(case, params):
    cfg = CASES[case]
    p = _layout(cfg, params)
    model, variables = EncoderDecoder(cfg), {"params": p}
    apply = jax.jit(model.apply, static_argnames="method")
    # Hidden states then their logits, or the encoding then the teacher-forced
    # decoder: both are the whole teacher-forced pass.
    full = logits_of(cfg, p)
    hidden = apply(variables, ENC, DEC, method=EncoderDecoder.hidden_states)
    assert hidden.shape == (2, N, cfg.d_model)
    logits = apply(variables, hidden, method=EncoderDecoder.logits_from_hidden)
    np.testing.assert_allclose(logits, full, atol=1e-5, rtol=1e-5)
    encoded = apply(variables, ENC, method=EncoderDecoder.encode)
    decoded = apply(variables, encoded, ENC, DEC, method=EncoderDecoder.decode)
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)
    # Cross-attention K/V: each layer's own key and value projections of the text.
    key, value = apply(variables, encoded, method=lambda m, e: m.decoder.cross_kv(e))
    cross = params["decoder"]["layers"]["cross_attention"]  # scanned: [layers, ...]
    for i in range(cfg.num_decoder_layers):
        for got, proj in ((key, "key"), (value, "value")):
            want = jnp.einsum("btd,dhk->bthk", encoded, cross[proj]["kernel"][i])
            np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=1e-5)


def test_make_tokens_to_logits_accepts_variables(params):
    model = EncoderDecoder(CFG)
    cache_a = jax.eval_shape(lambda p: make_tokens_to_logits(model, p, ENC)[1], params)
    cache_b = jax.eval_shape(lambda p: make_tokens_to_logits(model, {"params": p}, ENC)[1], params)
    assert jax.tree.map(lambda x: x.shape, cache_a) == jax.tree.map(lambda x: x.shape, cache_b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoder_is_causal(case, params):
    cfg = CASES[case]
    p = _layout(cfg, params)
    base = logits_of(cfg, p)
    t = 5
    changed = DEC.copy()
    changed[:, t:] = (changed[:, t:] % cfg.codebook_size) + 1  # new tokens from slot t on
    assert (changed[:, t:] != DEC[:, t:]).all()
    other = logits_of(cfg, p, dec=changed)
    np.testing.assert_allclose(other[:, :t], base[:, :t], atol=1e-6)
    # Slot t sees its own input, so its logits must move: the test can fail.
    assert np.abs(other[:, t] - base[:, t]).max() > 1e-3


def test_rotary_scores_depend_on_the_offset_only():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32) for _ in range(2))

    def score(i, j):  # per head: rotated query at position i . rotated key at j
        qi = rotary(q, jnp.array([i]))
        kj = rotary(k, jnp.array([j]))
        return np.asarray(jnp.einsum("bthd,bshd->h", qi, kj))

    np.testing.assert_allclose(score(3, 1), score(9, 7), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score(0, 0), np.asarray(jnp.einsum("bthd,bshd->h", q, k)), 1e-5)
    assert np.abs(score(3, 1) - score(1, 3)).max() > 1e-3  # the sign of the offset counts


def test_rotary_text_positions():
    cfg = CFG.replace(text_positions="rotary")
    params = random_params(cfg)
    assert "position_embedder" not in params["encoder"]
    assert "position_embedder" in random_params(CFG)["encoder"]
    base = logits_of(cfg, params)
    # Word order still matters without a position table (the rotation carries it) ...
    swapped = ENC.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert np.abs(logits_of(cfg, params, enc=swapped)[0] - base[0]).max() > 1e-3
    # ... padding is still masked, and cached decoding still matches teacher forcing.
    np.testing.assert_allclose(
        logits_of(cfg, params, enc=np.pad(ENC, ((0, 0), (0, 2)))), base, atol=1e-5
    )
    inputs, step_logits, _ = greedy_fn(cfg)(params, ENC)
    full = logits_of(cfg, params, dec=np.asarray(inputs))
    np.testing.assert_allclose(np.asarray(step_logits), full, atol=2e-4, rtol=2e-4)


def test_text_padding_is_masked(params):
    base = logits_of(CFG, params)
    longer = np.pad(ENC, ((0, 0), (0, 2)))  # two more pad ids
    np.testing.assert_allclose(logits_of(CFG, params, enc=longer), base, atol=1e-5)
    # A real token in place of padding does change the image logits.
    altered = ENC.copy()
    altered[1, 2] = 7
    assert np.abs(logits_of(CFG, params, enc=altered)[1] - base[1]).max() > 1e-3


def _naive_conv_mask(rows: int, cols: int, k: int) -> np.ndarray:
    """By hand, from grid cells: query slot t predicts cell t; key slot s >= 1 holds
    cell s - 1 (slot 0: BOS, which only the first prediction sees)."""
    n = rows * cols
    mask = np.zeros((n, n), bool)
    mask[0, 0] = True
    for t in range(n):
        tr, tc = divmod(t, cols)
        for cell in range(t):  # the cells written before cell t
            cr, cc = divmod(cell, cols)
            mask[t, cell + 1] = abs(tr - cr) <= k // 2 and abs(tc - cc) <= k // 2
    return mask


@pytest.mark.parametrize(
    "grid,k", [((3, 4), 3), ((4, 4), 3), ((5, 3), 5), ((2, 6), 3), ((6, 6), 5), ((8, 8), 7)]
)
def test_conv_sparse_mask_matches_reference(grid, k):
    mask = conv_sparse_mask(grid, k)
    np.testing.assert_array_equal(mask, _naive_conv_mask(*grid, k))
    assert not np.triu(mask, 1).any()  # causal
    assert mask.any(axis=1).all()  # no row is fully masked
    rows, cols = np.nonzero(mask)
    assert (rows - cols < conv_band(grid, k)).all()  # every key in the band
    if k < 2 * max(grid) - 1:
        assert mask.sum() < np.tril(np.ones_like(mask)).sum()  # really sparse


def test_conv_sparse_window_is_centred_on_the_predicted_cell():
    # 4x4 grid, k = 3: slot 4 predicts cell (1, 0); slot s holds cell s - 1.
    mask = conv_sparse_mask((4, 4), 3)
    assert np.flatnonzero(mask[4]).tolist() == [1, 2]  # cells (0, 0) and (0, 1)
    assert np.flatnonzero(mask[0]).tolist() == [0]  # the first prediction sees BOS
    # Cell (2, 2) = slot 10 sees (1, 1), (1, 2), (1, 3) and (2, 1).
    assert np.flatnonzero(mask[10]).tolist() == [6, 7, 8, 10]


def test_conv_sparse_mask_with_a_wide_kernel_is_causal_over_cells():
    expected = np.tril(np.ones((12, 12), bool))
    expected[1:, 0] = False  # BOS only for the first prediction
    np.testing.assert_array_equal(conv_sparse_mask((3, 4), 9), expected)


def test_conv_kernel_size_is_validated():
    for k in (1, 4):
        with pytest.raises(ValueError, match=f"conv_kernel_size={k} must be odd and >= 3"):
            CFG.replace(conv_kernel_size=k)


def _dense_masked(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None])


@pytest.mark.parametrize("grid,k,block", [((8, 8), 3, 8), ((6, 10), 5, 12), ((8, 8), 5, 4)])
def test_banded_attention_matches_dense_masked_attention(grid, k, block):
    n, band = grid[0] * grid[1], conv_band(grid, k)
    mask = conv_sparse_mask(grid, k)
    rng = np.random.default_rng(1)
    q, key, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)).astype(np.float32)) for _ in range(3))
    out = banded_attention(q, key, v, mask, band, block)
    np.testing.assert_allclose(out, _dense_masked(q, key, v, mask), atol=1e-5, rtol=1e-5)

    # Gradients too (training runs the banded path).
    def loss(fn):
        return lambda q, key, v: jnp.sum(jnp.sin(fn(q, key, v)))

    banded = jax.grad(loss(lambda *a: banded_attention(*a, mask, band, block)), (0, 1, 2))
    dense = jax.grad(loss(lambda *a: _dense_masked(*a, mask)), (0, 1, 2))
    for a, b in zip(banded(q, key, v), dense(q, key, v), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # The cuDNN route's arguments (sliding window + mask) mean the same attention.
    window = jax.nn.dot_product_attention(
        q, key, v, mask=jnp.asarray(mask)[None, None], is_causal=True,
        local_window_size=(band - 1, 0),
    )  # fmt: skip
    np.testing.assert_allclose(window, out, atol=1e-5, rtol=1e-5)


def test_splash_attention_matches_dense_masked_attention_on_a_mesh(cpu_devices):
    # The Pallas TPU kernel, interpreted on the CPU: a 16x16 grid (256 slots, two
    # 128-blocks), k = 5, forward and gradients; then per shard under a
    # data=2 x fsdp=2 x tensor=2 mesh with the fsdp_tp rules (batch and heads split).
    grid, k = (16, 16), 5
    mask = conv_sparse_mask(grid, k)
    rng = np.random.default_rng(3)
    q, key, v = (jnp.asarray(rng.normal(size=(4, 256, 2, 8)).astype(np.float32)) for _ in range(3))
    reference = _dense_masked(q, key, v, mask)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    splash = jax.jit(jax.value_and_grad(loss(lambda *a: splash_attention(*a, mask)), (0, 1, 2)))
    dense = jax.value_and_grad(loss(lambda *a: _dense_masked(*a, mask)), (0, 1, 2))
    (value, grads), (value_ref, grads_ref) = splash(q, key, v), dense(q, key, v)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("fsdp_tp")):
        sharded = jax.jit(lambda *a: splash_attention(*a, mask))
        hlo = sharded.lower(q, key, v).as_text()
        out = sharded(q, key, v)
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo  # run per shard
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 128 positions, got 64"):
        splash_attention(q[:, :64], key[:, :64], v[:, :64], mask[:64, :64])
    # Chosen in the model (ModelConfig.conv_attention_kernel; 'auto' picks it on TPU).
    cfg = CFG.replace(image_grid=grid, conv_kernel_size=k, decoder_attention="conv_sparse")
    params = random_params(cfg)
    dec = np.random.default_rng(4).integers(1, cfg.codebook_size + 1, (2, 256)).astype(np.int32)
    dec[:, 0] = 0
    logits = {
        kernel: np.asarray(
            EncoderDecoder(cfg.replace(conv_attention_kernel=kernel)).apply(
                {"params": params}, ENC, dec
            )
        )
        for kernel in ("splash", "dense")
    }
    np.testing.assert_allclose(logits["splash"], logits["dense"], atol=1e-4, rtol=1e-4)


def test_banded_attention_rejects_a_mask_outside_its_band():
    mask = np.tril(np.ones((16, 16), bool))
    x = jnp.zeros((1, 16, 1, 4))
    with pytest.raises(ValueError, match="outside the causal band of 5"):
        banded_attention(x, x, x, mask, 5, 4)


def test_banded_block_size_reads_at_most_half_the_keys():
    # Parti's 32x32 grid with an 11x11 kernel: band 165, blocks of 64 -> 228 of 1024 keys.
    assert conv_band((32, 32), 11) == 165
    assert banded_block_size(1024, 165) == 64
    assert banded_block_size(12, 5) is None  # tiny grids stay dense


def test_conv_sparse_banded_model_matches_dense_and_cached_decoding(monkeypatch):
    # An 8x8 grid with k = 3: band 9, so teacher forcing takes the banded path.
    cfg = CFG.replace(
        image_grid=(8, 8), decoder_attention="conv_sparse", scan_layers=False, dropout_rate=0.0
    )
    assert banded_block_size(cfg.num_image_tokens, conv_band(cfg.image_grid, 3)) == 8
    p = random_params(cfg)
    dec = np.random.default_rng(2).integers(1, cfg.codebook_size + 1, (2, 64)).astype(np.int32)
    dec[:, 0] = 0
    model = EncoderDecoder(cfg)
    banded = np.asarray(jax.jit(model.apply)({"params": p}, ENC, dec))
    monkeypatch.setattr(transformer, "banded_block_size", lambda *a: None)
    dense = np.asarray(jax.jit(model.apply)({"params": p}, ENC, dec))
    np.testing.assert_allclose(banded, dense, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    # The explicit kernel choices agree ('banded' even where it would not save keys).
    for kernel in ("banded", "dense"):
        chosen = EncoderDecoder(cfg.replace(conv_attention_kernel=kernel))
        out = np.asarray(jax.jit(chosen.apply)({"params": p}, ENC, dec))
        np.testing.assert_allclose(out, banded, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="conv_attention_kernel='cudnn' needs attention_impl"):
        cfg.replace(conv_attention_kernel="cudnn")
    # Cached decoding (static window reads) gives the teacher-forced logits.
    tokens_to_logits, cache = make_tokens_to_logits(model, p, ENC)
    step = jax.jit(tokens_to_logits)
    for t in range(64):
        logits, cache = step(jnp.asarray(dec[:, t : t + 1]), cache, jnp.int32(t))
        np.testing.assert_allclose(np.asarray(logits), banded[:, t], atol=2e-4, rtol=2e-4)


def test_scan_and_unscanned_layers_agree(params):
    cfg_scan = CASES["conv_sparse_unscanned"].replace(scan_layers=True)
    cfg_unrolled = CASES["conv_sparse_unscanned"]
    unrolled = scan_to_unscanned(params)
    assert "layers_1" in unrolled["decoder"] and "layers" not in unrolled["decoder"]
    np.testing.assert_allclose(
        logits_of(cfg_scan, params), logits_of(cfg_unrolled, unrolled), atol=1e-5, rtol=1e-5
    )
    # Round trip is exact.
    back = unscanned_to_scan(unrolled)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The structures match what each layout's init produces.
    shapes_unrolled = nn.unbox(abstract_variables(cfg_unrolled)["params"])
    assert jax.tree.structure(shapes_unrolled) == jax.tree.structure(unrolled)


def test_scan_conversion_keeps_logical_axes():
    boxed = {
        "layers": {
            "w": nn.LogicallyPartitioned(jnp.arange(6.0).reshape(2, 3), names=(LAYERS, EMBED))
        }
    }
    unrolled = scan_to_unscanned(boxed)
    assert unrolled["layers_1"]["w"].names == (EMBED,)
    np.testing.assert_array_equal(unrolled["layers_1"]["w"].value, [3.0, 4.0, 5.0])
    back = unscanned_to_scan(unrolled)
    assert back["layers"]["w"].names == (LAYERS, EMBED)
    with pytest.raises(ValueError, match="not 0..1"):
        unscanned_to_scan({"layers_0": {"w": 1}, "layers_2": {"w": 1}})


@pytest.mark.parametrize("activation", ["gated_gelu", "swiglu"])
def test_gated_mlp(activation):
    cfg = CFG.replace(mlp_activation=activation)
    shapes = abstract_variables(cfg)
    assert sorted(shapes["params"]["decoder"]["layers"]["mlp"]) == ["wi_0", "wi_1", "wo"]
    layers = CFG.num_encoder_layers + CFG.num_decoder_layers
    added = param_count(shapes) - param_count(abstract_variables(CFG))
    assert added == layers * CFG.d_model * CFG.mlp_dim
    if activation == "swiglu":  # one compile is enough to show it runs
        logits = logits_of(cfg, random_params(cfg))
        assert logits.shape == (2, N, cfg.decoder_vocab_size) and np.isfinite(logits).all()


def _loss(cfg):
    model = EncoderDecoder(cfg)
    return lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ENC, DEC))[..., 3])


def test_remat_policies_are_applied_and_keep_gradients(params):
    for policy in ("full", "dots_with_no_batch_dims_saveable"):
        jaxpr = str(jax.make_jaxpr(jax.grad(_loss(CFG.replace(remat_policy=policy))))(params))
        assert "checkpoint" in jaxpr or "remat" in jaxpr, policy
    plain = str(jax.make_jaxpr(jax.grad(_loss(CFG)))(params))
    assert "checkpoint" not in plain and "remat" not in plain
    # One compile for both: remat recomputes, it must not change the gradients.
    both = jax.jit(
        lambda p: (jax.grad(_loss(CFG))(p), jax.grad(_loss(CFG.replace(remat_policy="full")))(p))
    )
    reference, remat = both(params)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(remat)) > 0


def _saved_shapes(fn, *args) -> list[str]:
    """Shapes of the residuals the backward pass of `fn` keeps (jax's own listing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return [line.split()[0] for line in out.getvalue().splitlines()]


def test_named_remat_policies_save_the_named_activations(params):
    # Per-head activations of the scanned decoder layers: [layers, B, N, heads, kv].
    layers = CFG.num_decoder_layers
    heads = f"f32[{layers},2,{N},{CFG.num_heads},{CFG.kv_dim}]"
    hidden = f"f32[{layers},2,{N},{CFG.d_model}]"  # [layers, B, N, D]
    counts = {}
    for policy in ("full", "save_qkv_attention_out", "save_qkv_attention_out_mlp_in"):
        saved = _saved_shapes(_loss(CFG.replace(remat_policy=policy)), params)
        counts[policy] = (saved.count(heads), saved.count(hidden))
    # 'full' keeps no per-head activation; the named policies keep the self-attention
    # Q, K, V and output and the cross-attention Q and output; + the MLP input.
    assert counts["full"][0] == 0
    assert counts["save_qkv_attention_out"][0] == 6
    assert counts["save_qkv_attention_out_mlp_in"] == (6, counts["save_qkv_attention_out"][1] + 1)
    grads = jax.jit(
        lambda p: (
            jax.grad(_loss(CFG))(p),
            jax.grad(_loss(CFG.replace(remat_policy="save_qkv_attention_out_mlp_in")))(p),
        )
    )(params)
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_dropout_rng_impls_draw_other_fixed_masks(params, impl):
    cfg = CFG.replace(dropout_rng_impl=impl)
    raw = jax.random.PRNGKey(3)
    key = transformer.dropout_key(cfg, raw)
    assert str(jax.random.key_impl(key)) == impl
    assert transformer.dropout_key(CFG, raw) is raw  # threefry: the step's key itself
    base = logits_of(CFG, params)
    drop = logits_of(cfg, params, enable_dropout=True, rngs={"dropout": key})
    again = logits_of(cfg, params, enable_dropout=True, rngs={"dropout": key})
    threefry = logits_of(CFG, params, enable_dropout=True, rngs={"dropout": raw})
    np.testing.assert_array_equal(drop, again)
    assert np.abs(drop - base).max() > 1e-3 and np.abs(drop - threefry).max() > 1e-3
    with pytest.raises(ValueError, match="dropout_rng_impl"):
        CFG.replace(dropout_rng_impl="philox")


def test_dropout_only_when_enabled(params):
    base = logits_of(CFG, params)
    key_a, key_b = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(
        logits_of(CFG, params, enable_dropout=False, rngs={"dropout": key_a}), base
    )
    drop_a = logits_of(CFG, params, enable_dropout=True, rngs={"dropout": key_a})
    drop_a2 = logits_of(CFG, params, enable_dropout=True, rngs={"dropout": key_a})
    drop_b = logits_of(CFG, params, enable_dropout=True, rngs={"dropout": key_b})
    np.testing.assert_array_equal(drop_a, drop_a2)
    assert np.abs(drop_a - base).max() > 1e-3
    assert np.abs(drop_a - drop_b).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits(params):
    cfg = CFG.replace(dtype="bfloat16")
    shapes = abstract_variables(cfg)
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype("float32")}
    encoded = jax.eval_shape(
        functools.partial(EncoderDecoder(cfg).apply, method=EncoderDecoder.encode),
        {"params": params},
        ENC,
    )
    assert encoded.dtype == jnp.bfloat16 and encoded.shape == (2, ENC.shape[1], cfg.d_model)
    logits = logits_of(cfg, params)
    assert logits.dtype == np.float32
    reference = logits_of(CFG, params)
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 0.1 * scale  # same model, bf16 rounding only


def test_bad_inputs_raise_clear_errors():
    model = EncoderDecoder(CFG)
    too_long = np.ones((1, CFG.max_text_length + 1), np.int32)
    with pytest.raises(ValueError, match="max_text_length=8"):
        jax.eval_shape(model.init, jax.random.key(0), too_long, DEC[:1])
    with pytest.raises(ValueError, match="3x4 = 12 tokens"):
        jax.eval_shape(model.init, jax.random.key(0), ENC, np.zeros((2, N + 1), np.int32))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(d_model=30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
        (dict(mlp_activation="gelux"), "mlp_activation='gelux' is not one of"),
        (dict(remat_policy="some"), "remat_policy='some'"),
        (dict(conv_kernel_size=4), "conv_kernel_size=4 must be odd"),
        (dict(image_grid=(4, 4, 4)), "image_grid"),
        (dict(dtype="float64"), "dtype='float64'"),
        (dict(num_decoder_layers=0), "num_decoder_layers=0"),
        (dict(text_positions="relative"), "text_positions='relative' is not one of"),
        (dict(text_positions="rotary", head_dim=5), "needs an even head width, got 5"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CFG.replace(**changes)


def test_config_derived_sizes():
    assert ModelConfig().decoder_vocab_size == 8320  # 8192 + 1 -> multiple of 128
    assert CFG.decoder_vocab_size == 128 and CFG.num_image_tokens == 12
    assert CFG.replace(head_dim=8).kv_dim == 8 and CFG.kv_dim == 16


def test_context_free_encoder_keeps_each_word_to_itself():
    """encoder_attention=False: MLP-only encoder layers, so a token's state depends on the
    token and its position only (the compositionality experiment's text side)."""
    cfg = dataclasses.replace(CFG, encoder_attention=False, text_positions="learned")
    params = random_params(cfg)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert not [p for p in paths if "encoder" in p and "attention" in p]
    model = EncoderDecoder(cfg)
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=EncoderDecoder.encode))
    a = np.asarray(encode(params, ENC))
    other = ENC.copy()
    other[0, 0] = 11  # another first word
    b = np.asarray(encode(params, other))
    np.testing.assert_array_equal(a[0, 1:], b[0, 1:])
    assert not np.allclose(a[0, 0], b[0, 0])
    with pytest.raises(ValueError, match="text_positions='learned'"):
        dataclasses.replace(CFG, encoder_attention=False, text_positions="rotary")
