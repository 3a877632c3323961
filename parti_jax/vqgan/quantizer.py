"""Factorized, l2-normalised vector quantizer of ViT-VQGAN (arXiv 2110.04627, §3.2).

The encoder output is projected to a small lookup space (code_dim, 32 in the
paper) where the latent and every code are l2-normalised, so the nearest code
is the one with the highest cosine similarity; the chosen code is projected
up to the decoder width. The straight-through estimator passes the decoder's
gradient to the encoder unchanged; the codebook learns only from the VQ loss

    vq = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2   (on the normalised vectors).

Also here: `codebook_hash` (the compatibility fingerprint in vqgan_meta.json
and codes_meta.json) and `reinit_dead_codes`, which restarts unused codes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from parti_jax.models.layers import DenseGeneral
from parti_jax.partitioning import CODE_DIM, CODEBOOK, EMBED

Array = jax.Array


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
    """x / ||x||, safe at zero (the gradient stays finite)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps * eps)


class FactorizedQuantizer(nn.Module):
    """Projects to code_dim, looks up the nearest of `codebook_size` l2-normalised codes,
    projects to out_dim (the decoder width).

    `beta` weights the commitment term of the VQ loss; `dtype` / `param_dtype`
    are those of the two projections.
    """

    codebook_size: int
    code_dim: int
    out_dim: int
    beta: float = 0.25
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Product quantization (VQGANConfig.code_group_sizes): the lookup vector is G equal
    # slices, each normalised and matched against its own rows of the codebook parameter
    # ([sum(sizes), code_dim / G], group g's rows after the earlier groups'); a code is
    # the slices' row indices as digits, most significant first. (): one codebook.
    group_sizes: tuple[int, ...] = ()

    def setup(self) -> None:
        kw = dict(
            use_bias=True, kernel_init="xavier", dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.in_proj = DenseGeneral((self.code_dim,), (EMBED, CODE_DIM), **kw)
        self.out_proj = DenseGeneral((self.out_dim,), (CODE_DIM, EMBED), **kw)
        # Rows have norm ~1 at init; they are normalised at every lookup anyway.
        self.codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.code_dim**-0.5), (CODEBOOK, CODE_DIM)
            ),
            self._table_shape(),
            self.param_dtype,
        )

    @property
    def groups(self) -> int:
        return max(1, len(self.group_sizes))

    def _table_shape(self) -> tuple[int, int]:
        if self.groups == 1:
            return (self.codebook_size, self.code_dim)
        return (sum(self.group_sizes), self.code_dim // self.groups)

    def _split(self, x: Array) -> Array:
        """[..., code_dim] -> [..., G, code_dim / G]."""
        return x.reshape(*x.shape[:-1], self.groups, self.code_dim // self.groups)

    def _offsets(self) -> list[int]:
        return [sum(self.group_sizes[:g]) for g in range(self.groups)]

    def project(self, z: Array) -> Array:
        """Encoder output [..., D_enc] -> normalised lookup-space latents [..., code_dim]
        (f32; with groups, each slice normalised on its own)."""
        x = self.in_proj(z)
        if self.groups == 1:
            return l2_normalize(x)
        return l2_normalize(self._split(x)).reshape(x.shape)

    def project_views(self, features: list[Array]) -> Array:
        """Product codes whose groups read different views of the image: group g's
        slice comes from `features[g]` (the encoder's output on view g), normalised."""
        if len(features) != self.groups:
            raise ValueError(f"project_views: {len(features)} views for {self.groups} groups")
        slices = [self._split(self.in_proj(f))[..., g, :] for g, f in enumerate(features)]
        return l2_normalize(jnp.stack(slices, axis=-2)).reshape(*slices[0].shape[:-1], -1)

    def lookup(self, latents: Array) -> Array:
        """Normalised latents [..., code_dim] -> nearest code indices [...] (int32)."""
        codebook = l2_normalize(jnp.asarray(self.codebook, jnp.float32))
        if self.groups == 1:
            # For unit vectors, argmin ||z - e||^2 = argmax <z, e>.
            sim = jnp.einsum("...d,kd->...k", latents, codebook)
            return jnp.argmax(sim, axis=-1).astype(jnp.int32)
        from parti_jax.models.config import digit_weights

        slices = self._split(latents)
        code = jnp.zeros(latents.shape[:-1], jnp.int32)
        weights = digit_weights(self.group_sizes)
        for g, (size, start) in enumerate(zip(self.group_sizes, self._offsets(), strict=True)):
            sim = jnp.einsum("...d,kd->...k", slices[..., g, :], codebook[start : start + size])
            code = code + jnp.argmax(sim, axis=-1).astype(jnp.int32) * weights[g]
        return code

    def vectors(self, codes: Array) -> Array:
        """Code indices [...] -> their normalised lookup-space vectors [..., code_dim]."""
        codebook = l2_normalize(jnp.asarray(self.codebook, jnp.float32))
        if self.groups == 1:
            return jnp.take(codebook, codes, axis=0)
        from parti_jax.models.config import digit_weights

        rows = [
            (codes // w) % size + start
            for w, size, start in zip(
                digit_weights(self.group_sizes), self.group_sizes, self._offsets(), strict=True
            )
        ]
        return jnp.concatenate([jnp.take(codebook, r, axis=0) for r in rows], axis=-1)

    def embed_codes(self, codes: Array) -> Array:
        """Code indices [...] -> decoder-width vectors [..., out_dim] (no gradient tricks)."""
        return self.out_proj(self.vectors(codes))

    def __call__(self, z: Array) -> tuple[Array, dict[str, Array]]:
        """Quantizes encoder outputs z [B, N, D_enc].

        Returns:
          (quantized [B, N, out_dim], aux) with aux keys: `codes` int32 [B, N];
          `latents` f32 [B, N, code_dim] (normalised, for dead-code restarts);
          `vq_loss` = codebook_loss + beta * commitment_loss (scalars, mean squared
          difference over tokens and code_dim); `code_counts`
          f32 [K] (tokens per code in this batch); `perplexity` (exp of the
          entropy of the batch's code distribution); `usage` (fraction of the
          codebook used in the batch).
        """
        return self.quantize(self.project(z))

    def quantize(self, latents: Array) -> tuple[Array, dict[str, Array]]:
        """`__call__` from lookup-space latents [B, N, code_dim] (`project` or
        `project_views`)."""
        codes = self.lookup(latents)
        quantized = self.vectors(codes)
        # Means over tokens and code_dim (the VQ-VAE / taming convention): a sum over
        # code_dim would make the commitment pull code_dim times stronger than the
        # pixel-mean reconstruction loss and collapse the encoder onto few codes.
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(latents) - quantized))
        commitment_loss = jnp.mean(jnp.square(latents - jax.lax.stop_gradient(quantized)))
        # Straight-through: forward value is the code, gradient goes to the latent.
        straight = latents + jax.lax.stop_gradient(quantized - latents)
        out = self.out_proj(straight)
        counts = jnp.zeros((self.codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
        probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-12)), 0.0))
        aux = {
            "codes": codes,
            "latents": latents,
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "code_counts": counts,
            "perplexity": jnp.exp(entropy),
            "usage": jnp.mean((counts > 0).astype(jnp.float32)),
        }
        return out, aux


def reinit_dead_codes(
    codebook: Array,
    usage_counts: Array,
    recent_latents: Array,
    rng: Array,
    threshold: float = 1.0,
    weighted: bool = True,
) -> tuple[Array, Array]:
    """Restarts codes used fewer than `threshold` times with random recent encoder outputs.

    A code the encoder never picks gets no gradient (the VQ loss only pulls
    chosen codes), so it stays dead forever; moving it onto a latent the encoder
    actually produces brings it back. Pure and jittable: the trainer keeps
    `usage_counts` over a window of steps and a buffer of recent latents.

    Args:
      codebook: [K, code_dim] raw codebook parameter.
      usage_counts: [K] how often each code was chosen in the window.
      recent_latents: [M, code_dim] lookup-space latents (`aux['latents']`
        flattened); any leading shape is flattened.
      rng: PRNG key choosing which latents replace the dead codes.
      threshold: codes with usage_counts < threshold are dead.
      weighted: draw replacements with probability proportional to their
        squared distance from the nearest live code (k-means++ seeding), so
        restarts go where the codebook is thin; False draws uniformly.

    Returns:
      (new_codebook [K, code_dim] in codebook's dtype, dead mask bool [K]).
    """
    codebook = jnp.asarray(codebook)
    k, d = codebook.shape
    if usage_counts.shape != (k,):
        raise ValueError(
            f"reinit_dead_codes: usage_counts has shape {usage_counts.shape}, codebook has "
            f"{k} codes; pass one count per code"
        )
    latents = jnp.reshape(recent_latents, (-1, recent_latents.shape[-1]))
    if latents.shape[-1] != d or latents.shape[0] == 0:
        raise ValueError(
            f"reinit_dead_codes: recent_latents has shape {recent_latents.shape}, expected "
            f"[..., {d}] with at least one latent (use aux['latents'], not encoder outputs)"
        )
    dead = usage_counts < threshold
    latents = l2_normalize(latents)
    if weighted:
        # k-means++ style: prefer latents that the live codes represent badly,
        # so restarted codes do not all land on the (frequent) easy patches.
        live = l2_normalize(jnp.asarray(codebook, jnp.float32))
        sim = jnp.where(dead[None, :], -jnp.inf, latents @ live.T)
        best = jnp.max(sim, axis=-1)
        dist = jnp.where(jnp.isfinite(best), jnp.maximum(2.0 - 2.0 * best, 0.0), 1.0) + 1e-6
        # Inverse-CDF draws (K uniforms), not jax.random.categorical, which
        # draws a Gumbel per (code, latent) pair: K x M numbers per call.
        cdf = jnp.cumsum(dist)
        u = jax.random.uniform(rng, (k,), jnp.float32) * cdf[-1]
        picks = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), latents.shape[0] - 1)
    else:
        picks = jax.random.randint(rng, (k,), 0, latents.shape[0])
    replacement = latents[picks].astype(codebook.dtype)
    return jnp.where(dead[:, None], replacement, codebook), dead


def codebook_hash(params_or_codebook: Any) -> str:
    """First 16 hex digits of sha256 over the codebook as float32 little-endian bytes.

    Accepts the codebook array itself or any params tree (boxed or not)
    holding a leaf named `codebook` (e.g. the ViTVQGAN variables).
    """
    codebook = params_or_codebook
    if isinstance(codebook, Mapping):
        flat = traverse_util.flatten_dict(unfreeze(codebook))
        found = [leaf for path, leaf in flat.items() if path[-1] == "codebook"]
        if not found:
            raise ValueError(
                "codebook_hash: no 'codebook' entry in the given params tree; pass the "
                "ViTVQGAN variables or the codebook array"
            )
        codebook = found[0]
    array = np.ascontiguousarray(np.asarray(jax.device_get(nn.meta.unbox(codebook)), dtype="<f4"))
    if array.ndim != 2:
        raise ValueError(f"codebook_hash: codebook must be [K, code_dim], got {array.shape}")
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]
