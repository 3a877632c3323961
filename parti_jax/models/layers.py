"""Building blocks of the encoder-decoder: dense, embeddings, norms, MLP, attention, masks.

Every parameter is created with logical axis names (constants from
`parti_jax.partitioning`) and stored in `weight_dtype`; matmuls run in `dtype`;
norms and softmax statistics run in float32. Layers never name mesh axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.models.config import ModelConfig
from parti_jax.partitioning import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV,
    ACT_LENGTH,
    ACT_MLP,
    EMBED,
    HEADS,
    KV,
    MLP,
    POSITION,
    VOCAB,
)

Array = jax.Array
DType = Any

# Logical names of the activations that flow between blocks.
HIDDEN_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)
QKV_AXES = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
    """Logical sharding constraint; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, axes)


# --------------------------------------------------------------------- dense
class DenseGeneral(nn.Module):
    """A matmul over the last `in_dims` input dims into `features`, without bias.

    The kernel has shape `x.shape[-in_dims:] + features` and the logical names
    `kernel_axes`; it is initialised with fan-in scaling over all input dims
    (so [EMBED, HEADS, KV] projections get the same scale as a 2-D dense).
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    in_dims: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    # Accumulation / output dtype of the matmul; None means `dtype`.
    accum_dtype: DType | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = tuple(self.features)
        in_shape = x.shape[-self.in_dims :]
        n_in = len(in_shape)
        init = nn.initializers.variance_scaling(
            1.0,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + len(features))),
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.kernel_axes),
            in_shape + features,
            self.param_dtype,
        )
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (contract, ((), ())),
            preferred_element_type=self.accum_dtype,
        )


# ---------------------------------------------------------------- embeddings
class Embed(nn.Module):
    """A learned table [num_embeddings, features] looked up by integer ids."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = (VOCAB, EMBED)
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.features**-0.5), self.axes
            ),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class ImagePositions(nn.Module):
    """2-D learned positions: a row table plus a column table, added.

    Decoder slot t (predicting grid cell t) gets row[t // w] + column[t % w].
    """

    grid: tuple[int, int]
    features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, positions: Array) -> Array:
        rows, cols = self.grid
        kw = dict(axes=(POSITION, EMBED), dtype=self.dtype, param_dtype=self.param_dtype)
        row = Embed(rows, self.features, name="row", **kw)(positions // cols)
        col = Embed(cols, self.features, name="column", **kw)(positions % cols)
        return row + col


# --------------------------------------------------------------------- norms
class Norm(nn.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), in float32."""

    norm_type: str = "layernorm"
    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        features = x.shape[-1]
        if self.norm_type == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
            (features,),
            self.param_dtype,
        )
        y = y * scale.astype(jnp.float32)
        if self.norm_type == "layernorm":
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                (features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(config: ModelConfig, name: str | None = None) -> Norm:
    """The configured norm; `name` is left out inside `setup`."""
    kw = {} if name is None else {"name": name}
    return Norm(
        norm_type=config.norm_type,
        epsilon=config.layer_norm_epsilon,
        dtype=config.compute_dtype,
        param_dtype=config.param_dtype,
        **kw,
    )


# ----------------------------------------------------------------------- MLP
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "swiglu": jax.nn.silu,
}


class Mlp(nn.Module):
    """Feed-forward block: plain wi -> act -> wo, or gated act(wi_0 x) * wi_1 x -> wo."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        act = _ACTIVATIONS[cfg.mlp_activation]
        if cfg.mlp_activation in ("gated_gelu", "swiglu"):
            gate = DenseGeneral((cfg.mlp_dim,), (EMBED, MLP), name="wi_0", **kw)(x)
            up = DenseGeneral((cfg.mlp_dim,), (EMBED, MLP), name="wi_1", **kw)(x)
            h = act(gate) * up
        else:
            h = act(DenseGeneral((cfg.mlp_dim,), (EMBED, MLP), name="wi", **kw)(x))
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        return DenseGeneral((cfg.d_model,), (MLP, EMBED), name="wo", **kw)(h)


# ----------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention through `jax.nn.dot_product_attention`.

    Separate methods project queries and keys/values, so cached decoding can
    reuse precomputed keys/values; `__call__` does the whole thing.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        heads = (cfg.num_heads, cfg.kv_dim)
        self.query = DenseGeneral(heads, (EMBED, HEADS, KV), **kw)
        self.key = DenseGeneral(heads, (EMBED, HEADS, KV), **kw)
        self.value = DenseGeneral(heads, (EMBED, HEADS, KV), **kw)
        self.out = DenseGeneral((cfg.d_model,), (HEADS, KV, EMBED), in_dims=2, **kw)

    def project_query(self, x: Array) -> Array:
        """[B, T, D] -> [B, T, heads, kv]."""
        return constrain(self.query(x), QKV_AXES)

    def project_key_value(self, x: Array) -> tuple[Array, Array]:
        """[B, S, D] -> keys, values [B, S, heads, kv]."""
        return constrain(self.key(x), QKV_AXES), constrain(self.value(x), QKV_AXES)

    def attend(
        self,
        query: Array,
        key: Array,
        value: Array,
        *,
        is_causal: bool = False,
        mask: Array | None = None,
        kv_lengths: Array | None = None,
        implementation: str | None = None,
    ) -> Array:
        """Attention of `query` over `key`/`value`, then the output projection.

        `kv_lengths` [B] masks keys at positions >= length (right padding);
        `mask` is a boolean [.., T, S] mask (True = attend). Callers guarantee
        every query row keeps at least one key.
        """
        out = jax.nn.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            is_causal=is_causal,
            key_value_seq_lengths=kv_lengths,
            implementation=implementation,
        )
        return self.project_output(out)

    def project_output(self, x: Array) -> Array:
        """Per-head outputs [B, T, heads, kv] -> [B, T, D]."""
        return self.out(constrain(x, QKV_AXES))

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        *,
        is_causal: bool = False,
        mask: Array | None = None,
        kv_lengths: Array | None = None,
        rotary_positions: Array | None = None,
    ) -> Array:
        """`rotary_positions` [T] (self-attention only): rotate queries and keys by
        them (`rotary`), so scores depend on the offset between tokens."""
        query = self.project_query(inputs_q)
        key, value = self.project_key_value(inputs_kv)
        if rotary_positions is not None:
            query, key = rotary(query, rotary_positions), rotary(key, rotary_positions)
        return self.attend(
            query,
            key,
            value,
            is_causal=is_causal,
            mask=mask,
            kv_lengths=kv_lengths,
            implementation=self.config.attention_impl,
        )


def rotary(x: Array, positions: Array, base: float = 10_000.0) -> Array:
    """Rotates [B, T, heads, kv] queries or keys by their positions [T] (RoFormer).

    Dimension pairs (i, i + kv/2) turn by position * base**(-2i/kv), so the dot
    product of a rotated query and key depends on their positions only through
    the offset between them. Computed in float32, returned in x's dtype.
    """
    half = x.shape[-1] // 2
    freqs = base ** (-np.arange(half, dtype=np.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]  # [T, 1, half]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------- single-query attention
# One query row per sequence (a cached decoding step) is a matrix-vector product:
# memory bound, so it is written as multiply + reduce in float32, which XLA can
# fuse with a slice of the stacked cache and so read the cache where it lies.
# The blocked variant runs an online softmax over blocks of keys.
_MASKED = float(np.finfo(np.float32).min)
SoftmaxState = tuple[Array, Array, Array]  # running max [B, H], denominator [B, H], sum [B, H, Dh]


def _softmax_part(query: Array, key: Array, value: Array, valid: Array | None) -> SoftmaxState:
    """Unnormalised attention of query [B, 1, H, Dh] over key/value [B, S, H, Dh].

    `valid` bool [B or 1, S] (None: all valid). A part with no valid key has a
    zero denominator and drops out of `_merge_softmax`.
    """
    q = query[:, 0].astype(jnp.float32) * query.shape[-1] ** -0.5
    scores = jnp.sum(q[:, None] * key.astype(jnp.float32), axis=-1)  # [B, S, H]
    if valid is not None:
        scores = jnp.where(valid[..., None], scores, _MASKED)
    top = jnp.max(scores, axis=1)
    probs = jnp.exp(scores - top[:, None])
    if valid is not None:
        probs = jnp.where(valid[..., None], probs, 0.0)
    acc = jnp.sum(probs[..., None] * value.astype(jnp.float32), axis=1)
    return top, jnp.sum(probs, axis=1), acc


def _merge_softmax(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    top = jnp.maximum(a[0], b[0])
    scale_a, scale_b = jnp.exp(a[0] - top), jnp.exp(b[0] - top)
    return (
        top,
        a[1] * scale_a + b[1] * scale_b,
        a[2] * scale_a[..., None] + b[2] * scale_b[..., None],
    )


def _finish_softmax(state: SoftmaxState, dtype: Any) -> Array:
    return (state[2] / state[1][..., None])[:, None].astype(dtype)


def single_query_attention(query: Array, key: Array, value: Array, valid: Array | None) -> Array:
    """Softmax attention of one query row per sequence over `key`/`value`.

    query [B, 1, H, Dh]; key, value [B, S, H, Dh]; `valid` bool [B or 1, S]
    (True = attend, at least one per row; None = all). Returns [B, 1, H, Dh]
    in the query's dtype; scores, softmax and sums run in float32.
    """
    return _finish_softmax(_softmax_part(query, key, value, valid), query.dtype)


def blocked_single_query_attention(
    query: Array,
    read_block: Callable[[Array], tuple[Array, Array]],
    block_valid: Callable[[Array], Array],
    num_blocks: Array,
) -> Array:
    """`single_query_attention` over the first `num_blocks` (>= 1) blocks of keys only.

    `read_block(j) -> (key, value)` [B, S_b, H, Dh] and `block_valid(j) -> bool
    [B or 1, S_b]` give block j; block 0 must hold a valid key for every row.
    `num_blocks` may be traced: a `fori_loop` with an online softmax, so a
    decoding step reads only the blocks that hold filled positions.
    """

    def body(j: Array, state: SoftmaxState) -> SoftmaxState:
        key, value = read_block(j)
        return _merge_softmax(state, _softmax_part(query, key, value, block_valid(j)))

    first = jnp.zeros((), jnp.int32)
    state = _softmax_part(query, *read_block(first), block_valid(first))
    state = jax.lax.fori_loop(1, num_blocks, body, state)
    return _finish_softmax(state, query.dtype)


# --------------------------------------------------------------------- masks
def conv_sparse_mask(grid: Sequence[int], kernel_size: int) -> np.ndarray:
    """Parti's conv-shaped causal mask over decoder slots, bool [N, N] (True = attend).

    Slot t sits at grid cell (t // w, t % w). Query slot t sees key slot s iff
    s <= t (causal) and s lies in the kernel_size x kernel_size window centred
    on t: |row_t - row_s| <= k // 2 and |col_t - col_s| <= k // 2. The diagonal
    is always kept, so no row is fully masked.
    """
    rows, cols = int(grid[0]), int(grid[1])
    n = rows * cols
    half = kernel_size // 2
    idx = np.arange(n)
    r, c = idx // cols, idx % cols
    causal = idx[None, :] <= idx[:, None]
    near_rows = np.abs(r[:, None] - r[None, :]) <= half
    near_cols = np.abs(c[:, None] - c[None, :]) <= half
    return causal & near_rows & near_cols


def text_lengths(encoder_input_tokens: Array) -> Array:
    """Non-padding text length per row, int32 [B], at least 1.

    Text is right-padded with id 0 (T5 convention) and always ends in EOS, so
    the count of non-zero ids is the length; the floor of 1 keeps an all-pad
    row from masking every key (NaN on fused kernels).
    """
    lengths = jnp.sum(encoder_input_tokens != 0, axis=-1).astype(jnp.int32)
    return jnp.maximum(lengths, 1)
