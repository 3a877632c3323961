"""Learning-rate schedules: pure functions of the optimizer step.

`step` counts optimizer updates already applied (0 for the first update), the
same count optax keeps, so the learning rate of update `t` is `schedule(t)`.
Both schedules work on Python ints (for logging and tests) and on traced jax
integers (inside the jitted step).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray | int], jnp.ndarray]


def parti_schedule(
    peak_learning_rate: float = 4.5e-5,
    *,
    warmup_steps: int = 5_000,
    decay_start_step: int = 85_000,
    decay_end_step: int = 450_000,
    final_ratio: float = 0.025,
) -> Schedule:
    """The Parti paper's schedule: linear warm-up, constant, then exponential decay.

    lr(t) = peak * t / warmup                          for t < warmup
          = peak                                       for warmup <= t < decay_start
          = peak * final_ratio ** ((t - start) / (end - start))   up to decay_end
          = peak * final_ratio                         after decay_end.
    """
    if decay_end_step <= decay_start_step:
        raise ValueError(
            f"decay_end_step ({decay_end_step}) must be after decay_start_step ({decay_start_step})"
        )
    if not 0.0 < final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in (0, 1], got {final_ratio}")
    if warmup_steps > decay_start_step:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed decay_start_step ({decay_start_step})"
        )

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, t / warmup_steps) if warmup_steps > 0 else 1.0
        frac = jnp.clip((t - decay_start_step) / (decay_end_step - decay_start_step), 0.0, 1.0)
        decay = jnp.power(jnp.float32(final_ratio), frac)
        return peak_learning_rate * warm * decay

    return schedule


def warmup_cosine_schedule(
    peak_learning_rate: float,
    *,
    warmup_steps: int,
    total_steps: int,
    final_ratio: float = 0.0,
) -> Schedule:
    """Linear warm-up to `peak_learning_rate`, then a cosine to `peak * final_ratio`.

    Used by the VQGAN and upsampler trainers (Adam). After `total_steps` the
    rate stays at the final value.
    """
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must be larger than warmup_steps ({warmup_steps})"
        )

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, t / warmup_steps) if warmup_steps > 0 else 1.0
        frac = jnp.clip((t - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        ratio = final_ratio + (1.0 - final_ratio) * cosine
        return peak_learning_rate * warm * ratio

    return schedule


def constant_schedule(learning_rate: float, *, warmup_steps: int = 0) -> Schedule:
    """A constant rate after an optional linear warm-up."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, t / warmup_steps) if warmup_steps > 0 else 1.0
        return learning_rate * warm * jnp.ones((), jnp.float32)

    return schedule
