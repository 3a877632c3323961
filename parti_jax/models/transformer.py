"""The Parti encoder-decoder (T5X style): text encoder, image-token decoder, cached decoding.

Pre-norm blocks, an extra final norm on the encoder and decoder outputs,
learned 1-D text positions and learned 2-D (row + column) image positions,
no relative-position bias (it would block fused attention kernels). The
output projection is separate from the decoder input embedding (not tied):
the paper's parameter counts include it, and logits are float32 over
`decoder_vocab_size`.

API (other modules rely on it):

    model = EncoderDecoder(config)
    variables = model.init(rngs, encoder_input_tokens, decoder_input_tokens)
    logits = model.apply(variables, enc, dec, enable_dropout=True, rngs={"dropout": key})
    encoded = model.apply(variables, enc, method=EncoderDecoder.encode)
    logits = model.apply(variables, encoded, enc, dec, method=EncoderDecoder.decode)
    hidden = model.apply(variables, enc, dec, method=EncoderDecoder.hidden_states)
    logits = model.apply(variables, hidden, method=EncoderDecoder.logits_from_hidden)
    tokens_to_logits, cache = make_tokens_to_logits(model, params, enc)

Text is right-padded with 0 and ends in EOS; decoder slot t holds the token
of cell t - 1 (slot 0 holds BOS = 0) and predicts cell t.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.models.config import ModelConfig
from parti_jax.models.layers import (
    HIDDEN_AXES,
    Attention,
    DenseGeneral,
    Embed,
    ImagePositions,
    Mlp,
    blocked_single_query_attention,
    constrain,
    conv_sparse_mask,
    make_norm,
    single_query_attention,
    text_lengths,
)
from parti_jax.partitioning import (
    ACT_BATCH,
    ACT_HEADS,
    ACT_KV,
    ACT_LENGTH,
    ACT_VOCAB,
    EMBED,
    LAYERS,
    POSITION,
    VOCAB,
)

Array = jax.Array
PyTree = Any
TokensToLogits = Callable[[Array, PyTree, Array], tuple[Array, PyTree]]

CACHE_KEYS = ("self_key", "self_value", "cross_key", "cross_value", "text_lengths")


# -------------------------------------------------------------------- blocks
class EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP over text tokens; scan-shaped (carry, xs)."""

    config: ModelConfig
    enable_dropout: bool = False

    @nn.compact
    def __call__(self, x: Array, lengths: Array) -> tuple[Array, None]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=not self.enable_dropout)
        h = make_norm(cfg, "pre_attention_norm")(x)
        positions = jnp.arange(h.shape[1]) if cfg.text_positions == "rotary" else None
        y = Attention(cfg, name="attention")(h, h, kv_lengths=lengths, rotary_positions=positions)
        x = x + drop(y)
        h = make_norm(cfg, "pre_mlp_norm")(x)
        x = x + drop(Mlp(cfg, name="mlp")(h))
        return constrain(x, HIDDEN_AXES), None


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and MLP over image tokens.

    One parameter set, three entry modes (a module attribute, so that scan and
    remat see a plain (carry, *xs) call):
      'full'     : teacher-forced pass; xs = (encoded, text_lengths)
      'cross_kv' : keys/values of the cross-attention; xs = (encoded,)
      'step'     : one cached step; carry = (x, self_key, self_value) with the
                   whole stacked caches, xs = (layer, cross_key, cross_value,
                   text_lengths, step)
    """

    config: ModelConfig
    enable_dropout: bool = False
    mode: str = "full"

    def setup(self) -> None:
        cfg = self.config
        self.pre_self_attention_norm = make_norm(cfg)
        self.self_attention = Attention(cfg)
        self.pre_cross_attention_norm = make_norm(cfg)
        self.cross_attention = Attention(cfg)
        self.pre_mlp_norm = make_norm(cfg)
        self.mlp = Mlp(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate, deterministic=not self.enable_dropout)

    def __call__(self, x: Array, *xs: Any) -> tuple[Array, Any]:
        if self.mode == "full":
            return self._full(x, *xs)
        if self.mode == "cross_kv":
            (encoded,) = xs
            return x, self.cross_attention.project_key_value(encoded)
        if self.mode == "step":
            return self._step(x, *xs)
        raise ValueError(f"DecoderLayer: unknown mode {self.mode!r}")

    def _self_mask(self, length: int) -> np.ndarray | None:
        cfg = self.config
        if cfg.decoder_attention != "conv_sparse":
            return None
        return conv_sparse_mask(cfg.image_grid, cfg.conv_kernel_size)[:length, :length]

    def _full(self, x: Array, encoded: Array, lengths: Array) -> tuple[Array, None]:
        cfg = self.config
        att = self.self_attention
        h = self.pre_self_attention_norm(x)
        key, value = att.project_key_value(h)
        mask = self._self_mask(x.shape[1])
        out = att.attend(
            att.project_query(h),
            key,
            value,
            is_causal=mask is None,
            mask=None if mask is None else jnp.asarray(mask)[None, None],
            implementation=cfg.attention_impl,
        )
        x = x + self.dropout(out)
        h = self.pre_cross_attention_norm(x)
        x = x + self.dropout(self.cross_attention(h, encoded, kv_lengths=lengths))
        x = x + self.dropout(self.mlp(self.pre_mlp_norm(x)))
        return constrain(x, HIDDEN_AXES), None

    def _step(
        self,
        carry: tuple[Array, Array, Array],
        layer: Array,
        cross_key: Array,
        cross_value: Array,
        lengths: Array,
        step: Array,
    ) -> tuple[tuple[Array, Array, Array], None]:
        """One cached step of this layer; `carry` = (x, self_key, self_value).

        `self_key` / `self_value` are the whole stacked caches [L, B, N, heads,
        kv]: the step's key/value is written in place at (layer, :, step),
        then the query attends to this layer's positions <= step, read
        straight out of the stack (the slice is fused into the attention's
        reductions, not copied), so a step reads each cache entry once.
        """
        x, cache_key, cache_value = carry
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
        out = single_query_attention(cross.project_query(h), cross_key, cross_value, valid)
        x = x + cross.project_output(out)
        x = x + self.mlp(self.pre_mlp_norm(x))
        return (constrain(x, HIDDEN_AXES), cache_key, cache_value), None

    def _self_attend(
        self, query: Array, cache_key: Array, cache_value: Array, layer: Array, step: Array
    ) -> Array:
        """The step's query over `layer`'s cached positions <= step (see `_step`)."""
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
            # Slot `step` sees at most (k // 2) grid rows + (k // 2) columns back:
            # read that static window, not the whole cache.
            half = cfg.conv_kernel_size // 2
            window = min(length, half * cfg.image_grid[1] + half + 1)
            start = jnp.clip(step + 1 - window, 0, length - window)
            mask = jnp.asarray(self._self_mask(length))
            valid = jax.lax.dynamic_slice(mask, (step, start), (1, window))
            return single_query_attention(query, *read(start, window), valid)
        block = cfg.decode_block_size
        if block is None:
            valid = (jnp.arange(length) <= step)[None]
            return single_query_attention(query, *read(zero, length), valid)
        return blocked_single_query_attention(
            query,
            lambda j: read(j * block, block),
            lambda j: (j * block + jnp.arange(block) <= step)[None],
            step // block + 1,
        )


def _run_layers(
    layer_cls: type[nn.Module],
    config: ModelConfig,
    num_layers: int,
    carry: Any,
    xs: tuple[Any, ...],
    in_axes: tuple[Any, ...],
    *,
    remat: bool,
    **layer_kwargs: Any,
) -> tuple[Any, Any]:
    """Runs `num_layers` copies of a scan-shaped layer, scanned or unrolled.

    Scanned: one module 'layers' whose parameters carry a leading LAYERS axis.
    Unrolled: modules 'layers_0', 'layers_1', ...; `in_axes` 0 entries of `xs`
    are sliced per layer and the per-layer outputs are stacked, so both
    layouts return the same values. Must be called from a compact method.
    """
    if remat and config.remat_policy != "none":
        layer_cls = nn.remat(
            layer_cls, policy=config.remat_policy_fn, prevent_cse=not config.scan_layers
        )
    if config.scan_layers:
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=in_axes,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        return stack(config, name="layers", **layer_kwargs)(carry, *xs)
    outputs = []
    for i in range(num_layers):
        layer_xs = [
            x if axis is nn.broadcast else jax.tree.map(lambda a, i=i: a[i], x)
            for x, axis in zip(xs, in_axes, strict=True)
        ]
        carry, y = layer_cls(config, name=f"layers_{i}", **layer_kwargs)(carry, *layer_xs)
        outputs.append(y)
    if outputs[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)


# ------------------------------------------------------------------ stacks
class Encoder(nn.Module):
    """Text tokens [B, L] -> encoded [B, L, D] (in the compute dtype)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        cfg = self.config
        length = encoder_input_tokens.shape[-1]
        if length > cfg.max_text_length:
            raise ValueError(
                f"encoder_input_tokens has length {length} > ModelConfig.max_text_length="
                f"{cfg.max_text_length}; truncate the text or raise max_text_length"
            )
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        x = Embed(cfg.text_vocab_size, cfg.d_model, name="token_embedder", **kw)(
            encoder_input_tokens
        )
        if cfg.text_positions == "learned":
            x = (
                x
                + Embed(
                    cfg.max_text_length,
                    cfg.d_model,
                    axes=(POSITION, EMBED),
                    name="position_embedder",
                    **kw,
                )(jnp.arange(length))[None]
            )
        x = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(x)
        x = constrain(x, HIDDEN_AXES)
        x, _ = _run_layers(
            EncoderLayer,
            cfg,
            cfg.num_encoder_layers,
            x,
            (text_lengths(encoder_input_tokens),),
            (nn.broadcast,),
            remat=True,
            enable_dropout=enable_dropout,
        )
        return constrain(make_norm(cfg, "final_norm")(x), HIDDEN_AXES)


class Decoder(nn.Module):
    """Image-token decoder; `mode` picks teacher-forced ('full' logits or 'hidden'
    states after the final norm), 'logits' of given hidden states, 'cross_kv'
    or a cached 'step'."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        mode: str,
        *,
        tokens: Array | None = None,
        encoded: Array | None = None,
        lengths: Array | None = None,
        cache: Mapping[str, Array] | None = None,
        step: Array | None = None,
        hidden: Array | None = None,
        enable_dropout: bool = False,
    ) -> Any:
        cfg = self.config
        num_layers = cfg.num_decoder_layers
        if mode == "cross_kv":
            dummy = jnp.zeros((), cfg.compute_dtype)
            _, (key, value) = _run_layers(
                DecoderLayer,
                cfg,
                num_layers,
                dummy,
                (encoded,),
                (nn.broadcast,),
                remat=False,
                mode="cross_kv",
            )
            return key, value

        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)

        def project_logits(x: Array) -> Array:
            logits = DenseGeneral(
                (cfg.decoder_vocab_size,),
                (EMBED, VOCAB),
                name="logits_dense",
                accum_dtype=jnp.float32,
                **kw,
            )(x)
            return constrain(
                logits.astype(cfg.logits_jnp_dtype), (ACT_BATCH, ACT_LENGTH, ACT_VOCAB)
            )

        if mode == "logits":
            return project_logits(hidden)
        embed = Embed(cfg.decoder_vocab_size, cfg.d_model, name="token_embedder", **kw)
        positions = ImagePositions(cfg.image_grid, cfg.d_model, name="position_embedder", **kw)
        if mode in ("full", "hidden"):
            length = tokens.shape[-1]
            if length > cfg.num_image_tokens:
                raise ValueError(
                    f"decoder_input_tokens has length {length} > image_grid "
                    f"{cfg.image_grid[0]}x{cfg.image_grid[1]} = {cfg.num_image_tokens} tokens"
                )
            x = embed(tokens) + positions(jnp.arange(length))[None]
            x = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(x)
            x = constrain(x, HIDDEN_AXES)
            x, _ = _run_layers(
                DecoderLayer,
                cfg,
                num_layers,
                x,
                (encoded, lengths),
                (nn.broadcast, nn.broadcast),
                remat=True,
                enable_dropout=enable_dropout,
                mode="full",
            )
        elif mode == "step":
            x = embed(tokens) + positions(jnp.reshape(step, (1,)))[None]
            # The self-attention caches travel whole through the layers (the
            # carry of the layer scan), each layer writing its new position in
            # place; only the read-only cross-attention K/V are split per layer.
            carry = (constrain(x, HIDDEN_AXES), cache["self_key"], cache["self_value"])
            xs = (
                jnp.arange(num_layers, dtype=jnp.int32),
                cache["cross_key"],
                cache["cross_value"],
                cache["text_lengths"],
                step,
            )
            (x, self_key, self_value), _ = _run_layers(
                DecoderLayer,
                cfg,
                num_layers,
                carry,
                xs,
                (0, 0, 0, 0, nn.broadcast),
                remat=False,
                mode="step",
            )
        else:
            raise ValueError(f"Decoder: unknown mode {mode!r}")
        x = make_norm(cfg, "final_norm")(x)
        if mode == "hidden":
            return constrain(x, HIDDEN_AXES)
        logits = project_logits(x)
        if mode == "full":
            return logits
        new_cache = dict(cache)
        new_cache["self_key"], new_cache["self_value"] = self_key, self_value
        return logits[:, 0], new_cache


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
        return self.decoder(
            "full",
            tokens=decoder_input_tokens,
            encoded=encoded,
            lengths=text_lengths(encoder_input_tokens),
            enable_dropout=enable_dropout,
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
        return self.decoder(
            "hidden",
            tokens=decoder_input_tokens,
            encoded=encoded,
            lengths=text_lengths(encoder_input_tokens),
            enable_dropout=enable_dropout,
        )

    def logits_from_hidden(self, hidden: Array) -> Array:
        """Decoder hidden states [B, n, D] -> logits [B, n, decoder_vocab_size]."""
        return self.decoder("logits", hidden=hidden)

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
        key, value = self.decoder("cross_kv", encoded=encoded)
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
        return self.decoder("step", tokens=tokens, cache=cache, step=step)


# --------------------------------------------------------------- sampling
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


def cache_logical_axes() -> dict[str, tuple[str, ...]]:
    """Logical axis names of each decoding-cache leaf (for sharding the cache)."""
    kv = (LAYERS, ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)
    return {
        "self_key": kv,
        "self_value": kv,
        "cross_key": kv,
        "cross_value": kv,
        "text_lengths": (LAYERS, ACT_BATCH),
    }


# ------------------------------------------------- scanned <-> unscanned
_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _slice_leaf(leaf: Any, i: int) -> Any:
    if _is_box(leaf):
        return leaf.replace(value=leaf.value[i], names=tuple(leaf.names[1:]))
    return leaf[i]


def _stack_leaves(*leaves: Any) -> Any:
    if _is_box(leaves[0]):
        return leaves[0].replace(
            value=jnp.stack([x.value for x in leaves]), names=(LAYERS, *leaves[0].names)
        )
    return jnp.stack(leaves)


def scan_to_unscanned(params: PyTree) -> PyTree:
    """Scanned layout ('layers' with a leading LAYERS axis) -> 'layers_0', 'layers_1', ...

    Works on plain or logically boxed parameter dicts (any nesting, e.g. a
    variables dict or the params of one stack); returns plain dicts.
    """
    if not isinstance(params, Mapping):
        return params
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name == "layers" and isinstance(value, Mapping):
            leaves = jax.tree.leaves(value, is_leaf=_is_box)
            first = leaves[0].value if _is_box(leaves[0]) else leaves[0]
            for i in range(first.shape[0]):
                out[f"layers_{i}"] = jax.tree.map(
                    lambda leaf, i=i: _slice_leaf(leaf, i), _plain(value), is_leaf=_is_box
                )
        else:
            out[name] = scan_to_unscanned(value)
    return out


def unscanned_to_scan(params: PyTree) -> PyTree:
    """'layers_0', 'layers_1', ... -> one 'layers' entry stacked on a leading LAYERS axis."""
    if not isinstance(params, Mapping):
        return params
    out: dict[str, Any] = {}
    layers: dict[int, Any] = {}
    for name, value in params.items():
        match = _LAYER_KEY.match(name)
        if match:
            layers[int(match.group(1))] = _plain(value)
        else:
            out[name] = unscanned_to_scan(value)
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(
                f"unscanned_to_scan: layer indices {sorted(layers)} are not 0..{len(layers) - 1}"
            )
        if "layers" in out:
            raise ValueError("unscanned_to_scan: both 'layers' and 'layers_<i>' entries present")
        ordered = [layers[i] for i in range(len(layers))]
        out["layers"] = jax.tree.map(_stack_leaves, *ordered, is_leaf=_is_box)
    return out


def _plain(tree: PyTree) -> PyTree:
    """Nested FrozenDict/Mapping -> nested dict (leaves untouched)."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
