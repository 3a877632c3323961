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
(`optax.contrib.scale_by_muon`), then scaled to an RMS of `muon_update_rms`
(Liu et al. 2025, "Muon is Scalable": at 0.2 about AdamW's, so one learning
rate serves both). Every other parameter
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

PyTree = Any


def path_name(path: tuple) -> str:
    """'encoder/layers_0/mlp/wi/kernel': a key path's names joined by '/'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


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


def learning_rate_fn(config: OptimizerConfig) -> optax.Schedule:
    """The schedule named by `config.schedule` (of the update count, as optax counts).

    'parti': linear warm-up to `learning_rate`, constant, then exponential decay
    to `learning_rate * final_lr_ratio` from decay_start_step to decay_end_step;
    'cosine': warm-up, then a cosine to the final rate at decay_end_step;
    'constant': warm-up, then constant. The final rate holds afterwards.
    """
    c, peak = config, config.learning_rate
    final = peak * c.final_lr_ratio
    if c.schedule == "parti":
        if not (c.warmup_steps <= c.decay_start_step < c.decay_end_step) or not (
            0.0 < c.final_lr_ratio <= 1.0
        ):
            raise ValueError(
                "OptimizerConfig: schedule 'parti' needs warmup_steps <= decay_start_step < "
                f"decay_end_step and 0 < final_lr_ratio <= 1; got warmup_steps={c.warmup_steps}, "
                f"decay_start_step={c.decay_start_step}, decay_end_step={c.decay_end_step}, "
                f"final_lr_ratio={c.final_lr_ratio}"
            )
        return optax.warmup_exponential_decay_schedule(
            0.0,
            peak,
            c.warmup_steps,
            transition_steps=c.decay_end_step - c.decay_start_step,
            decay_rate=c.final_lr_ratio,
            transition_begin=c.decay_start_step - c.warmup_steps,
            end_value=final,
        )
    if c.schedule == "cosine":
        if c.decay_end_step <= c.warmup_steps:
            raise ValueError(
                "OptimizerConfig: schedule 'cosine' needs decay_end_step > warmup_steps; got "
                f"decay_end_step={c.decay_end_step}, warmup_steps={c.warmup_steps}"
            )
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, c.warmup_steps, c.decay_end_step, final
        )
    if c.schedule == "constant":
        warmup = optax.linear_schedule(0.0, peak, c.warmup_steps)
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [c.warmup_steps])
    raise ValueError(
        f"OptimizerConfig.schedule={c.schedule!r}: expected 'parti', 'cosine' or 'constant'"
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


def scale_by_muon(config: OptimizerConfig) -> optax.GradientTransformation:
    """Muon on the matrices `muon_matrix_axes` names, Adam on every other parameter.

    The Muon part is `optax.contrib.scale_by_muon` (Nesterov momentum with bias
    correction, Newton-Schulz on each matrix read as [fan_in, fan_out] by
    `optax.contrib.MuonDimensionNumbers`, leading axes such as the scanned
    layers' as batch axes), each update then scaled to RMS `muon_update_rms`
    (`sqrt(max(fan_in, fan_out)) * rms`, Liu et al. 2025). On the shapes demo's
    codes it scored 92.0 / 92.0 / 90.0% in-distribution (sampling seeds 0-2)
    where this project's own batched transform had scored 84.0 / 85.5 / 79.5%
    (README "Measured").
    """
    for field, ok, want in (
        ("muon_beta", 0.0 <= config.muon_beta < 1.0, "in [0, 1)"),
        ("muon_update_rms", config.muon_update_rms > 0.0, "> 0 (0.2 is about AdamW's)"),
        ("muon_newton_schulz_steps", config.muon_newton_schulz_steps >= 1, ">= 1 (5 is usual)"),
    ):
        if not ok:
            raise ValueError(f"OptimizerConfig.{field}={getattr(config, field)!r}: must be {want}")

    def matrix_axes(path: tuple, x: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        return muon_matrix_axes(path_name(path), x.ndim)

    def dims(updates: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: optax.contrib.MuonDimensionNumbers(*matrix_axes(p, x)), updates
        )

    def to_rms(updates: PyTree, state: Any, params: PyTree = None) -> tuple[PyTree, Any]:
        def scale(path, u):
            reduction, output = matrix_axes(path, u)
            fans = [int(np.prod([u.shape[a] for a in axes])) for axes in (reduction, output)]
            return u * (config.muon_update_rms * float(np.sqrt(max(fans))))

        return jax.tree_util.tree_map_with_path(scale, updates), state

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: "muon" if matrix_axes(p, x) else "adam", params
        )

    muon = optax.contrib.scale_by_muon(
        ns_steps=config.muon_newton_schulz_steps,
        beta=config.muon_beta,
        nesterov=True,
        weight_dimension_numbers=dims,
    )
    return optax.partition(
        {
            "muon": optax.chain(muon, optax.GradientTransformation(optax.init_empty_state, to_rms)),
            "adam": optax.scale_by_adam(config.beta1, config.beta2, eps=config.adam_epsilon),
        },
        labels,
    )


def freeze(optimizer: optax.GradientTransformation, pattern: str) -> optax.GradientTransformation:
    """`optimizer` on every parameter whose path ('text_encoder/layers_0/...') does not
    match the regex `pattern`; those that do never change (no update, no weight
    decay, no optimizer state)."""
    regex = re.compile(pattern)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if regex.search(path_name(path)) else "trained", params
        )

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def _decay_mask(exclude: str | None) -> Callable[[PyTree], PyTree] | None:
    if not exclude:
        return None
    pattern = re.compile(exclude)

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: pattern.search(path_name(path)) is None, params
        )

    return mask


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
    opt_state_abstract: PyTree, param_shardings: PyTree, mesh: jax.sharding.Mesh | None = None
) -> PyTree:
    """A NamedSharding for every optimizer-state leaf, consistent with its parameter.

    A state leaf is matched to the parameter whose key path is the longest
    suffix of the leaf's path (optax keeps param-structured trees inside its
    states). A matched leaf takes the parameter's spec, with `None` on dims of
    size 1 (factored row/column statistics, int8 scales, placeholders);
    anything else (counts, unmatched leaves) is replicated. `param_shardings`
    holds NamedShardings, or PartitionSpecs over mesh axes (then pass `mesh`).
    """
    specs: dict[tuple[str, ...], PartitionSpec] = {}
    is_leaf = lambda x: isinstance(x, NamedSharding | PartitionSpec)  # noqa: E731
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=is_leaf)[0]:
        mesh = mesh or getattr(s, "mesh", None)
        specs[_path_key(path)] = getattr(s, "spec", s)
    if mesh is None:
        raise ValueError("optimizer_state_shardings: pass `mesh` when giving PartitionSpecs")

    def leaf_sharding(path, leaf):
        key, shape = _path_key(path), tuple(getattr(leaf, "shape", ()))
        spec = next((tuple(specs[key[i:]]) for i in range(len(key)) if key[i:] in specs), None)
        if spec is None or len(spec) > len(shape):
            return NamedSharding(mesh, PartitionSpec())
        spec += (None,) * (len(shape) - len(spec))
        return NamedSharding(
            mesh, PartitionSpec(*(None if d == 1 else a for d, a in zip(shape, spec)))
        )

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state_abstract)


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(path_name((k,)) for k in path)
