"""Product codes (code_groups > 1): the VQGAN's product quantizer and the decoder's
per-digit embedding and heads (docs/COMPOSITIONALITY.md, the factorised-codes change)."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.models.config import ModelConfig, digit_weights
from parti_jax.models.transformer import EncoderDecoder
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.quantizer import FactorizedQuantizer, l2_normalize
from parti_jax.vqgan.train_step import _update_codebook_stats
from tests.models.test_model import CFG, ENC, greedy_fn, logits_of, random_params

PCFG = CFG.replace(codebook_size=36, code_group_sizes=(4, 9), scan_layers=False)  # 4 x 9 codes


def test_digit_weights_and_config_checks():
    assert digit_weights((4, 9)) == [9, 1] and digit_weights((2, 3, 5)) == [15, 5, 1]
    with pytest.raises(ValueError, match=r"multiply to 32, not codebook_size=40"):
        ModelConfig(codebook_size=40, code_group_sizes=(4, 8))
    with pytest.raises(ValueError, match=r"give \(\) or two or more sizes >= 2"):
        VQGANConfig(codebook_size=40, code_group_sizes=(40,))
    with pytest.raises(ValueError, match="code_dim=30 is not divisible by the 4 code groups"):
        VQGANConfig(codebook_size=16**4, code_dim=30, code_group_sizes=(16, 16, 16, 16))
    assert VQGANConfig(codebook_size=1024, code_group_sizes=[128, 8]).code_group_sizes == (128, 8)


def test_product_quantizer_is_the_nearest_product_code():
    q = FactorizedQuantizer(codebook_size=16, code_dim=8, out_dim=4, group_sizes=(4, 4))
    z = jax.random.normal(jax.random.key(0), (3, 5, 6))
    variables = nn.unbox(q.init(jax.random.key(1), z))
    assert variables["params"]["codebook"].shape == (8, 4)  # 2 groups x 4 rows, 4 dims each
    out, aux = q.apply(variables, z)
    codes = np.asarray(aux["codes"])
    assert codes.shape == (3, 5) and codes.min() >= 0 and codes.max() < 16
    # Brute force over all 16 product codes: the highest total similarity of the slices.
    latents = np.asarray(aux["latents"]).reshape(-1, 2, 4)
    table = np.asarray(l2_normalize(variables["params"]["codebook"])).reshape(2, 4, 4)
    joint = [(a * 4 + b, latents[:, 0] @ table[0, a] + latents[:, 1] @ table[1, b])
             for a, b in itertools.product(range(4), range(4))]  # fmt: skip
    best = np.stack([s for _, s in joint], axis=1).argmax(1)
    np.testing.assert_array_equal(codes.reshape(-1), best)
    # A code's vector is its digits' rows side by side; embedding goes through it.
    vec = np.asarray(q.apply(variables, jnp.asarray([6]), method=FactorizedQuantizer.vectors))
    np.testing.assert_allclose(vec[0], np.concatenate([table[0, 1], table[1, 2]]), rtol=1e-6)
    assert out.shape == (3, 5, 4)


def test_product_dead_codes_restart_per_group():
    codebook = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)
    counts = np.zeros(16, np.float32)
    counts[[0, 5]] = 10.0  # digits used: group 0 {0, 1}, group 1 {0, 1}
    stats = {"counts": jnp.zeros((1, 16)), "latents": jnp.ones((6, 4)),
             "reinitialised": jnp.zeros([], jnp.int32)}  # fmt: skip
    _, new, metrics = _update_codebook_stats(
        stats, codebook, jnp.asarray(counts), jnp.ones((6, 4)), jnp.asarray(0),
        jax.random.key(0), dead_code_reinit=True, threshold=1.0, group_sizes=(4, 4),
    )  # fmt: skip
    new = np.asarray(new)
    assert int(metrics["dead_codes_reinitialised"]) == 4  # rows 2, 3 of each group
    np.testing.assert_array_equal(new[[0, 1, 4, 5]], np.asarray(codebook)[[0, 1, 4, 5]])
    np.testing.assert_allclose(new[[2, 3, 6, 7]], 2**-0.5, rtol=1e-5)  # a latent slice


def test_decoder_probabilities_factorise_over_digits():
    params = random_params(PCFG)
    assert "token_embedder" not in params["decoder"] and "logits_dense" not in params["decoder"]
    dec = np.random.default_rng(1).integers(1, 37, (2, PCFG.num_image_tokens)).astype(np.int32)
    dec[:, 0] = 0
    logits = logits_of(PCFG, params, dec=dec)
    assert logits.shape == (2, PCFG.num_image_tokens, PCFG.decoder_vocab_size)
    assert logits[..., 0].max() < -1e8 and logits[..., 37:].max() < -1e8
    logp = jax.nn.log_softmax(logits, axis=-1)[..., 1:37].reshape(2, -1, 4, 9)
    digit0 = jax.scipy.special.logsumexp(logp, axis=-1)  # log p(first digit)
    digit1 = jax.scipy.special.logsumexp(logp, axis=-2)
    np.testing.assert_allclose(logp, digit0[..., :, None] + digit1[..., None, :], atol=1e-4)


def test_product_cached_decoding_matches_teacher_forcing():
    params = random_params(PCFG)
    inputs, step_logits, _ = greedy_fn(PCFG)(params, ENC)
    full = logits_of(PCFG, params, dec=np.asarray(inputs))
    np.testing.assert_allclose(np.asarray(step_logits), full, atol=2e-4, rtol=2e-4)
    model = EncoderDecoder(PCFG)
    embed = model.apply(
        {"params": params}, jnp.asarray([[0, 12]]), method=lambda m, t: m.decoder.embed_tokens(t)
    )
    tables = [params["decoder"]["product"][f"digit_embedder_{g}"]["embedding"] for g in (0, 1)]
    # id 12 is code 11 = digits (1, 2) of (4, 9); id 0 is BOS.
    np.testing.assert_allclose(embed[0, 1], tables[0][1] + tables[1][2], rtol=1e-6)
    np.testing.assert_allclose(
        embed[0, 0], params["decoder"]["product"]["bos_embedder"]["embedding"][0], rtol=1e-6
    )


def test_value_color_views_split_shape_from_colour():
    """Two scenes that differ only in colour have the same value view; in colour only the
    colour view changes, and it is flat within each patch."""
    import dataclasses

    from parti_jax.data import shapes
    from parti_jax.vqgan.vit_vqgan import ViTVQGAN, value_color_views

    spec, _ = shapes.generate_scene(1, "train")
    recoloured = dataclasses.replace(
        spec, objects=tuple(dataclasses.replace(o, color="blue") for o in spec.objects)
    )
    images = jnp.asarray(
        np.stack([shapes.render(s, 32) for s in (spec, recoloured)]).astype(np.float32) / 255
    )
    value, color = value_color_views(images, 4)
    np.testing.assert_allclose(value[0], value[1], atol=0.02)
    assert float(jnp.abs(color[0] - color[1]).max()) > 0.3
    tiles = np.asarray(color).reshape(2, 8, 4, 8, 4, 3)
    np.testing.assert_allclose(
        tiles, np.broadcast_to(tiles[:, :, :1, :, :1], tiles.shape), atol=1e-6
    )
    # A VQGAN with these views: recolouring keeps digit 0 (shape) of every cell.
    cfg = VQGANConfig(image_size=32, patch_size=4, encoder_width=32, encoder_depth=1,
                      encoder_heads=2, encoder_mlp_dim=64, decoder_width=32, decoder_depth=1,
                      decoder_heads=2, decoder_mlp_dim=64, codebook_size=64, code_dim=8,
                      code_group_sizes=(8, 8), code_group_views="value_color",
                      encoder_context="patch",
                      attention_window=1, position_embedding="none")  # fmt: skip
    model = ViTVQGAN(cfg)
    variables = model.init(jax.random.key(0), images)
    codes = np.asarray(model.apply(variables, images, method=ViTVQGAN.encode))
    np.testing.assert_array_equal(codes[0] // 8, codes[1] // 8)
    recon, aux = model.apply(variables, images)
    assert recon.shape == images.shape and aux["codes"].shape == (2, 8, 8)
    with pytest.raises(ValueError, match="needs two code_group_sizes and encoder_context='patch'"):
        VQGANConfig(code_group_views="value_color")
