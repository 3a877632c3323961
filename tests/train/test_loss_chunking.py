"""Chunked cross-entropy (`train_step(loss_chunk_size=...)`): same loss and gradients as
the whole-logits loss, less compiled temporary memory, and a clear error for a bad size."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder
from parti_jax.train import t2i
from parti_jax.train.loop import LoopConfig
from parti_jax.train.synthetic import SyntheticCodesIterator

# A vocabulary (1024) much wider than the model (32) so the logits dominate memory.
CFG = ModelConfig(
    text_vocab_size=64,
    codebook_size=1000,
    image_grid=(4, 8),
    max_text_length=8,
    d_model=32,
    num_heads=2,
    mlp_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.1,
    dtype="float32",
)
BATCH = 4


def _batch(config: ModelConfig = CFG) -> dict[str, jax.Array]:
    it = SyntheticCodesIterator(
        batch_size=BATCH,
        text_length=config.max_text_length,
        text_vocab_size=config.text_vocab_size,
        codebook_size=config.codebook_size,
        image_grid=config.image_grid,
        seed=0,
    )
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    # Uneven weights, so a chunk that dropped or double-counted tokens would show.
    weights = np.ones(batch["decoder_loss_weights"].shape, np.float32)
    weights[0, -5:] = 0.0
    weights[1, :3] = 0.5
    batch["decoder_loss_weights"] = jnp.asarray(weights)
    return batch


def _params(config: ModelConfig = CFG):
    batch = _batch(config)
    shapes = jax.eval_shape(
        EncoderDecoder(config).init,
        jax.random.key(0),
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
    )
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32)),
        nn.unbox(shapes["params"]),
    )


def _loss_and_grad(loss_chunk_size, z_loss=1e-3):
    loss_fn = functools.partial(
        t2i._loss_fn,
        model=EncoderDecoder(CFG),
        z_loss=z_loss,
        scale=7.0,
        loss_chunk_size=loss_chunk_size,
    )
    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return fn(_params(), _batch(), jax.random.key(3))


def test_chunked_loss_and_gradients_match_whole_logits():
    (loss, aux), grads = _loss_and_grad(None)
    for chunk in (8,):  # 4 chunks of 8 of the 32 image tokens
        (c_loss, c_aux), c_grads = _loss_and_grad(chunk)
        np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
        for k in aux:
            np.testing.assert_allclose(c_aux[k], aux[k], rtol=1e-5, atol=1e-7, err_msg=k)
        flat, c_flat = jax.tree.leaves(grads), jax.tree.leaves(c_grads)
        assert len(flat) == len(c_flat)
        for g, c in zip(flat, c_flat, strict=True):
            np.testing.assert_allclose(c, g, rtol=1e-4, atol=1e-6)
    # Dropout was on (the same masks in both paths) and the z-loss counted.
    assert float(aux["z_loss"]) > 0


def test_eval_step_chunked_matches():
    model, params, batch = EncoderDecoder(CFG), _params(), _batch()
    whole = jax.jit(functools.partial(t2i.eval_step, model=model))(params, batch)
    chunked = jax.jit(functools.partial(t2i.eval_step, model=model, loss_chunk_size=4))(
        params, batch
    )
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, err_msg=k)


def test_chunking_lowers_compiled_temporary_memory():
    def temp_bytes(chunk):
        loss_fn = functools.partial(
            t2i._loss_fn,
            model=EncoderDecoder(CFG),
            z_loss=0.0,
            scale=1.0,
            loss_chunk_size=chunk,
        )
        grad_fn = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0]))
        compiled = grad_fn.lower(_params(), _batch(), jax.random.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = BATCH * CFG.num_image_tokens * CFG.decoder_vocab_size * 4
    whole, chunked = temp_bytes(None), temp_bytes(4)
    # Whole: logits plus their gradient live together; chunked: an eighth of that.
    assert whole > logits_bytes
    assert chunked < whole - logits_bytes, (whole, chunked, logits_bytes)


def test_bad_chunk_size_is_named(tmp_path):
    with pytest.raises(ValueError, match="loss_chunk_size=5 must be None or a positive divisor"):
        t2i.check_loss_chunk_size(5, CFG.num_image_tokens)
    with pytest.raises(ValueError, match="train.loss_chunk_size=0 must be"):
        t2i.train(
            workdir=str(tmp_path),
            model_config=CFG,
            batch_size=8,
            loop=LoopConfig(num_steps=1),
            text_length=8,
            loss_chunk_size=0,
        )
