"""Input-pipeline throughput: examples/s of the codes pipeline on this host's CPU.

Used by `parti-jax benchmark` (docs/DESIGN.md §6 "input pipeline: examples/s
from precomputed-code shards on the CPU"). Timed after warm-up batches, with
the batches materialised as numpy (what the trainer receives).
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import seqio
import tensorflow as tf

from parti_jax.data import pipeline


def benchmark_input(
    task: str | seqio.Task | seqio.Mixture,
    split: str = "train",
    batch_size: int = 256,
    num_batches: int = 50,
    *,
    warmup_batches: int = 5,
    **pipeline_kwargs,
) -> dict:
    """Measures the codes pipeline (`make_codes_iterator`, shuffled and repeated as in
    training; `pipeline_kwargs` go to it) after warm-up; returns a JSON-ready dict."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    iterator = pipeline.make_codes_iterator(
        task, batch_size=batch_size, split=split, shuffle=True, repeat=True, **pipeline_kwargs
    )
    for _ in range(warmup_batches):
        next(iterator)
    times = []
    tokens = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        t0 = time.perf_counter()
        batch = next(iterator)
        times.append(time.perf_counter() - t0)
        tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
        tokens += int(batch["decoder_target_tokens"].size)
    seconds = time.perf_counter() - start
    name = task if isinstance(task, str) else task.name
    return {
        "benchmark": "input_pipeline",
        "task": name,
        "split": split,
        "batch_size": int(batch_size),
        "num_batches": int(num_batches),
        "seconds": float(seconds),
        "examples_per_s": float(batch_size * num_batches / seconds),
        "batches_per_s": float(num_batches / seconds),
        "batch_seconds_median": float(np.median(times)),
        "batch_seconds_p90": float(np.percentile(times, 90)),
        "tokens_per_s": float(tokens / seconds),
        "text_truncated": int(iterator.stats["text_truncated"]),
        "host": platform.node(),
        "cpu_count": int(os.cpu_count() or 0),
        "tensorflow": tf.__version__,
        "seqio": getattr(seqio, "__version__", "unknown"),
    }
