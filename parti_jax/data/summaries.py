"""TensorBoard summaries through clu (TensorFlow), for the trainers' MetricWriter.

Here because parti_jax.data is the only package that imports TensorFlow;
`parti_jax.train.metrics` calls it only when TensorFlow is already loaded or
TensorBoard was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tensorboard_writer(logdir: str | Path) -> Any:
    """An asynchronous clu metric writer into `logdir`; TensorFlow is kept off the GPUs."""
    import tensorflow as tf
    from clu import metric_writers

    # The trainer owns the accelerators; TensorFlow must not claim them.
    tf.config.set_visible_devices([], "GPU")
    return metric_writers.create_default_writer(str(logdir), asynchronous=True)
