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
    constrain,
    conv_sparse_mask,
    make_norm,
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
        x = x + drop(Attention(cfg, name="attention")(h, h, kv_lengths=lengths))
        h = make_norm(cfg, "pre_mlp_norm")(x)
        x = x + drop(Mlp(cfg, name="mlp")(h))
        return constrain(x, HIDDEN_AXES), None


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and MLP over image tokens.

    One parameter set, three entry modes (a module attribute, so that scan and
    remat see a plain (carry, *xs) call):
      'full'     : teacher-forced pass; xs = (encoded, text_lengths)
      'cross_kv' : keys/values of the cross-attention; xs = (encoded,)
      'step'     : one cached step; xs = (layer_cache, step)
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
        self, x: Array, layer_cache: Mapping[str, Array], step: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        att = self.self_attention
        h = self.pre_self_attention_norm(x)
        key, value = att.project_key_value(h)  # [B, 1, heads, kv]
        cache_key = layer_cache["self_key"]
        key = key.astype(cache_key.dtype)
        value = value.astype(cache_key.dtype)
        keys = jax.lax.dynamic_update_slice_in_dim(cache_key, key, step, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(layer_cache["self_value"], value, step, axis=1)
        batch, length = keys.shape[0], keys.shape[1]
        full_mask = self._self_mask(length)
        if full_mask is None:
            mask = None
            lengths = jnp.full((batch,), step + 1, dtype=jnp.int32)
        else:
            row = jax.lax.dynamic_index_in_dim(jnp.asarray(full_mask), step, keepdims=False)
            mask = row[None, None, None, :]
            lengths = None
        out = att.attend(
            att.project_query(h),
            keys,
            values,
            mask=mask,
            kv_lengths=lengths,
            implementation="xla",
        )
        x = x + out
        h = self.pre_cross_attention_norm(x)
        cross = self.cross_attention
        x = x + cross.attend(
            cross.project_query(h),
            layer_cache["cross_key"],
            layer_cache["cross_value"],
            kv_lengths=layer_cache["text_lengths"],
            implementation="xla",
        )
        x = x + self.mlp(self.pre_mlp_norm(x))
        return constrain(x, HIDDEN_AXES), (key, value)


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
    """Image-token decoder; `mode` picks teacher-forced, cross-K/V or single-step."""

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
        embed = Embed(cfg.decoder_vocab_size, cfg.d_model, name="token_embedder", **kw)
        positions = ImagePositions(cfg.image_grid, cfg.d_model, name="position_embedder", **kw)
        if mode == "full":
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
            layer_cache = {k: cache[k] for k in CACHE_KEYS}
            x, new_kv = _run_layers(
                DecoderLayer,
                cfg,
                num_layers,
                x,
                (layer_cache, step),
                (0, nn.broadcast),
                remat=False,
                mode="step",
            )
        else:
            raise ValueError(f"Decoder: unknown mode {mode!r}")
        x = make_norm(cfg, "final_norm")(x)
        logits = DenseGeneral(
            (cfg.decoder_vocab_size,),
            (EMBED, VOCAB),
            name="logits_dense",
            accum_dtype=jnp.float32,
            **kw,
        )(x)
        logits = constrain(logits.astype(cfg.logits_jnp_dtype), (ACT_BATCH, ACT_LENGTH, ACT_VOCAB))
        if mode == "full":
            return logits
        key, value = new_kv  # [L, B, 1, heads, kv]
        new_cache = dict(cache)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, jnp.asarray(step, jnp.int32), zero, zero)
        new_cache["self_key"] = jax.lax.dynamic_update_slice(cache["self_key"], key, start)
        new_cache["self_value"] = jax.lax.dynamic_update_slice(cache["self_value"], value, start)
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
