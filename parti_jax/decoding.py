"""Pure samplers for the image-token decoder, driven by a `tokens_to_logits` callback.

The sampler knows nothing about the model (contract: docs/DESIGN.md section 3)::

    tokens_to_logits(tokens [R, 1] int32, cache, step int32 scalar)
        -> (logits [R, V] float32, cache)

`step` is the position of the input token (0 for BOS), hence of the image
token whose logits come back. The caller preallocates the cache; `sample`
threads it through one `lax.scan` over the whole grid (no EOS). With
classifier-free guidance R = 2B: rows [B, 2B) hold the empty prompt `[EOS]`
(or a negative prompt) and the guided token is fed to both halves. Row i draws with
`fold_in(fold_in(key(seed), prompt_ids[i]), sample_indices[i])`, folded with
the step, so its tokens do not depend on batch size or composition. `sample`
is traceable: callers jit prefill + `sample` with the parameters as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.partitioning import ACT_BATCH, ACT_LENGTH, BATCH_MESH_AXES

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache, Array], tuple[Array, Cache]]

BOS_ID = 0  # decoder id 0 is pad and BOS; image token = code + 1
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How image tokens are drawn (bound in gin as `SamplingConfig.<field>`)."""

    temperature: float = 1.0  # softmax temperature; 0 = greedy argmax
    top_k: int | None = None  # keep only the k most likely tokens; None = all
    top_p: float | None = None  # nucleus: smallest set with mass >= top_p; None = 1
    guidance_scale: float | None = 1.2  # classifier-free guidance λ; None = off
    num_samples: int = 16  # images drawn per prompt (then reranked)
    seed: int = 0  # root of every sample's randomness

    def __post_init__(self):
        _check_filters(
            self.temperature, self.top_k, self.top_p, self.guidance_scale, where="SamplingConfig"
        )
        if int(self.num_samples) < 1:
            raise ValueError(f"SamplingConfig.num_samples must be >= 1, got {self.num_samples!r}")


class SampleOutput(NamedTuple):
    """What `sample` returns (a pytree)."""

    tokens: Array  # [B, num_steps] int32 decoder ids (code + 1), never 0
    # [B, num_steps] float32: log-probability of each chosen token under the model's
    # (guided, masked) distribution at temperature 1, before top-k/top-p filtering.
    token_log_probs: Array


def _concrete(value: Any) -> float | None:
    """The Python value of a number, or None when it is traced (a jit argument)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_filters(temperature, top_k, top_p, guidance_scale, *, where: str) -> None:
    t = _concrete(temperature)
    if temperature is None or (t is not None and (not np.isfinite(t) or t < 0)):
        raise ValueError(f"{where}.temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
    ):
        raise ValueError(f"{where}.top_k must be a positive Python integer or None, got {top_k!r}")
    p = _concrete(top_p)
    if p is not None and not (0.0 < p <= 1.0):
        raise ValueError(f"{where}.top_p must be in (0, 1] or None, got {top_p!r}")
    g = _concrete(guidance_scale)
    if g is not None and not np.isfinite(g):
        raise ValueError(
            f"{where}.guidance_scale must be a finite number or None, got {guidance_scale!r}"
        )


def sample_ids(
    num_prompts: int, num_samples: int, *, first_prompt_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt-major (prompt_ids, sample_indices): row `p * num_samples + s` is sample `s`
    of prompt `first_prompt_id + p`, the layout `parti_jax.rerank.rerank` expects."""
    prompt_ids = np.repeat(np.arange(num_prompts, dtype=np.int32) + first_prompt_id, num_samples)
    sample_indices = np.tile(np.arange(num_samples, dtype=np.int32), num_prompts)
    return prompt_ids, sample_indices


def valid_token_mask(vocab_size: int, num_valid_tokens: int | None) -> Array:
    """Bool [V]: the ids that may be sampled, 1 .. num_valid_tokens-1 (0 is pad/BOS; ids
    from `codebook_size + 1` pad the vocabulary); None keeps every id but 0."""
    num_valid_tokens = vocab_size if num_valid_tokens is None else num_valid_tokens
    if not 2 <= num_valid_tokens <= vocab_size:
        raise ValueError(
            f"num_valid_tokens={num_valid_tokens} must be in [2, vocab size {vocab_size}]; "
            f"pass codebook_size + 1 of the model the logits come from"
        )
    ids = jnp.arange(vocab_size)
    return (ids > BOS_ID) & (ids < num_valid_tokens)


def guide_logits(logits: Array, guidance_scale: float | Array) -> Array:
    """[2B, V] -> [B, V]: `uncond + λ (cond - uncond)` written as `λ cond + (1-λ) uncond`,
    which is exact at λ = 1 (= cond) and λ = 0 (= uncond) in floating point."""
    cond, uncond = jnp.split(logits, 2)
    scale = jnp.asarray(guidance_scale, jnp.float32)
    return scale * cond + (1.0 - scale) * uncond


def top_k_filter(logits: Array, top_k: int) -> Array:
    """Sets all but the `top_k` largest logits of each row to -inf (ties: lower id wins)."""
    if top_k >= logits.shape[-1]:
        return logits
    _, idx = jax.lax.top_k(logits, top_k)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, idx].set(True)
    return jnp.where(keep, logits, NEG_INF)


def top_p_filter(logits: Array, top_p: float | Array) -> Array:
    """Keeps the nucleus: a token stays when the mass of the tokens ranked above it is
    below `top_p` (so the most likely token always stays)."""
    if _concrete(top_p) is not None and _concrete(top_p) >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(mass_above < top_p)
    return jnp.where(keep, logits, NEG_INF)


def row_keys(seed: int | Array, prompt_ids: Array, sample_indices: Array) -> Array:
    """[B] keys: fold_in(fold_in(key(seed), prompt_id), sample_index) per row."""
    dtype = getattr(seed, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        key = seed
    elif isinstance(seed, (int, np.integer)) or (
        dtype is not None and jnp.issubdtype(dtype, jnp.integer) and np.ndim(seed) == 0
    ):
        key = jax.random.key(seed)
    else:
        raise ValueError(
            f"sample: seed must be an integer or a typed key (jax.random.key), got {seed!r}"
        )

    fold = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(key, p), s))
    return fold(jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(sample_indices, jnp.int32))


# ------------------------------------------------------------------ sampler


def _batch_spec_axes(mesh: jax.sharding.Mesh, rows: int):
    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if rows % shards:
        raise ValueError(
            f"sample: a batch of {rows} rows does not split over mesh axes {axes} "
            f"({shards} shards); make prompts x num_samples a multiple of {shards}"
        )
    return axes or None


def _row_constraint(mesh: jax.sharding.Mesh | None) -> Callable:
    """constrain(x, axis=0, names=None): x's rows (on `axis`) split over the mesh's batch
    axes, or without a mesh the logical `names` (default ACT_BATCH on `axis`)."""
    free = jax.sharding.PartitionSpec.UNCONSTRAINED

    def constrain(x: Array, axis: int = 0, names: tuple | None = None) -> Array:
        spec = [free] * x.ndim
        if mesh is None:
            spec[axis] = ACT_BATCH
            return nn.with_logical_constraint(x, names or tuple(spec))
        spec[axis] = _batch_spec_axes(mesh, x.shape[axis])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        return jax.lax.with_sharding_constraint(x, sharding)

    return constrain


def _check_cache_rows(cache: Cache, axis: int | None, rows: int, *, guided: bool) -> None:
    """Fails early, naming guidance, when no cache leaf has `rows` rows on `axis`."""
    if axis is None:
        return
    sizes = {x.shape[axis] for x in jax.tree.leaves(cache) if getattr(x, "ndim", 0) > axis}
    if sizes and rows not in sizes:
        layout = " (with guidance: conditional rows, then as many unconditional rows)"
        raise ValueError(
            f"sample: the cache holds {sorted(sizes)} rows on axis {axis} but {rows} are "
            f"needed{layout if guided else ''}; build the cache for {rows} rows "
            f"(guidance_scale={'set' if guided else 'None'}), or pass cache_batch_axis"
        )


def sample(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    *,
    num_steps: int,
    prompt_ids: Array,
    sample_indices: Array,
    seed: int | Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float | None = None,
    num_valid_tokens: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    cache_batch_axis: int | None = 1,
    segments: int = 1,
    resize_cache: Callable[[Cache, int], Cache] | None = None,
) -> SampleOutput:
    """Draws `num_steps` image tokens for each of B rows, starting from BOS (id 0).

    Args:
      tokens_to_logits: the model step (see the module docstring).
      cache: its preallocated cache for R rows: R = B, or 2B with guidance
        (conditional rows first, then the unconditional `[EOS]` rows).
      num_steps: grid height x width; the whole grid is always written.
      prompt_ids: int [B], a global id of each row's prompt (not its index in this batch).
      sample_indices: int [B], which of the prompt's samples the row is.
      seed: an int or a typed PRNG key; the root of all randomness.
      temperature: divides the logits; a Python 0 means greedy (argmax). May be
        a traced scalar (> 0) to avoid recompiling.
      top_k: keep the k most likely valid tokens (None: all); a Python int.
      top_p: keep the nucleus with mass >= top_p (None: all); may be traced.
      guidance_scale: λ of classifier-free guidance, `uncond + λ (cond - uncond)`
        (None: off, R = B); λ = 1 / 0 is exactly conditional / unconditional
        sampling with the same randomness. May be traced (a sweep compiles once).
      num_valid_tokens: codebook_size + 1: id 0 (pad/BOS) and ids >= this
        (vocabulary padding) are never drawn. None masks only id 0.
      mesh: shard rows over this mesh's batch axes ('data', 'fsdp' where present; the
        cache on `cache_batch_axis`); without one, rows carry the logical name
        ACT_BATCH (effective under `nn.logical_axis_rules`).
      cache_batch_axis: the axis of cache leaves that indexes rows (1 for a
        per-layer stacked cache [L, R, ...]; leaves without R rows there are left
        alone). None: do not constrain the cache.
      segments: run the grid as this many loops of static length (1: one loop).
        Before segment j, which ends at step e_j, `resize_cache(cache, e_j)`
        gives the cache that holds positions [0, e_j) only, so every step reads
        a static prefix of the cache instead of all `num_steps` positions (about
        half the self-attention reads over a grid with many segments), with no
        traced loop bounds (no device-host round trip per step).
      resize_cache: `(cache, length) -> cache` (the model's: zero-padded or cut
        self-attention positions); needed when segments > 1.

    Order of operations per step: guidance -> mask invalid ids -> temperature ->
    top-k -> top-p -> draw with the row's step key.
    """
    _check_filters(temperature, top_k, top_p, guidance_scale, where="sample")
    if int(num_steps) < 1:
        raise ValueError(f"sample: num_steps must be >= 1 (the grid size), got {num_steps!r}")
    if not 1 <= int(segments) <= int(num_steps):
        raise ValueError(f"sample: segments={segments!r} must be in [1, num_steps={num_steps}]")
    if segments > 1 and resize_cache is None:
        raise ValueError(f"sample: segments={segments} needs resize_cache (the model's)")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    sample_indices = jnp.asarray(sample_indices, jnp.int32)
    if prompt_ids.ndim != 1 or prompt_ids.shape != sample_indices.shape:
        raise ValueError(
            f"sample: prompt_ids {prompt_ids.shape} and sample_indices "
            f"{sample_indices.shape} must both be [B]"
        )
    batch = prompt_ids.shape[0]
    rows = batch if guidance_scale is None else 2 * batch
    if mesh is not None:
        _batch_spec_axes(mesh, batch)  # B itself must split (both halves with CFG)
    _check_cache_rows(cache, cache_batch_axis, rows, guided=guidance_scale is not None)
    constrain = _row_constraint(mesh)
    keys = constrain(row_keys(seed, prompt_ids, sample_indices))

    def constrain_cache(cache: Cache) -> Cache:
        def leaf(x):
            if getattr(x, "ndim", 0) > cache_batch_axis and x.shape[cache_batch_axis] == rows:
                return constrain(x, cache_batch_axis)
            return x

        return cache if cache_batch_axis is None else jax.tree.map(leaf, cache)

    def step_fn(carry, step):
        token, cache = carry
        logits, cache = tokens_to_logits(token[:, None], cache, step)
        if logits.ndim != 2 or logits.shape[0] != rows:
            raise ValueError(
                f"sample: tokens_to_logits returned logits of shape {logits.shape}, "
                f"expected [{rows}, vocab] ({batch} prompts"
                + (", x2 for guidance: conditional rows then unconditional" if rows > batch else "")
                + "); build the cache for that many rows"
            )
        logits = logits.astype(jnp.float32)
        if guidance_scale is not None:
            logits = guide_logits(logits, guidance_scale)
        logits = jnp.where(valid_token_mask(logits.shape[-1], num_valid_tokens), logits, NEG_INF)
        logits = constrain(logits)
        if _concrete(temperature) == 0.0:
            new = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            filtered = logits / temperature
            if top_k is not None:
                filtered = top_k_filter(filtered, int(top_k))
            if top_p is not None:
                filtered = top_p_filter(filtered, top_p)
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
            new = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
        new = constrain(new)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, new[:, None], axis=-1)[:, 0]
        fed = new if guidance_scale is None else jnp.concatenate([new, new])
        cache = constrain_cache(cache)
        return (constrain(fed), cache), (new, chosen)

    carry = (constrain(jnp.full((rows,), BOS_ID, jnp.int32)), constrain_cache(cache))
    drawn = []
    for start, end in segment_bounds(num_steps, segments):
        if segments > 1:
            carry = (carry[0], constrain_cache(resize_cache(carry[1], end)))
        carry, out = jax.lax.scan(step_fn, carry, jnp.arange(start, end, dtype=jnp.int32))
        drawn.append(out)
    tokens, log_probs = (jnp.concatenate(parts) for parts in zip(*drawn, strict=True))
    names = (ACT_BATCH, ACT_LENGTH)  # the logical names of [B, num_steps] (without a mesh)
    return SampleOutput(constrain(tokens.T, names=names), constrain(log_probs.T, names=names))


def segment_bounds(num_steps: int, segments: int) -> list[tuple[int, int]]:
    """`segments` near-equal static (start, end) step ranges covering [0, num_steps)."""
    ends = [(j + 1) * num_steps // segments for j in range(segments)]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def tokens_to_codes(tokens: np.ndarray | Array, codebook_size: int | None = None) -> np.ndarray:
    """Decoder ids [..., N] -> codebook indices (id - 1) on the host; an id 0 (pad/BOS)
    or above `codebook_size` (padding), which a correct sampler never emits, is an error."""
    tokens = np.asarray(tokens)
    bad = tokens < 1
    if codebook_size is not None:
        bad |= tokens > codebook_size
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"tokens_to_codes: token {int(tokens[where])} at index {where} is not an image "
            f"token (valid ids are 1..{codebook_size or 'K'}; 0 is pad/BOS); "
            f"sample with num_valid_tokens=codebook_size + 1"
        )
    return (tokens - 1).astype(np.int32)


# ------------------------------------------------------------------ performance


@dataclasses.dataclass(frozen=True)
class BandwidthFloor:
    """Bytes read from memory by one sampling run and the time that takes at full bandwidth."""

    weight_bytes: float  # decoder weights, once per step
    cross_attention_bytes: float  # cross-attention K/V of the prompt, once per step
    self_attention_bytes: float  # the filled prefix of the self-attention cache
    total_bytes: float
    seconds: float


def sampling_bandwidth_floor(
    *,
    decoder_params: int,
    num_layers: int,
    kv_width: int,
    text_length: int,
    num_steps: int,
    rows: int,
    memory_bandwidth: float,
    param_bytes: int = 2,
    cache_bytes: int = 2,
    self_attention_positions: float | None = None,
) -> BandwidthFloor:
    """Memory-bandwidth floor of one sampling run (docs/DESIGN.md section 6): per step t
    (0-based) the decoder reads its weights once, every layer's cross-attention K and V
    over the prompt and its self-attention K and V for the t + 1 filled positions;
    summed over the grid and divided by `memory_bandwidth`.

    Args:
      decoder_params: parameters the decoder reads per step (its layers, the
        final norm and the logits projection; a separate input embedding is
        only gathered, not read whole, so leave it out).
      num_layers: decoder layers.
      kv_width: heads x head width of one K (or V) vector.
      text_length: encoder positions the cross-attention reads.
      num_steps: image tokens per row (grid h x w).
      rows: rows of the batch (2 x prompts with guidance).
      memory_bandwidth: bytes per second of the device.
      param_bytes, cache_bytes: bytes per weight / per K or V element.
      self_attention_positions: cached positions the self-attention needs over
        the whole grid (None: the filled prefixes, N (N + 1) / 2; conv-shaped
        attention: the mask's count, `layers.conv_sparse_mask(...).sum()`).
    """
    counts = {  # the integer arguments
        k: v
        for k, v in locals().items()
        if k not in ("memory_bandwidth", "self_attention_positions")
    }
    needed = self_attention_positions
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise ValueError(
                f"sampling_bandwidth_floor: {name} must be a positive integer, got {value!r}"
            )
    if not memory_bandwidth > 0:
        raise ValueError(
            f"sampling_bandwidth_floor: memory_bandwidth must be > 0 bytes/s, got {memory_bandwidth!r}"
        )
    kv_per_position = num_layers * 2 * rows * kv_width * cache_bytes
    weight = float(num_steps) * decoder_params * param_bytes
    cross = float(num_steps) * kv_per_position * text_length
    if needed is not None and not 0 < needed <= num_steps * (num_steps + 1) / 2:
        raise ValueError(
            f"sampling_bandwidth_floor: self_attention_positions={needed!r} must be in "
            f"(0, {num_steps} x {num_steps + 1} / 2]"
        )
    filled_positions = num_steps * (num_steps + 1) / 2  # sum over t of (t + 1)
    self_attn = float(kv_per_position) * (filled_positions if needed is None else needed)
    total = weight + cross + self_attn
    return BandwidthFloor(weight, cross, self_attn, total, total / memory_bandwidth)
