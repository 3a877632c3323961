"""Registers library functions and config dataclasses with gin.

This is the only place (with the subcommand modules) where gin meets library
code: library modules never import gin. Names registered here are what gin
files bind, e.g. `ModelConfig.d_model = 1024` or `train.num_steps = 1000`.

Each area owns one `_register_<area>` function below. Imports happen inside
them, and none may import TensorFlow at module level.
"""

from __future__ import annotations

import gin

_REGISTERED = False


def _external(obj, name: str, module: str | None = None) -> None:
    gin.external_configurable(obj, name=name, module=module)


def _register_models() -> None:
    """Encoder-decoder config and sizes (parti_jax.models)."""


def _register_partitioning() -> None:
    """Mesh and logical-axis rules (parti_jax.partitioning)."""


def _register_train() -> None:
    """Trainer, optimizer and schedules (parti_jax.train)."""


def _register_data() -> None:
    """Input pipeline configuration (parti_jax.data)."""


def _register_vqgan() -> None:
    """ViT-VQGAN model, losses and training (parti_jax.vqgan)."""


def _register_upsampler() -> None:
    """Upsampler model and training (parti_jax.upsampler)."""


def _register_sampling() -> None:
    """Decoding and sampling (parti_jax.decoding)."""


def _register_eval() -> None:
    """Eval suites (parti_jax.eval)."""


def _register_launch_export() -> None:
    """Launch targets and export (parti_jax.launch, parti_jax.export)."""


def register_all() -> None:
    """Registers every configurable once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    for fn in (
        _register_models,
        _register_partitioning,
        _register_train,
        _register_data,
        _register_vqgan,
        _register_upsampler,
        _register_sampling,
        _register_eval,
        _register_launch_export,
    ):
        fn()
    _REGISTERED = True
