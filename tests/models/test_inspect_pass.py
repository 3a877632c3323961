"""`EncoderDecoder.inspect`: the teacher-forced pass with every layer's cross-attention weights.

The weights are checked against the model's own logits (the same pass) and
against planted parameters whose cross-attention is known: with the query and
key projections of one layer set so that a decoder slot's query matches the
key of exactly one text position, that slot attends there.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from parti_jax.models.transformer import EncoderDecoder
from tests.models.test_model import CFG, DEC, ENC, logits_of, random_params


@pytest.mark.parametrize("scan", [False, True])
def test_inspect_matches_the_teacher_forced_pass(scan):
    cfg = dataclasses.replace(CFG, scan_layers=scan, dropout_rate=0.0)
    params = random_params(cfg)
    encoded, logits, probs = jax.jit(EncoderDecoder(cfg).apply, static_argnames="method")(
        {"params": params}, ENC, DEC, method=EncoderDecoder.inspect
    )
    np.testing.assert_allclose(np.asarray(logits), logits_of(cfg, params), rtol=2e-5, atol=2e-5)
    layers, batch, heads, n, lt = probs.shape
    assert (layers, batch, heads, n, lt) == (2, 2, 2, cfg.num_image_tokens, ENC.shape[1])
    assert encoded.shape == (2, ENC.shape[1], cfg.d_model)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    # Padding never receives weight: prompt 1 has 2 tokens (9, EOS).
    assert float(np.abs(np.asarray(probs)[:, 1, :, :, 2:]).max()) == 0.0


def test_planted_cross_attention_is_read_back():
    """Planted weights whose cross-attention is known. Text tokens 5, 6, 7 (prompt 0,
    positions 0-2) embed to one-hot features 1-3 and pass through the encoder
    unchanged; decoder slot t (which predicts cell t) starts as the one-hot feature
    1 + (grid row of cell t), and layer 0's query and key read features 1-3 only.
    So slot t attends to text position row(t); prompt 1 (an unplanted token and EOS)
    spreads its weight evenly over its two positions and none over padding."""
    cfg = dataclasses.replace(CFG, scan_layers=False, dropout_rate=0.0, text_positions="learned")
    params = jax.tree.map(lambda a: np.zeros_like(np.asarray(a)), random_params(cfg))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "norm" in jax.tree_util.keystr(path) and path[-1].key == "scale":
            leaf[:] = 1.0
    enc, dec = params["encoder"], params["decoder"]
    for i, token in enumerate((5, 6, 7)):
        enc["token_embedder"]["embedding"][token, 1 + i] = 1.0
    rows, cols = cfg.image_grid
    for r in range(rows):
        dec["position_embedder"]["row"]["embedding"][r, 1 + r] = 1.0
    cross = dec["layers_0"]["cross_attention"]
    for f in (1, 2, 3):
        cross["query"]["kernel"][f, :, f - 1] = 3.0
        cross["key"]["kernel"][f, :, f - 1] = 3.0
    _, _, probs = EncoderDecoder(cfg).apply(
        {"params": params}, ENC, DEC, method=EncoderDecoder.inspect
    )
    layer0 = np.asarray(probs)[0]  # [B, heads, N, Lt]
    slots = np.arange(cfg.num_image_tokens)
    for head in range(cfg.num_heads):
        np.testing.assert_array_equal(layer0[0, head].argmax(-1), slots // cols)
        assert layer0[0, head, slots, slots // cols].min() > 0.99
        np.testing.assert_allclose(layer0[1, head, :, :2], 0.5, atol=1e-6)
        assert layer0[1, head, :, 2:].max() == 0.0
