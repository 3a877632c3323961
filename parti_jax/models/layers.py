"""The transformer toolkit of the encoder-decoder and the ViT-VQGAN: dense, embeddings,
norms, MLP, attention, layers, layer stacks, masks, parameter-tree helpers.

A `LayerSpec` of plain fields parametrises the norms, MLP and attention, so
nothing here needs a model config. Parameters carry logical axis names (from
`parti_jax.partitioning`), never mesh axes, and are stored in `param_dtype`;
matmuls run in `dtype`; norms and softmax statistics in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from jax.ad_checkpoint import checkpoint_name

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
    LAYERS,
    MLP,
    POSITION,
    VOCAB,
)

Array = jax.Array
DType = Any
PyTree = Any

# Logical names of the activations that flow between blocks.
HIDDEN_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)
QKV_AXES = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
    """Logical sharding constraint; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, axes)


# --------------------------------------------------------------------- dense
# Kernel initialisers by name: (variance_scaling mode, distribution), scale 1.
KERNEL_INITS = {
    "fan_in": ("fan_in", "truncated_normal"),  # the encoder-decoder's (T5X)
    "xavier": ("fan_avg", "uniform"),  # Glorot uniform: the ViT-VQGAN's
}


class DenseGeneral(nn.Module):
    """A matmul over the last `in_dims` input dims into `features`, optionally plus a bias.

    The kernel has shape `x.shape[-in_dims:] + features` and the logical names
    `kernel_axes`; `kernel_init` (a key of KERNEL_INITS) scales over all input
    and all output dims (so [EMBED, HEADS, KV] projections get the same scale
    as a 2-D dense). The bias (zeros) has shape `features` and the last
    logical names of the kernel.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    in_dims: int = 1
    use_bias: bool = False
    kernel_init: str = "fan_in"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    # Accumulation / output dtype of the matmul; None means `dtype`.
    accum_dtype: DType | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = tuple(self.features)
        in_shape = x.shape[-self.in_dims :]
        n_in = len(in_shape)
        mode, distribution = KERNEL_INITS[self.kernel_init]
        init = nn.initializers.variance_scaling(
            1.0,
            mode,
            distribution,
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
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (contract, ((), ())),
            preferred_element_type=self.accum_dtype,
        )
        if self.use_bias:
            bias_axes = tuple(self.kernel_axes[n_in:])
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(y.dtype)
        return y


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
    """LayerNorm (scale and bias) or RMSNorm (scale only); float32 inside, `dtype` out."""

    norm_type: str = "layernorm"
    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def param(name: str, init: Callable[..., Array]) -> Array:
            init = nn.with_logical_partitioning(init, (EMBED,))
            return self.param(name, init, x.shape[-1:], self.param_dtype).astype(jnp.float32)

        x = x.astype(jnp.float32)
        if self.norm_type == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        y = y * param("scale", nn.initializers.ones)
        if self.norm_type == "layernorm":
            y = y + param("bias", nn.initializers.zeros)
        return y.astype(self.dtype)


# ---------------------------------------------------------------------- spec
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "swiglu": jax.nn.silu,
}
GATED_ACTIVATIONS = ("gated_gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The plain fields that shape a transformer layer's norms, attention and MLP."""

    width: int  # residual stream (d_model); attention and MLP outputs
    num_heads: int
    head_dim: int
    mlp_dim: int  # hidden width of the MLP
    activation: str = "gelu"  # a key of ACTIVATIONS; gated ones have two input matrices
    norm_type: str = "layernorm"  # or 'rmsnorm'
    norm_epsilon: float = 1e-6
    use_bias: bool = False  # a bias on every dense
    kernel_init: str = "fan_in"  # a key of KERNEL_INITS
    dtype: DType = jnp.float32  # matmuls and the outputs of norms
    param_dtype: DType = jnp.float32
    attention_impl: str | None = "xla"  # of jax.nn.dot_product_attention
    dropout_rate: float = 0.0  # on every residual branch when dropout is enabled

    def dense(self, features: tuple[int, ...], axes: tuple[str, ...], **kw: Any) -> DenseGeneral:
        """A DenseGeneral with this spec's bias, initialiser and dtypes."""
        return DenseGeneral(
            features,
            axes,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **kw,
        )

    def norm(self, **kw: Any) -> Norm:
        """The spec's norm (pass `name=` in compact methods)."""
        return Norm(self.norm_type, self.norm_epsilon, self.dtype, self.param_dtype, **kw)


# ----------------------------------------------------------------------- MLP
class Mlp(nn.Module):
    """Feed-forward block back to the input's width: wi -> act -> wo, or gated
    act(wi_0 x) * wi_1 x -> wo."""

    spec: LayerSpec

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = self.spec
        x = checkpoint_name(x, "mlp_in")  # saved by the named remat policies
        act = ACTIVATIONS[s.activation]
        hidden = ((s.mlp_dim,), (EMBED, MLP))
        if s.activation in GATED_ACTIVATIONS:
            h = act(s.dense(*hidden, name="wi_0")(x)) * s.dense(*hidden, name="wi_1")(x)
        else:
            h = act(s.dense(*hidden, name="wi")(x))
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        return s.dense((x.shape[-1],), (MLP, EMBED), name="wo")(h)


# ----------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention through `jax.nn.dot_product_attention` (self or cross).

    Separate methods project queries and keys/values, so cached decoding can
    reuse precomputed keys/values; `__call__` does the whole thing.
    """

    spec: LayerSpec

    def setup(self) -> None:
        s = self.spec
        heads = (s.num_heads, s.head_dim)
        self.query = s.dense(heads, (EMBED, HEADS, KV))
        self.key = s.dense(heads, (EMBED, HEADS, KV))
        self.value = s.dense(heads, (EMBED, HEADS, KV))
        self.out = s.dense((s.width,), (HEADS, KV, EMBED), in_dims=2)

    def project_query(self, x: Array) -> Array:
        """[B, T, D] -> [B, T, heads, kv]."""
        return checkpoint_name(constrain(self.query(x), QKV_AXES), "query")

    def project_key_value(self, x: Array) -> tuple[Array, Array]:
        """[B, S, D] -> keys, values [B, S, heads, kv]."""
        key = checkpoint_name(constrain(self.key(x), QKV_AXES), "key")
        return key, checkpoint_name(constrain(self.value(x), QKV_AXES), "value")

    def attend(
        self,
        query: Array,
        key: Array,
        value: Array,
        *,
        is_causal: bool = False,
        mask: Array | None = None,
        kv_lengths: Array | None = None,
        local_window_size: tuple[int, int] | None = None,
    ) -> Array:
        """Attention of `query` over `key`/`value`, then the output projection.

        `kv_lengths` [B] masks keys at positions >= length (right padding);
        `mask` is a boolean [.., T, S] mask (True = attend); `local_window_size`
        (left, right) limits query t to keys [t - left, t + right] (cuDNN then
        skips the tiles outside that band). Callers guarantee every query row
        keeps at least one key.
        """
        out = jax.nn.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            is_causal=is_causal,
            key_value_seq_lengths=kv_lengths,
            local_window_size=local_window_size,
            implementation=self.spec.attention_impl,
        )
        return self.project_output(out)

    def probabilities(self, query: Array, key: Array, kv_lengths: Array | None = None) -> Array:
        """The attention weights `attend` uses (no causal mask), written out for inspection:
        float32 [B, heads, T, S], rows summing to 1 over keys < `kv_lengths`."""
        scale = 1.0 / np.sqrt(query.shape[-1])
        logits = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32)
        logits = logits * scale
        if kv_lengths is not None:
            valid = jnp.arange(key.shape[1])[None, :] < kv_lengths[:, None]
            logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)

    def project_output(self, x: Array) -> Array:
        """Per-head outputs [B, T, heads, kv] -> [B, T, D]."""
        return self.out(checkpoint_name(constrain(x, QKV_AXES), "attention_out"))

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        *,
        rotary_positions: Array | None = None,
        **masks: Any,
    ) -> Array:
        """`masks` as for `attend`. `rotary_positions` [T] (self-attention only):
        rotate queries and keys by them (`rotary`), so scores depend on the
        offset between tokens."""
        query = self.project_query(inputs_q)
        key, value = self.project_key_value(inputs_kv)
        if rotary_positions is not None:
            query, key = rotary(query, rotary_positions), rotary(key, rotary_positions)
        return self.attend(query, key, value, **masks)


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


# -------------------------------------------------------------------- layers
class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, each on a residual branch with dropout.

    Scan-shaped (see `layer_stack`): `(x, per_layer, shared, enable_dropout)
    -> (x, None)`, with `per_layer` unused and `shared` = (kv_lengths [B] or
    None, boolean mask [.., T, T] or None).
    """

    spec: LayerSpec
    attention: bool = True  # False: an MLP-only layer, each position on its own
    rotary: bool = False  # rotate queries and keys by position (`rotary`)

    @nn.compact
    def __call__(
        self, x: Array, per_layer: Any, shared: Any, enable_dropout: bool = False
    ) -> tuple[Array, None]:
        del per_layer
        lengths, mask = shared
        s = self.spec
        drop = nn.Dropout(s.dropout_rate, deterministic=not enable_dropout)
        if self.attention:
            h = s.norm(name="pre_attention_norm")(x)
            positions = jnp.arange(h.shape[1]) if self.rotary else None
            attention = Attention(s, name="attention")
            x = x + drop(attention(h, h, mask=mask, kv_lengths=lengths, rotary_positions=positions))
        h = s.norm(name="pre_mlp_norm")(x)
        x = x + drop(Mlp(s, name="mlp")(h))
        return constrain(x, HIDDEN_AXES), None


# -------------------------------------------------------------- layer stacks
# A scan-shaped layer: every method that a stack runs takes
# (carry, per_layer, shared, enable_dropout) and returns (carry, out). Leaves of
# `per_layer` carry a leading layer axis and are sliced per layer; `shared` goes
# to every layer whole; `enable_dropout` is a static bool. One argument layout
# for all methods lets one nn.scan (one in_axes) serve all of them.
LayerStack = nn.Module | Sequence[nn.Module]


def layer_stack(
    layer: Callable[..., nn.Module],
    num_layers: int,
    *,
    scan: bool,
    remat: bool = False,
    remat_policy: Callable[..., bool] | None = None,
    methods: Sequence[str] = ("__call__",),
    name: str = "layers",
) -> LayerStack:
    """`num_layers` copies of a scan-shaped layer (a module class or a partial of one).

    Scanned: one module `name` whose parameters carry a leading LAYERS axis;
    unrolled: modules `name_0`, `name_1`, ... Both run the same function
    (`run_stack`). `remat` rematerialises `__call__` (the training pass) in
    the backward pass with the jax.checkpoint `remat_policy` (None: save
    nothing); the other `methods` run as they are.
    """
    if remat:  # static argument 4 of (self, carry, per_layer, shared, enable_dropout)
        layer = nn.remat(layer, policy=remat_policy, prevent_cse=not scan, static_argnums=(4,))
    if not scan:
        return [layer(name=f"{name}_{i}") for i in range(num_layers)]
    scanned = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS},
        methods=list(methods),
    )
    return scanned(name=name)


def run_stack(
    stack: LayerStack,
    carry: Any,
    per_layer: Any = None,
    shared: Any = None,
    enable_dropout: bool = False,
    method: str = "__call__",
) -> tuple[Any, Any]:
    """Runs `method` of every layer of a `layer_stack` in turn.

    Returns (carry, outputs stacked on a leading layer axis, or None).
    """
    if not isinstance(stack, Sequence):
        return getattr(stack, method)(carry, per_layer, shared, enable_dropout)
    outputs = []
    for i, layer in enumerate(stack):
        sliced = jax.tree.map(lambda a, i=i: a[i], per_layer)
        carry, out = getattr(layer, method)(carry, sliced, shared, enable_dropout)
        outputs.append(out)
    if outputs[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)


class Stack(nn.Module):
    """A `layer_stack` of `layer` under a module of its own (its 'layers' one level down)."""

    layer: Callable[..., nn.Module]
    num_layers: int
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(
        self, carry: Any, per_layer: Any = None, shared: Any = None, enable_dropout: bool = False
    ) -> tuple[Any, Any]:
        stack = layer_stack(self.layer, self.num_layers, scan=self.scan, remat=self.remat)
        return run_stack(stack, carry, per_layer, shared, enable_dropout)


# ------------------------------------------------------- parameter trees
_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def param_count(tree: PyTree) -> int:
    """Number of scalars in a (possibly boxed, possibly abstract) parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def scan_to_unscanned(params: PyTree) -> PyTree:
    """Scanned layout ('layers' with a leading LAYERS axis) -> 'layers_0', 'layers_1', ...

    Works on plain or logically boxed parameter dicts (any nesting, e.g. a
    variables dict or the params of one stack); returns plain dicts.
    """
    if not isinstance(params, Mapping):
        return params
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name != "layers" or not isinstance(value, Mapping):
            out[name] = scan_to_unscanned(value)
            continue
        for i in range(jax.tree.leaves(nn.meta.unbox(value))[0].shape[0]):
            out[f"layers_{i}"] = jax.tree.map(
                lambda x, i=i: (
                    x.replace(value=x.value[i], names=x.names[1:]) if _is_box(x) else x[i]
                ),
                unfreeze(value),
                is_leaf=_is_box,
            )
    return out


def unscanned_to_scan(params: PyTree) -> PyTree:
    """'layers_0', 'layers_1', ... -> one 'layers' entry stacked on a leading LAYERS axis."""
    if not isinstance(params, Mapping):
        return params
    out = {k: unscanned_to_scan(v) for k, v in params.items() if not _LAYER_KEY.match(k)}
    layers = {int(k[7:]): unfreeze(v) for k, v in params.items() if _LAYER_KEY.match(k)}
    if not layers:
        return out
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(
            f"unscanned_to_scan: layer indices {sorted(layers)} are not 0..{len(layers) - 1}"
        )
    if "layers" in out:
        raise ValueError("unscanned_to_scan: both 'layers' and 'layers_<i>' entries present")

    def stack(*xs: Any) -> Any:
        if _is_box(xs[0]):
            values = jnp.stack([x.value for x in xs])
            return xs[0].replace(value=values, names=(LAYERS, *xs[0].names))
        return jnp.stack(xs)

    out["layers"] = jax.tree.map(stack, *[layers[i] for i in range(len(layers))], is_leaf=_is_box)
    return out


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

    Decoder slot t predicts grid cell t = (t // w, t % w) and holds the token of
    cell t - 1 (slot 0 holds BOS). Query slot t sees key slot s >= 1 iff cell
    s - 1 is earlier than cell t (s <= t) and lies in the kernel_size x
    kernel_size window centred on cell t (|row| and |column| distances <=
    k // 2); slot 0 (BOS, no cell) is seen only by query 0, which has no
    earlier cell. Every other query sees at least one cell when k >= 3 (its
    left or upper neighbour). So every True entry lies in the band
    t - `conv_band` < s <= t, which banded kernels exploit.
    """
    rows, cols = int(grid[0]), int(grid[1])
    n = rows * cols
    half = kernel_size // 2
    t = np.arange(n)[:, None]  # query slot = the cell it predicts
    s = np.arange(n)[None, :]  # key slot, holding cell s - 1
    cell = s - 1
    near = (np.abs(t // cols - cell // cols) <= half) & (np.abs(t % cols - cell % cols) <= half)
    return ((s >= 1) & (s <= t) & near) | ((s == 0) & (t == 0))


def conv_band(grid: Sequence[int], kernel_size: int) -> int:
    """Width of the band holding every key of `conv_sparse_mask`: query t's keys
    lie in slots (t - band, t] (k // 2 grid rows and k // 2 columns back)."""
    half = kernel_size // 2
    return min(int(grid[0]) * int(grid[1]), half * int(grid[1]) + half)


def banded_block_size(length: int, band: int, require_saving: bool = True) -> int | None:
    """The query block of `banded_attention` for `length` slots and a `band`, or
    None when blocks would not read at most half the keys of dense attention
    (`require_saving`).

    The largest divisor of `length` no wider than band / 2 (at least 8): each
    query then reads block + band - 1 keys instead of `length`.
    """
    divisors = [b for b in range(1, length + 1) if length % b == 0]
    block = max([b for b in divisors if b <= max(8, band // 2)], default=length)
    return block if 2 * (block + band - 1) <= length or not require_saving else None


def banded_attention(
    query: Array, key: Array, value: Array, mask: np.ndarray, band: int, block: int
) -> Array:
    """Masked attention whose keys all lie in a causal band, computed block by block.

    query, key, value [B, N, H, Dh]; `mask` static bool [N, N] (True = attend,
    every True at t - band < s <= t, at least one per row). Queries go in blocks
    of `block` slots (dividing N); block i reads only the keys of slots
    [i * block - band + 1, (i + 1) * block): block + band - 1 keys per query
    instead of N, gathered by static slices (no dynamic shapes, so XLA tiles it
    on any backend). Scores and softmax in float32. Returns [B, N, H, Dh] in
    the query's dtype; equals dense masked attention (tests/models).
    """
    batch, n, heads, dim = query.shape
    if n % block:
        raise ValueError(f"banded_attention: block {block} must divide the {n} slots")
    rows, cols = np.nonzero(mask)
    if np.any(cols > rows) or np.any(rows - cols >= band):
        raise ValueError(f"banded_attention: mask has keys outside the causal band of {band}")
    num_blocks, width = n // block, block + band - 1
    pad = ((0, 0), (band - 1, 0), (0, 0), (0, 0))
    key_p, value_p = jnp.pad(key, pad), jnp.pad(value, pad)  # padded slot j = slot j - band + 1

    def windows(x: Array) -> Array:  # [B, blocks, width, H, Dh]
        return jnp.stack([x[:, i * block : i * block + width] for i in range(num_blocks)], 1)

    # Static mask per block: padded key j of block i is slot i * block + j - band + 1.
    slots = np.arange(num_blocks)[:, None] * block + np.arange(width)[None, :] - band + 1
    queries = np.arange(n).reshape(num_blocks, block)
    block_mask = np.zeros((num_blocks, block, width), bool)
    for i in range(num_blocks):
        inside = slots[i] >= 0
        block_mask[i][:, inside] = mask[queries[i]][:, slots[i][inside]]
    q = query.reshape(batch, num_blocks, block, heads, dim)
    f32 = dict(preferred_element_type=jnp.float32)
    scores = jnp.einsum("bnqhd,bnkhd->bnhqk", q, windows(key_p), **f32) * dim**-0.5
    scores = jnp.where(jnp.asarray(block_mask)[None, :, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs, windows(value_p), **f32)
    return out.reshape(batch, n, heads, dim).astype(query.dtype)


def splash_attention(query: Array, key: Array, value: Array, mask: np.ndarray) -> Array:
    """Block-sparse attention with a static mask through the Pallas TPU splash kernel:
    blocks of 128 x 128 that the mask leaves empty are skipped, forward and backward.

    query, key, value [B, N, H, Dh] with N a multiple of 128; `mask` bool [N, N]
    (True = attend, at least one per row). Returns [B, N, H, Dh]. Under a mesh
    (jax.set_mesh + flax logical rules, as in training) it runs per shard
    (`jax.shard_map` over the batch and head axes of QKV_AXES); off TPU the
    kernel is interpreted (slow: for tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    n, dim = query.shape[1], query.shape[-1]
    if n % 128:
        raise ValueError(
            f"splash attention needs a multiple of 128 positions, got {n}; use "
            "conv_attention_kernel='banded' (or 'auto') for this grid"
        )
    interpret = jax.default_backend() != "tpu"

    def run(q: Array, k: Array, v: Array) -> Array:
        heads = q.shape[2]  # this shard's heads
        masks = sm.MultiHeadMask([sm.NumpyMask(mask) for _ in range(heads)])
        kernel = sk.make_splash_mha(masks, head_shards=1, q_seq_shards=1, interpret=interpret)
        heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, H, N, Dh]
        out = jax.vmap(kernel)(heads_first(q * dim**-0.5), heads_first(k), heads_first(v))
        return heads_first(out).astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(QKV_AXES)
    if mesh.empty or all(axis is None for axis in spec):
        return run(query, key, value)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        query, key, value
    )


def text_lengths(encoder_input_tokens: Array) -> Array:
    """Non-padding text length per row, int32 [B], at least 1.

    Text is right-padded with id 0 (T5 convention) and always ends in EOS, so
    the count of non-zero ids is the length; the floor of 1 keeps an all-pad
    row from masking every key (NaN on fused kernels).
    """
    lengths = jnp.sum(encoder_input_tokens != 0, axis=-1).astype(jnp.int32)
    return jnp.maximum(lengths, 1)
