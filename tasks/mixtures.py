"""Mixtures: `register_mixture(name, [(task, rate), ...])`.

Rates are relative sampling weights (normalised by seqio). Tasks in a mixture
must share output features and vocabularies: all pixel tasks, or codes tasks
of one codebook.
"""

from __future__ import annotations

from collections.abc import Sequence

import seqio


def register_mixture(name: str, tasks: Sequence[tuple[str, float]]) -> seqio.Mixture:
    """Registers (or replaces) mixture `name`; every task must already be registered."""
    if not tasks:
        raise ValueError(f"mixture {name!r}: no tasks")
    for task_name, rate in tasks:
        if task_name not in seqio.TaskRegistry.names() and (
            task_name not in seqio.MixtureRegistry.names()
        ):
            raise ValueError(f"mixture {name!r}: task {task_name!r} is not registered")
        if not rate > 0:
            raise ValueError(f"mixture {name!r}: rate of {task_name!r} must be > 0, got {rate}")
    seqio.MixtureRegistry.remove(name)  # replaces a mixture of the same name
    return seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks])
