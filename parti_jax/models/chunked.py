"""Per-token sums computed a chunk of positions at a time: the training loss
(`parti_jax.train.t2i`) and the rerankers' likelihood (`parti_jax.sampling.token_scores`)
both reduce [B, N, V] logits this way without ever holding all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def check_loss_chunk_size(
    loss_chunk_size: int | None, num_image_tokens: int, name: str = "loss_chunk_size"
) -> None:
    """Fails naming `name` unless the chunk size is None or a positive divisor of the tokens."""
    if loss_chunk_size is None:
        return
    if (
        not isinstance(loss_chunk_size, int)
        or loss_chunk_size < 1
        or num_image_tokens % loss_chunk_size
    ):
        raise ValueError(
            f"{name}={loss_chunk_size!r} must be None or a positive divisor of the "
            f"{num_image_tokens} image tokens"
        )


def chunked_token_sums(
    hidden: jax.Array,
    project: Callable[[jax.Array], jax.Array],
    per_token: tuple[jax.Array, ...],
    sums: Callable[..., PyTree],
    chunk_size: int,
    name: str = "loss_chunk_size",
) -> PyTree:
    """`sums(project(h), *xs)` over `chunk_size` image tokens at a time, added up.

    hidden [B, N, D]; `project(h [B, n, D]) -> logits [B, n, V]`; `per_token`
    arrays [B, N, ...] are cut like `hidden`; `sums` reduces a chunk's logits to
    a pytree (scalars for the loss, [B] for per-row scores). Each chunk runs
    under `jax.checkpoint` inside a scan, so forward and backward hold one
    chunk's logits (and their gradient), never all [B, N, V]. The training loss
    and the rerankers' likelihood (`sampling.token_scores`) both use it.
    """
    batch, length = hidden.shape[:2]
    check_loss_chunk_size(chunk_size, length, name)
    num_chunks = length // chunk_size

    def chunks(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sums(h: jax.Array, *xs: jax.Array) -> PyTree:
        return sums(project(h), *xs)

    def body(totals, xs):
        return jax.tree.map(jnp.add, totals, chunk_sums(*xs)), None

    xs = (chunks(hidden), *map(chunks, per_token))
    shapes = jax.eval_shape(chunk_sums, *(x[0] for x in xs))
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals, _ = jax.lax.scan(body, totals, xs)
    return totals
