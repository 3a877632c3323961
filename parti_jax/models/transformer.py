"""The Parti encoder-decoder (T5X style): text encoder, image-token decoder, cached decoding.

Built from `models/layers.py`: pre-norm blocks, a final norm on the encoder and
decoder outputs, learned (or rotary) text positions and learned 2-D (row +
column) image positions, no relative-position bias (it would block fused
attention kernels); the output projection is untied (the paper's counts include it).

API (other modules rely on it):

    model = EncoderDecoder(config)
    variables = model.init(rngs, encoder_input_tokens, decoder_input_tokens)
    logits = model.apply(variables, enc, dec, enable_dropout=True, rngs={"dropout": key})
    encoded = model.apply(variables, enc, method=EncoderDecoder.encode)
    logits = model.apply(variables, encoded, enc, dec, method=EncoderDecoder.decode)
    hidden = model.apply(variables, enc, dec, method=EncoderDecoder.hidden_states)
    logits = model.apply(variables, hidden, method=EncoderDecoder.logits_from_hidden)
    tokens_to_logits, cache = make_tokens_to_logits(model, params, enc)
    encoded, logits, cross_attention = model.apply(variables, enc, dec,
                                                   method=EncoderDecoder.inspect)

Text is right-padded with 0 and ends in EOS; decoder slot t holds the token
of cell t - 1 (slot 0 holds BOS = 0) and predicts cell t.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.models.config import DTYPES, NAMED_REMAT_POLICIES, ModelConfig, digit_weights
from parti_jax.models.layers import (
    HIDDEN_AXES,
    Attention,
    DenseGeneral,
    Embed,
    EncoderLayer,
    ImagePositions,
    LayerSpec,
    LayerStack,
    Mlp,
    banded_attention,
    banded_block_size,
    blocked_single_query_attention,
    constrain,
    conv_band,
    conv_sparse_mask,
    layer_stack,
    run_stack,
    scan_to_unscanned,  # noqa: F401 - re-exported
    single_query_attention,
    splash_attention,
    text_lengths,
    unscanned_to_scan,  # noqa: F401 - re-exported
)
from parti_jax.partitioning import ACT_BATCH, ACT_LENGTH, ACT_VOCAB, EMBED, POSITION, VOCAB

Array = jax.Array
PyTree = Any
TokensToLogits = Callable[[Array, PyTree, Array], tuple[Array, PyTree]]

CACHE_KEYS = ("self_key", "self_value", "cross_key", "cross_value", "text_lengths")


def layer_spec(config: ModelConfig) -> LayerSpec:
    """The norms, attention and MLP of every encoder and decoder layer."""
    return LayerSpec(
        width=config.d_model,
        num_heads=config.num_heads,
        head_dim=config.kv_dim,
        mlp_dim=config.mlp_dim,
        activation=config.mlp_activation,
        norm_type=config.norm_type,
        norm_epsilon=config.layer_norm_epsilon,
        dtype=config.compute_dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        dropout_rate=config.dropout_rate,
    )


def _stack(
    layer: Callable[..., nn.Module], config: ModelConfig, num_layers: int, **kw: Any
) -> LayerStack:
    """`num_layers` layers, scanned and rematerialised as the config says."""
    policy = config.remat_policy  # 'full' rematerialises with no policy: it saves nothing
    if policy in NAMED_REMAT_POLICIES:
        remat_policy = jax.checkpoint_policies.save_only_these_names(*NAMED_REMAT_POLICIES[policy])
    elif policy not in ("none", "full"):
        remat_policy = getattr(jax.checkpoint_policies, policy)
    else:
        remat_policy = None
    return layer_stack(
        layer,
        num_layers,
        scan=config.scan_layers,
        remat=policy != "none",
        remat_policy=remat_policy,
        **kw,
    )


def dropout_key(config: ModelConfig, key: Array) -> Array:
    """The key of a training step's dropout masks (`rngs={'dropout': ...}`), from
    the step's raw threefry key: itself, or a key of ModelConfig.dropout_rng_impl
    seeded by 32 bits drawn from it."""
    if config.dropout_rng_impl == "threefry":
        return key
    seed = jax.random.bits(key, (), jnp.uint32)
    return jax.random.key(seed, impl=config.dropout_rng_impl)


# ------------------------------------------------------------ product codes
class ProductCodes(nn.Module):
    """Embedding and output head of a decoder whose codes are digits of a product
    codebook (ModelConfig.code_group_sizes; VQGANConfig.code_group_sizes makes them).

    A decoder id t > 0 is code c = t - 1 with digits a_g (c = sum_g a_g * weight_g,
    `digit_weights`): it embeds as the sum of one table per digit (id 0, BOS, has its
    own vector); the head gives each digit its own logits, and code c's logit is the
    sum of its digits' (so the softmax over codes is the product of the digits'
    softmaxes). Id 0 and the padding ids past K get a logit of -1e9.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        sizes = cfg.code_group_sizes
        self.digit_embedders = [
            Embed(k, cfg.d_model, name=f"digit_embedder_{g}", **kw) for g, k in enumerate(sizes)
        ]
        self.bos = Embed(1, cfg.d_model, name="bos_embedder", **kw)
        self.heads = [
            DenseGeneral(
                (k,), (EMBED, VOCAB), accum_dtype=jnp.float32, name=f"digit_head_{g}", **kw
            )  # fmt: skip
            for g, k in enumerate(sizes)
        ]

    def digits(self, tokens: Array) -> list[Array]:
        """Decoder ids [...] -> each digit [...] (most significant first; id 0 -> 0s)."""
        code = jnp.maximum(tokens - 1, 0)
        sizes = self.config.code_group_sizes
        return [(code // w) % k for w, k in zip(digit_weights(sizes), sizes, strict=True)]

    def embed(self, tokens: Array) -> Array:
        x = sum(e(d) for e, d in zip(self.digit_embedders, self.digits(tokens), strict=True))
        bos = self.bos(jnp.zeros_like(tokens))
        return jnp.where((tokens == 0)[..., None], bos, x)

    def logits(self, hidden: Array) -> Array:
        """Hidden [B, n, D] -> logits [B, n, decoder_vocab_size] (float32)."""
        joint = None
        for head in self.heads:
            part = head(hidden).astype(jnp.float32)  # [B, n, k]
            joint = part if joint is None else (joint[..., :, None] + part[..., None, :])
            joint = joint.reshape(*hidden.shape[:-1], -1)
        cfg = self.config
        pad = cfg.decoder_vocab_size - cfg.codebook_size - 1
        fill = functools.partial(jnp.full, dtype=jnp.float32, fill_value=-1e9)
        return jnp.concatenate(
            [fill((*hidden.shape[:-1], 1)), joint, fill((*hidden.shape[:-1], pad))], axis=-1
        )


# -------------------------------------------------------------------- blocks
class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and MLP over image tokens.

    One parameter set, three scan-shaped methods (one argument layout, see
    `layers.layer_stack`; `cross_kv` and `step` ignore `enable_dropout`):
    `__call__` (teacher-forced), `cross_kv` and `step` (one cached step).
    """

    config: ModelConfig

    def setup(self) -> None:
        spec = layer_spec(self.config)
        self.pre_self_attention_norm = spec.norm()
        self.self_attention = Attention(spec)
        self.pre_cross_attention_norm = spec.norm()
        self.cross_attention = Attention(spec)
        self.pre_mlp_norm = spec.norm()
        self.mlp = Mlp(spec)
        self.dropout = nn.Dropout(spec.dropout_rate)

    def __call__(
        self, x: Array, per_layer: None, shared: tuple[Array, Array], enable_dropout: bool = False
    ) -> tuple[Array, None]:
        """Teacher-forced pass over x [B, N, D]; `shared` = (encoded, text lengths)."""
        return self._forward(x, shared, enable_dropout, with_probabilities=False)

    def with_cross_attention(
        self, x: Array, per_layer: None, shared: tuple[Array, Array], enable_dropout: bool = False
    ) -> tuple[Array, Array]:
        """`__call__`, also returning this layer's cross-attention weights
        float32 [B, heads, N, Lt] (slot t's row: where the prediction of cell t looks)."""
        return self._forward(x, shared, enable_dropout, with_probabilities=True)

    def _forward(
        self, x: Array, shared: tuple[Array, Array], enable_dropout: bool, with_probabilities: bool
    ) -> tuple[Array, Array | None]:
        encoded, lengths = shared
        drop = functools.partial(self.dropout, deterministic=not enable_dropout)
        att = self.self_attention
        h = self.pre_self_attention_norm(x)
        key, value = att.project_key_value(h)  # before Q: keeps the backward's gradient-sum order
        x = x + drop(self._attend_self(att.project_query(h), key, value))
        h = self.pre_cross_attention_norm(x)
        probabilities = None
        if with_probabilities:
            cross = self.cross_attention
            probabilities = cross.probabilities(
                cross.project_query(h), cross.project_key_value(encoded)[0], lengths
            )
        x = x + drop(self.cross_attention(h, encoded, kv_lengths=lengths))
        x = x + drop(self.mlp(self.pre_mlp_norm(x)))
        return constrain(x, HIDDEN_AXES), probabilities

    def cross_kv(
        self, carry: Array, per_layer: None, encoded: Array, enable_dropout: bool = False
    ) -> tuple[Array, tuple[Array, Array]]:
        """Keys and values of the cross-attention over `encoded`; `carry` passes through."""
        return carry, self.cross_attention.project_key_value(encoded)

    def step(
        self,
        carry: tuple[Array, Array, Array],
        per_layer: tuple[Array, Array, Array, Array],
        step: Array,
        enable_dropout: bool = False,
    ) -> tuple[tuple[Array, Array, Array], None]:
        """One cached step of this layer at slot `step`.

        `carry` = (x [B, 1, D], self_key, self_value) with the whole stacked
        caches [L, B, N, heads, kv]; `per_layer` = (this layer's index, cross
        keys, cross values, text lengths). The step's key/value is written in
        place at (layer, :, step), then the query attends to this layer's
        positions <= step, read straight out of the stack (the slice is fused
        into the attention's reductions, not copied), so a step reads each
        cache entry once.
        """
        x, cache_key, cache_value = carry
        layer, cross_key, cross_value, lengths = per_layer
        att = self.self_attention
        h = self.pre_self_attention_norm(x)
        key, value = att.project_key_value(h)  # [B, 1, heads, kv]
        layer = jnp.asarray(layer, jnp.int32)
        step = jnp.asarray(step, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        at = (layer, zero, step, zero, zero)
        cache_key = jax.lax.dynamic_update_slice(cache_key, key.astype(cache_key.dtype)[None], at)
        cache_value = jax.lax.dynamic_update_slice(
            cache_value, value.astype(cache_value.dtype)[None], at
        )
        out = self._self_attend(att.project_query(h), cache_key, cache_value, layer, step)
        x = x + att.project_output(out)
        h = self.pre_cross_attention_norm(x)
        cross = self.cross_attention
        valid = jnp.arange(cross_key.shape[1])[None, :] < lengths[:, None]
        if self.config.decode_attention_kernel == "fused":
            out = self._fused_step_attention(
                cross.project_query(h), cross_key, cross_value, lengths
            )
        else:
            out = single_query_attention(cross.project_query(h), cross_key, cross_value, valid)
        x = x + cross.project_output(out)
        x = x + self.mlp(self.pre_mlp_norm(x))
        return (constrain(x, HIDDEN_AXES), cache_key, cache_value), None

    def _fused_step_attention(
        self, query: Array, key: Array, value: Array, lengths: Array
    ) -> Array:
        """One query row over the first `lengths` [B] keys by one
        jax.nn.dot_product_attention (decode_attention_kernel='fused')."""
        return jax.nn.dot_product_attention(
            query, key, value, key_value_seq_lengths=lengths,
            implementation=self.config.attention_impl,
        )  # fmt: skip

    def _self_mask(self, length: int) -> np.ndarray:
        cfg = self.config
        return conv_sparse_mask(cfg.image_grid, cfg.conv_kernel_size)[:length, :length]

    def _attend_self(self, query: Array, key: Array, value: Array) -> Array:
        """Teacher-forced self-attention over slots [0, N), with the output projection.

        'full': causal. 'conv_sparse': every key of the mask lies in a causal band
        (`conv_band`), so only that band is computed (ModelConfig.conv_attention_kernel):
        cuDNN's sliding window (the mask shapes the window inside it), splash's
        block-sparse TPU kernel, or `banded_attention` (blocks of queries over
        static key slices, any backend); dense masked attention when blocks would
        not halve the keys.
        """
        cfg, att = self.config, self.self_attention
        if cfg.decoder_attention != "conv_sparse":
            return att.attend(query, key, value, is_causal=True)
        length = query.shape[1]
        mask = self._self_mask(length)
        band = conv_band(cfg.image_grid, cfg.conv_kernel_size)
        kernel = cfg.conv_attention_kernel
        if kernel == "auto":
            if cfg.attention_impl == "cudnn":
                kernel = "cudnn"
            elif jax.default_backend() == "tpu" and length % 128 == 0:
                kernel = "splash"
            else:
                kernel = "banded" if banded_block_size(length, band) else "dense"
        dense = jnp.asarray(mask)[None, None]
        if kernel == "cudnn":
            window = (band - 1, 0)
            return att.attend(
                query, key, value, is_causal=True, mask=dense, local_window_size=window
            )
        if kernel == "splash":
            return att.project_output(splash_attention(query, key, value, mask))
        if kernel == "banded":
            block = banded_block_size(length, band, require_saving=False)
            return att.project_output(banded_attention(query, key, value, mask, band, block))
        return att.attend(query, key, value, mask=dense)

    def _self_attend(
        self, query: Array, cache_key: Array, cache_value: Array, layer: Array, step: Array
    ) -> Array:
        """The step's query over `layer`'s cached positions <= step (see `step`)."""
        cfg = self.config
        _, batch, length, heads, kv = cache_key.shape
        zero = jnp.zeros((), jnp.int32)

        def read(start: Array, size: int) -> tuple[Array, Array]:
            at, shape = (layer, zero, start, zero, zero), (1, batch, size, heads, kv)
            return (
                jax.lax.dynamic_slice(cache_key, at, shape)[0],
                jax.lax.dynamic_slice(cache_value, at, shape)[0],
            )

        if cfg.decoder_attention == "conv_sparse":
            # Slot `step` sees only slots in its band (`conv_band`): read that
            # static window, not the whole cache.
            window = min(length, conv_band(cfg.image_grid, cfg.conv_kernel_size))
            start = jnp.clip(step + 1 - window, 0, length - window)
            mask = jnp.asarray(self._self_mask(length))
            valid = jax.lax.dynamic_slice(mask, (step, start), (1, window))
            return single_query_attention(query, *read(start, window), valid)
        block = cfg.decode_block_size
        if block is None and cfg.decode_attention_kernel == "fused":
            filled = jnp.full((batch,), step + 1, jnp.int32)
            return self._fused_step_attention(query, *read(zero, length), filled)
        if block is None:
            valid = (jnp.arange(length) <= step)[None]
            return single_query_attention(query, *read(zero, length), valid)
        return blocked_single_query_attention(
            query,
            lambda j: read(j * block, block),
            lambda j: (j * block + jnp.arange(block) <= step)[None],
            step // block + 1,
        )


# ------------------------------------------------------------------ stacks
def _check_length(name: str, length: int, limit: int, what: str) -> None:
    if length > limit:
        raise ValueError(f"{name} has length {length} > {what}")


class Encoder(nn.Module):
    """Text tokens [B, L] -> encoded [B, L, D] (in the compute dtype)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        cfg = self.config
        length = encoder_input_tokens.shape[-1]
        limit = cfg.max_text_length
        why = f"ModelConfig.max_text_length={limit}; truncate the text or raise max_text_length"
        _check_length("encoder_input_tokens", length, limit, why)
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        x = Embed(cfg.text_vocab_size, cfg.d_model, name="token_embedder", **kw)(
            encoder_input_tokens
        )
        if cfg.text_positions == "learned":
            table = Embed(
                cfg.max_text_length, cfg.d_model, (POSITION, EMBED), name="position_embedder", **kw
            )
            x = x + table(jnp.arange(length))[None]
        x = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(x)
        x = constrain(x, HIDDEN_AXES)
        spec = layer_spec(cfg)
        layer = functools.partial(
            EncoderLayer, spec, attention=cfg.encoder_attention,
            rotary=cfg.text_positions == "rotary",
        )  # fmt: skip
        shared = (text_lengths(encoder_input_tokens), None)
        stack = _stack(layer, cfg, cfg.num_encoder_layers)
        x, _ = run_stack(stack, x, None, shared, enable_dropout)
        return constrain(spec.norm(name="final_norm")(x), HIDDEN_AXES)


class Decoder(nn.Module):
    """Image-token decoder: one method per entry point (teacher-forced hidden states,
    their logits, cross-attention K/V, one cached step)."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        self.product = ProductCodes(cfg) if cfg.code_group_sizes else None
        if self.product is None:
            self.token_embedder = Embed(cfg.decoder_vocab_size, cfg.d_model, **kw)
        self.position_embedder = ImagePositions(cfg.image_grid, cfg.d_model, **kw)
        # Named as when this was a compact method, so a seed's dropout masks stay the same.
        self.embedding_dropout = nn.Dropout(cfg.dropout_rate, name="Dropout_0")
        methods = ("__call__", "cross_kv", "step", "with_cross_attention")
        self.layers = _stack(
            functools.partial(DecoderLayer, cfg), cfg, cfg.num_decoder_layers, methods=methods
        )
        self.final_norm = layer_spec(cfg).norm()
        if self.product is None:
            self.logits_dense = DenseGeneral(
                (cfg.decoder_vocab_size,), (EMBED, VOCAB), accum_dtype=jnp.float32, **kw
            )

    def embed_tokens(self, tokens: Array) -> Array:
        """Decoder ids -> embeddings [..., D] (a product codebook's digits summed)."""
        if self.product is not None:
            return self.product.embed(tokens)
        return self.token_embedder(tokens)

    def __call__(
        self, tokens: Array, encoded: Array, lengths: Array, enable_dropout: bool = False
    ) -> Array:
        """Teacher-forced: decoder tokens [B, N], encoded text, text lengths -> hidden
        states after the final norm [B, N, D] (compute dtype; `logits` projects them)."""
        cfg = self.config
        length = tokens.shape[-1]
        (rows, cols), n = cfg.image_grid, cfg.num_image_tokens
        _check_length("decoder_input_tokens", length, n, f"image_grid {rows}x{cols} = {n} tokens")
        x = self.embed_tokens(tokens) + self.position_embedder(jnp.arange(length))[None]
        x = self.embedding_dropout(x, deterministic=not enable_dropout)
        x, _ = run_stack(
            self.layers, constrain(x, HIDDEN_AXES), None, (encoded, lengths), enable_dropout
        )
        return self.final_norm(x)

    def with_cross_attention(
        self, tokens: Array, encoded: Array, lengths: Array
    ) -> tuple[Array, Array]:
        """`__call__` (no dropout) plus every layer's cross-attention weights, stacked:
        float32 [L, B, heads, N, Lt]."""
        x = self.embed_tokens(tokens) + self.position_embedder(jnp.arange(tokens.shape[-1]))[None]
        x, probabilities = run_stack(
            self.layers, constrain(x, HIDDEN_AXES), None, (encoded, lengths),
            method="with_cross_attention",
        )  # fmt: skip
        return self.final_norm(x), probabilities

    def logits(self, hidden: Array) -> Array:
        """Hidden states [B, n, D] -> logits [B, n, decoder_vocab_size] (logits_dtype)."""
        if self.product is not None:
            logits = self.product.logits(hidden).astype(DTYPES[self.config.logits_dtype])
        else:
            logits = self.logits_dense(hidden).astype(DTYPES[self.config.logits_dtype])
        return constrain(logits, (ACT_BATCH, ACT_LENGTH, ACT_VOCAB))

    def cross_kv(self, encoded: Array) -> tuple[Array, Array]:
        """Cross-attention keys and values of every layer, stacked: [L, B, Lt, heads, kv]."""
        dummy = jnp.zeros((), self.config.compute_dtype)
        _, (key, value) = run_stack(self.layers, dummy, None, encoded, method="cross_kv")
        return key, value

    def step(
        self, tokens: Array, cache: Mapping[str, Array], step: Array
    ) -> tuple[Array, dict[str, Array]]:
        """One cached step: tokens [B, 1] at slot `step` -> (logits [B, V], updated cache)."""
        x = self.embed_tokens(tokens) + self.position_embedder(jnp.reshape(step, (1,)))[None]
        # The self-attention caches travel whole through the layers (the carry of
        # the layer scan), each layer writing its new position in place; only the
        # read-only cross-attention K/V are split per layer.
        carry = (constrain(x, HIDDEN_AXES), cache["self_key"], cache["self_value"])
        layers = jnp.arange(self.config.num_decoder_layers, dtype=jnp.int32)
        per_layer = (layers, cache["cross_key"], cache["cross_value"], cache["text_lengths"])
        (x, self_key, self_value), _ = run_stack(self.layers, carry, per_layer, step, method="step")
        logits = self.logits(self.final_norm(x))
        return logits[:, 0], dict(cache, self_key=self_key, self_value=self_value)


class EncoderDecoder(nn.Module):
    """Text-to-image-token encoder-decoder; see the module docstring for the API."""

    config: ModelConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        """int32 [B, Lt] -> encoded [B, Lt, D]."""
        return self.encoder(encoder_input_tokens, enable_dropout=enable_dropout)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        enable_dropout: bool = False,
    ) -> Array:
        """Teacher-forced decoder: -> float32 logits [B, N, decoder_vocab_size]."""
        lengths = text_lengths(encoder_input_tokens)
        return self.decoder.logits(
            self.decoder(decoder_input_tokens, encoded, lengths, enable_dropout)
        )

    def hidden_states(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        enable_dropout: bool = False,
    ) -> Array:
        """Teacher-forced pass up to the decoder's final norm: [B, N, D] in the compute dtype.

        `logits_from_hidden` of it equals `__call__`; a loss can project it
        chunk by chunk so the [B, N, V] logits never exist at once.
        """
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        lengths = text_lengths(encoder_input_tokens)
        hidden = self.decoder(decoder_input_tokens, encoded, lengths, enable_dropout)
        return constrain(hidden, HIDDEN_AXES)

    def inspect(
        self, encoder_input_tokens: Array, decoder_input_tokens: Array
    ) -> tuple[Array, Array, Array]:
        """Teacher-forced, for instruments (parti_jax/eval/inspection.py): encoded text
        [B, Lt, D], logits [B, N, V] and the cross-attention weights of every decoder
        layer, float32 [L, B, heads, N, Lt] (slot t predicts cell t)."""
        encoded = self.encode(encoder_input_tokens)
        lengths = text_lengths(encoder_input_tokens)
        hidden, probabilities = self.decoder.with_cross_attention(
            decoder_input_tokens, encoded, lengths
        )
        return encoded, self.decoder.logits(hidden), probabilities

    def logits_from_hidden(self, hidden: Array) -> Array:
        """Decoder hidden states [B, n, D] -> logits [B, n, decoder_vocab_size]."""
        return self.decoder.logits(hidden)

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        enable_dropout: bool = False,
    ) -> Array:
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        return self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout=enable_dropout
        )

    def init_cache(self, encoded: Array, encoder_input_tokens: Array) -> dict[str, Array]:
        """The decoding cache: cross-attention K/V from `encoded`, empty self-attention K/V.

        Every leaf is stacked per layer: axis 0 is the layer, axis 1 the batch.
        """
        cfg = self.config
        key, value = self.decoder.cross_kv(encoded)
        num_layers, batch = key.shape[0], key.shape[1]
        shape = (num_layers, batch, cfg.num_image_tokens, cfg.num_heads, cfg.kv_dim)
        lengths = jnp.broadcast_to(text_lengths(encoder_input_tokens), (num_layers, batch))
        return {
            "self_key": jnp.zeros(shape, key.dtype),
            "self_value": jnp.zeros(shape, value.dtype),
            "cross_key": key,
            "cross_value": value,
            "text_lengths": lengths,
        }

    def decode_step(
        self, tokens: Array, cache: Mapping[str, Array], step: Array
    ) -> tuple[Array, dict[str, Array]]:
        """One decoder step: tokens int32 [B, 1] at slot `step` -> (logits [B, V], cache)."""
        return self.decoder.step(tokens, cache, step)


# --------------------------------------------------------------- sampling
def resize_self_cache(cache: Mapping[str, Array], length: int) -> dict[str, Array]:
    """The cache with `length` self-attention positions: the first `length` kept,
    zeros appended past the old length. Cached steps at slots < `length` read
    exactly these positions (`DecoderLayer._self_attend` reads the cache whole)."""

    def resize(x: Array) -> Array:
        if x.shape[2] >= length:
            return x[:, :, :length]
        pad = [(0, 0)] * x.ndim
        pad[2] = (0, length - x.shape[2])
        return jnp.pad(x, pad)

    return dict(cache, self_key=resize(cache["self_key"]), self_value=resize(cache["self_value"]))


def sampler_options(config: ModelConfig) -> dict[str, Any]:
    """`decoding.sample`'s arguments that follow from the model config: its static
    segments (ModelConfig.decode_segments) and how to resize the cache for them."""
    if config.decode_segments == 1:
        return {}
    return dict(segments=config.decode_segments, resize_cache=resize_self_cache)


def make_tokens_to_logits(
    model: EncoderDecoder, params: PyTree, encoder_input_tokens: Array
) -> tuple[TokensToLogits, dict[str, Array]]:
    """Encodes the text once and returns the sampler's `tokens_to_logits` and its cache.

    `tokens_to_logits(tokens [B, 1] int32, cache, step int32 scalar) ->
    (logits [B, decoder_vocab_size] float32, cache)`: `tokens` is the decoder
    input at slot `step` (BOS = 0 at step 0; afterwards the token sampled at
    step - 1) and the logits predict grid cell `step`. The cache is a dict of
    arrays stacked per layer (axis 0 layer, axis 1 batch), so a sampler may
    repeat or reorder rows with `jax.tree.map(lambda c: c[:, idx], cache)`.
    Self-attention K/V are preallocated for all image tokens. `params` is the
    'params' collection or a full variables dict. Call it inside `jax.jit`
    with `params` as an argument, so parameters are traced, not baked in.
    """
    variables = params if "params" in params else {"params": params}
    encoded = model.apply(variables, encoder_input_tokens, method=EncoderDecoder.encode)
    cache = model.apply(variables, encoded, encoder_input_tokens, method=EncoderDecoder.init_cache)

    def tokens_to_logits(tokens: Array, cache: PyTree, step: Array) -> tuple[Array, PyTree]:
        return model.apply(variables, tokens, cache, step, method=EncoderDecoder.decode_step)

    return tokens_to_logits, cache
