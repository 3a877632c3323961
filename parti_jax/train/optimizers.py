"""Optimizers: the Parti paper's Adafactor (default), Adam/AdamW and Muon, plus state shardings.

The paper trains with Adafactor, β1 = 0.9, a *fixed* β2 = 0.96, decoupled
weight decay 4.5e-2, gradient-norm clipping 4.0 and an absolute learning rate
(4.5e-5, 5k warm-up, exponential decay from 85k to 2.5% at 450k). That is not
`optax.adafactor` with its defaults (which has a step-dependent β2, scales
updates by the parameter RMS and clips updates at RMS 1.0), so the rule is
written out here:

    g      <- g * min(1, clip_norm / ||g||_global)            (clip_by_global_norm)
    matrices (both largest dims >= min_dim_size_to_factor):
      r    <- β2 r + (1-β2) mean_cols(g² + ε)                  (row statistics)
      c    <- β2 c + (1-β2) mean_rows(g² + ε)                  (column statistics)
      u    <- g / sqrt(r c / mean_rows(r))
    other tensors:
      v    <- β2 v + (1-β2) (g² + ε);  u <- g / sqrt(v)
    m      <- β1 m + (1-β1) u;  u <- m                         (first moment)
    p      <- p - lr_t * (u + wd * p)                          (decoupled decay)

Weight decay: `p -= lr_t * wd * p`, the decay rate multiplied by the *current
absolute* learning rate (optax.adamw / PyTorch AdamW convention), not by the
schedule's ratio `lr_t / lr_peak`. With the paper's wd = 4.5e-2 the ratio form
would remove 4.5% of every weight per step at peak, which no run survives;
`lr_t * wd` removes ~2e-6 per step, i.e. a factor e^-0.6 over the paper's
450k steps: a real but gentle pull towards zero that follows the schedule.

Muon (`name='muon'`; Jordan et al. 2024, not in the Parti paper) replaces the
scale step for the encoder-decoder's weight matrices: the attention
projections (query / key / value / out) and the MLP kernels get Nesterov
momentum (β = muon_beta), orthogonalised by Newton-Schulz iterations
(matrices of one shape batched together), then scaled to an RMS of
`muon_update_rms` (Liu et al. 2025, "Muon is Scalable": at 0.2 about
AdamW's, so one learning rate serves both). Every other parameter
(embeddings, the output projection, norms, biases) gets Adam with beta1 /
beta2. Decay and the schedule follow as for the other optimizers.

The first moment can be stored in float32, bfloat16 or int8 (per-row absmax
scales over the last axis with square-root companding, so small entries keep
precision). All moments are laid out so that each optimizer-state leaf has
either the parameter's shape or the parameter's shape with some dims set to 1
(`keepdims`); `optimizer_state_shardings` relies on that to give every leaf a
sharding consistent with its parameter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from parti_jax.train import schedules

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule; defaults are the Parti paper's."""

    # 'adafactor' (paper) | 'adamw' | 'adam' (adam = adamw without decay) | 'muon'
    # (Muon on attention / MLP matrices, AdamW on the rest; see the module doc).
    name: str = "adafactor"
    # Peak (absolute) learning rate.
    learning_rate: float = 4.5e-5
    # 'parti' (warm-up, constant, exponential decay) | 'cosine' | 'constant'.
    schedule: str = "parti"
    warmup_steps: int = 5_000
    # 'parti': exponential decay from this step ...
    decay_start_step: int = 85_000
    # ... to this step ('cosine': the step where the cosine ends).
    decay_end_step: int = 450_000
    # lr at decay_end_step relative to the peak.
    final_lr_ratio: float = 0.025
    beta1: float = 0.9
    # Adafactor: fixed second-moment decay (no step-dependent schedule). Adam: β2.
    beta2: float = 0.96
    # Decoupled weight decay, applied as p -= lr_t * weight_decay * p.
    weight_decay: float = 4.5e-2
    # Regex on '/'-joined parameter paths that get no weight decay (None: all decay).
    weight_decay_exclude: str | None = None
    # Global gradient-norm clipping (None: off).
    grad_clip_norm: float | None = 4.0
    # Adafactor: factor second moments of tensors whose two largest dims are >= this.
    factored: bool = True
    min_dim_size_to_factor: int = 128
    # Adafactor: added to squared gradients.
    adafactor_epsilon: float = 1e-30
    # Adafactor: first-moment storage, 'float32' | 'bfloat16' | 'int8'.
    momentum_dtype: str = "float32"
    # Adafactor options that the paper does NOT use (off by default).
    multiply_by_parameter_scale: bool = False
    clipping_threshold: float | None = None
    second_moment_bias_correction: bool = False
    # Adam: denominator epsilon.
    adam_epsilon: float = 1e-8
    # Muon: momentum of the orthogonalised matrices' updates ...
    muon_beta: float = 0.95
    # ... and the RMS each matrix's update is scaled to (AdamW's is about 0.2).
    muon_update_rms: float = 0.2
    # ... after this many Newton-Schulz iterations.
    muon_newton_schulz_steps: int = 5

    @classmethod
    def adamw_defaults(cls, **overrides: Any) -> OptimizerConfig:
        """Adam-W with β 0.9/0.99 and warm-up + cosine: the VQGAN / upsampler default."""
        base = dict(
            name="adamw",
            learning_rate=1e-4,
            schedule="cosine",
            warmup_steps=1_000,
            decay_end_step=100_000,
            final_lr_ratio=0.0,
            beta2=0.99,
            weight_decay=1e-4,
            grad_clip_norm=None,
        )
        base.update(overrides)
        return cls(**base)


def learning_rate_fn(config: OptimizerConfig) -> schedules.Schedule:
    """The schedule named by `config.schedule`."""
    if config.schedule == "parti":
        return schedules.parti_schedule(
            config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_start_step=config.decay_start_step,
            decay_end_step=config.decay_end_step,
            final_ratio=config.final_lr_ratio,
        )
    if config.schedule == "cosine":
        return schedules.warmup_cosine_schedule(
            config.learning_rate,
            warmup_steps=config.warmup_steps,
            total_steps=config.decay_end_step,
            final_ratio=config.final_lr_ratio,
        )
    if config.schedule == "constant":
        return schedules.constant_schedule(config.learning_rate, warmup_steps=config.warmup_steps)
    raise ValueError(
        f"OptimizerConfig.schedule={config.schedule!r}: expected 'parti', 'cosine' or 'constant'"
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip -> scale (Adafactor or Adam) -> + wd * p -> * (-lr_t)."""
    lr = learning_rate_fn(config)
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.name == "adafactor":
        parts.append(
            scale_by_adafactor(
                beta1=config.beta1,
                beta2=config.beta2,
                epsilon=config.adafactor_epsilon,
                factored=config.factored,
                min_dim_size_to_factor=config.min_dim_size_to_factor,
                momentum_dtype=config.momentum_dtype,
                multiply_by_parameter_scale=config.multiply_by_parameter_scale,
                clipping_threshold=config.clipping_threshold,
                bias_correction=config.second_moment_bias_correction,
            )
        )
    elif config.name in ("adamw", "adam"):
        parts.append(optax.scale_by_adam(config.beta1, config.beta2, eps=config.adam_epsilon))
    elif config.name == "muon":
        parts.append(scale_by_muon(config))
    else:
        raise ValueError(
            f"OptimizerConfig.name={config.name!r}: expected 'adafactor', 'adamw', 'adam' or 'muon'"
        )
    if config.weight_decay and config.name != "adam":
        parts.append(
            optax.add_decayed_weights(
                config.weight_decay, mask=_decay_mask(config.weight_decay_exclude)
            )
        )
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


# ----------------------------------------------------------------- Muon

# Which parameters Muon orthogonalises, by path, and how each is read as a
# matrix: (reduction axes, output axes), counted from the end so that a
# leading stacked-layers axis (scan_layers) is a batch axis.
_MUON_MATRICES = (
    (re.compile(r"(^|/)(query|key|value)/kernel$"), (-3,), (-2, -1)),  # [embed, heads, head]
    (re.compile(r"(^|/)out/kernel$"), (-3, -2), (-1,)),  # [heads, head, embed]
    (re.compile(r"(^|/)mlp/w[io](_\d+)?/kernel$"), (-2,), (-1,)),  # [in, out]
)


def muon_matrix_axes(path: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(reduction axes, output axes) of a parameter Muon updates, or None (Adam)."""
    for pattern, reduction, output in _MUON_MATRICES:
        if pattern.search(path) and ndim >= len(reduction) + len(output):
            return reduction, output
    return None


class MuonState(NamedTuple):
    momentum: PyTree  # per Muon matrix, the parameter's shape


# Newton-Schulz quintic coefficients (Jordan et al.): five iterations push
# every singular value of a normalised matrix into ~[0.7, 1.2].
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalise(x: jax.Array, steps: int = 5) -> jax.Array:
    """[..., m, n] -> the nearest semi-orthogonal matrices (approximately), by Newton-Schulz."""
    a, b, c = _NS_COEFFS
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + 1e-7)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else jnp.swapaxes(x, -1, -2)


def _as_matrices(path: tuple, u: jax.Array) -> tuple[jax.Array, Callable, int]:
    """u -> ([batch, fan_in, fan_out], its inverse, max(fan_in, fan_out))."""
    reduction, output = muon_matrix_axes(path_str(path), u.ndim)
    reduction = tuple(a % u.ndim for a in reduction)
    output = tuple(a % u.ndim for a in output)
    batch = tuple(a for a in range(u.ndim) if a not in reduction + output)
    order = batch + reduction + output
    moved = [u.shape[a] for a in order]
    fan_in = int(np.prod([u.shape[a] for a in reduction]))
    fan_out = int(np.prod([u.shape[a] for a in output]))
    flat = u.transpose(order).reshape(-1, fan_in, fan_out)
    inverse = np.argsort(order)

    def back(m: jax.Array) -> jax.Array:
        return m.reshape(moved).transpose(inverse)

    return flat, back, max(fan_in, fan_out)


def _muon_matrices(beta: float, update_rms: float, ns_steps: int) -> optax.GradientTransformation:
    """Nesterov momentum, orthogonalised, scaled to RMS `update_rms`, for the Muon matrices.

    Matrices of one shape go through Newton-Schulz together: one batched
    product per iteration instead of one per parameter (in the shapes demo's
    CPU loop 0.51 s per step against 0.54 s for optax.contrib's per-matrix
    Muon; the rest of Muon's cost is the iterations' arithmetic, BENCHMARKS.md).
    """

    def init_fn(params):
        return MuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        momentum = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g, state.momentum, updates)
        nesterov = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g, momentum, updates)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(nesterov)
        mats = [_as_matrices(path, u) for path, u in leaves]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (flat, _, _) in enumerate(mats):
            groups.setdefault(tuple(sorted(flat.shape[1:])), []).append(i)
        out: list[Any] = [None] * len(mats)
        for members in groups.values():
            # Same (m, n) up to transposition: bring each to [m, n], stack, orthogonalise.
            shape = mats[members[0]][0].shape[1:]
            stack = [
                m if m.shape[1:] == shape else jnp.swapaxes(m, 1, 2)
                for m in (mats[i][0] for i in members)
            ]
            sizes = [m.shape[0] for m in stack]
            ortho = orthogonalise(jnp.concatenate(stack, axis=0), ns_steps)
            for i, part in zip(members, jnp.split(ortho, np.cumsum(sizes)[:-1], axis=0)):
                flat, back, fan = mats[i]
                if part.shape[1:] != flat.shape[1:]:
                    part = jnp.swapaxes(part, 1, 2)
                out[i] = back(part * (update_rms * float(np.sqrt(fan))))
        new = jax.tree_util.tree_unflatten(treedef, out)
        return new, MuonState(momentum=momentum)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_muon(config: OptimizerConfig) -> optax.GradientTransformation:
    """Muon on the matrices `muon_matrix_axes` names, Adam on every other parameter."""
    for field, ok, want in (
        ("muon_beta", 0.0 <= config.muon_beta < 1.0, "in [0, 1)"),
        ("muon_update_rms", config.muon_update_rms > 0.0, "> 0 (0.2 is about AdamW's)"),
        ("muon_newton_schulz_steps", config.muon_newton_schulz_steps >= 1, ">= 1 (5 is usual)"),
    ):
        if not ok:
            raise ValueError(f"OptimizerConfig.{field}={getattr(config, field)!r}: must be {want}")

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: "muon" if muon_matrix_axes(path_str(p), x.ndim) else "adam", params
        )

    return optax.partition(
        {
            "muon": _muon_matrices(
                config.muon_beta, config.muon_update_rms, config.muon_newton_schulz_steps
            ),
            "adam": optax.scale_by_adam(config.beta1, config.beta2, eps=config.adam_epsilon),
        },
        labels,
    )


def _decay_mask(exclude: str | None) -> Callable[[PyTree], PyTree] | None:
    if not exclude:
        return None
    pattern = re.compile(exclude)

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: pattern.search(path_str(path)) is None, params
        )

    return mask


def path_str(path: tuple) -> str:
    """'/'-joined names of a jax key path, e.g. 'encoder/layers_0/attention/query/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


# ----------------------------------------------------------------- Adafactor


class AdafactorState(NamedTuple):
    """Adafactor moments; every leaf is param-shaped or param-shaped with dims of 1."""

    count: jax.Array  # int32 scalar: updates applied so far
    v_row: PyTree  # factored: param shape with the column dim set to 1
    v_col: PyTree  # factored: param shape with the row dim set to 1
    v: PyTree  # unfactored: param shape; factored: all-ones placeholder
    m: PyTree  # first moment (float32 / bfloat16 / int8 codes)
    m_scale: PyTree  # int8 first moment: per-row absmax, last dim 1; else placeholder


def factored_dims(
    shape: tuple[int, ...], factored: bool = True, min_dim_size_to_factor: int = 128
) -> tuple[int, int] | None:
    """(row_dim, col_dim) of a factored second moment, or None when not factored.

    The two largest dims are factored (the later one wins ties, as in optax),
    if the smaller of them has at least `min_dim_size_to_factor` entries.
    """
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    a, b = int(order[-2]), int(order[-1])
    if shape[a] < min_dim_size_to_factor:
        return None
    return (min(a, b), max(a, b))


def _placeholder(x) -> jax.Array:
    return jnp.zeros((1,) * x.ndim, jnp.float32)


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 codes and per-row (last axis) absmax scales, square-root companded."""
    x = x.astype(jnp.float32)
    if x.ndim == 0:
        scale = jnp.abs(x)
    else:
        scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.round(127.0 * jnp.sign(x) * jnp.sqrt(jnp.abs(x) / safe))
    return q.astype(jnp.int8), scale


def dequantize_int8(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of `quantize_int8`."""
    f = q.astype(jnp.float32) / 127.0
    return jnp.sign(f) * f * f * scale


def scale_by_adafactor(
    *,
    beta1: float | None = 0.9,
    beta2: float = 0.96,
    epsilon: float = 1e-30,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum_dtype: str = "float32",
    multiply_by_parameter_scale: bool = False,
    clipping_threshold: float | None = None,
    bias_correction: bool = False,
    parameter_scale_epsilon: float = 1e-3,
) -> optax.GradientTransformation:
    """Adafactor's preconditioning with a fixed β2 and optional momentum (see module doc).

    Returns the preconditioned (and momentum-averaged) direction `u`; chain it
    with weight decay and `-lr` to get the update. `bias_correction` replaces
    β2 by β2 (1 - β2^t) / (1 - β2^(t+1)) (Adafactor paper's β̂2); off in Parti.
    """
    if momentum_dtype not in ("float32", "bfloat16", "int8"):
        raise ValueError(
            f"momentum_dtype={momentum_dtype!r}: expected 'float32', 'bfloat16' or 'int8'"
        )

    def dims(p):
        return factored_dims(p.shape, factored, min_dim_size_to_factor)

    def init_fn(params):
        def v_row(p):
            d = dims(p)
            return _placeholder(p) if d is None else jnp.zeros(_set1(p.shape, d[1]), jnp.float32)

        def v_col(p):
            d = dims(p)
            return _placeholder(p) if d is None else jnp.zeros(_set1(p.shape, d[0]), jnp.float32)

        def v(p):
            return jnp.zeros(p.shape, jnp.float32) if dims(p) is None else _placeholder(p)

        def m(p):
            if beta1 is None:
                return _placeholder(p)
            dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}
            return jnp.zeros(p.shape, dtype[momentum_dtype])

        def m_scale(p):
            if beta1 is None or momentum_dtype != "int8":
                return _placeholder(p)
            return jnp.zeros(p.shape[:-1] + (1,) if p.ndim else (), jnp.float32)

        tm = jax.tree.map
        return AdafactorState(
            count=jnp.zeros([], jnp.int32),
            v_row=tm(v_row, params),
            v_col=tm(v_col, params),
            v=tm(v, params),
            m=tm(m, params),
            m_scale=tm(m_scale, params),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adafactor needs params (for shapes and parameter scale)")
        t = state.count.astype(jnp.float32)
        if bias_correction:
            decay = beta2 * (1.0 - beta2**t) / (1.0 - beta2 ** (t + 1.0))
        else:
            decay = jnp.float32(beta2)

        def one(g, p, v_row, v_col, v, m, m_scale):
            g = g.astype(jnp.float32)
            g2 = g * g + epsilon
            d = dims(p)
            if d is not None:
                r, c = d
                v_row = decay * v_row + (1.0 - decay) * jnp.mean(g2, axis=c, keepdims=True)
                v_col = decay * v_col + (1.0 - decay) * jnp.mean(g2, axis=r, keepdims=True)
                row_mean = jnp.mean(v_row, axis=r, keepdims=True)
                u = g * jax.lax.rsqrt(v_row / row_mean) * jax.lax.rsqrt(v_col)
            else:
                v = decay * v + (1.0 - decay) * g2
                u = g * jax.lax.rsqrt(v)
            if clipping_threshold is not None:
                rms = jnp.sqrt(jnp.mean(u * u))
                u = u / jnp.maximum(1.0, rms / clipping_threshold)
            if multiply_by_parameter_scale:
                pf = p.astype(jnp.float32)
                u = u * jnp.maximum(parameter_scale_epsilon, jnp.sqrt(jnp.mean(pf * pf)))
            if beta1 is not None:
                if momentum_dtype == "int8":
                    m_prev = dequantize_int8(m, m_scale)
                else:
                    m_prev = m.astype(jnp.float32)
                u = beta1 * m_prev + (1.0 - beta1) * u
                if momentum_dtype == "int8":
                    m, m_scale = quantize_int8(u)
                else:
                    m = u.astype(m.dtype)
            return u.astype(p.dtype), (v_row, v_col, v, m, m_scale)

        out = jax.tree.map(
            one, updates, params, state.v_row, state.v_col, state.v, state.m, state.m_scale
        )
        treedef = jax.tree.structure(updates)
        leaves = treedef.flatten_up_to(out)
        new_updates = treedef.unflatten([x[0] for x in leaves])
        fields = [treedef.unflatten([x[1][i] for x in leaves]) for i in range(5)]
        return new_updates, AdafactorState(optax.safe_increment(state.count), *fields)

    return optax.GradientTransformation(init_fn, update_fn)


def _set1(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(1 if i == dim else s for i, s in enumerate(shape))


# ------------------------------------------------------------------ shardings


def optimizer_state_shardings(
    opt_state_abstract: PyTree,
    param_shardings: PyTree,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> PyTree:
    """A NamedSharding for every optimizer-state leaf, consistent with its parameter.

    A state leaf is matched to the parameter whose key path is a suffix of the
    leaf's path (optax keeps param-structured trees inside its states). A
    matched leaf with the parameter's rank takes the parameter's spec, with
    `None` on dims of size 1 (factored row/column statistics, int8 scales,
    placeholders); anything else (counts, unmatched leaves) is replicated.

    `param_shardings` holds NamedShardings, or PartitionSpecs over mesh axes
    (then `mesh` is required), or logical PartitionSpecs (then `mesh` and
    `rules` are required: they are mapped with flax's logical rules).
    """
    param_specs: dict[tuple, PartitionSpec] = {}
    is_leaf = lambda x: isinstance(x, NamedSharding | PartitionSpec)  # noqa: E731
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=is_leaf)[0]:
        if isinstance(s, NamedSharding):
            mesh = mesh or s.mesh
            spec = s.spec
        else:
            spec = s
            if rules is not None:
                import flax.linen as nn

                spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        param_specs[_path_key(path)] = spec
    if mesh is None:
        raise ValueError("optimizer_state_shardings: pass `mesh` when giving PartitionSpecs")
    lengths = sorted({len(k) for k in param_specs}, reverse=True)

    def leaf_sharding(path, leaf):
        key = _path_key(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for n in lengths:
            if len(key) >= n and key[-n:] in param_specs:
                spec = tuple(param_specs[key[-n:]])
                spec = spec + (None,) * (len(shape) - len(spec))
                if len(spec) != len(shape):
                    break
                spec = tuple(None if d == 1 else a for d, a in zip(shape, spec))
                return NamedSharding(mesh, PartitionSpec(*spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state_abstract)


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(path_str((k,)) for k in path)
