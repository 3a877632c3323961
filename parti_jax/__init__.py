"""parti_jax: Parti text-to-image in JAX/Flax, from a laptop CPU to a pod.

`import parti_jax` stays light (no jax import); `parti_jax.load_bundle(path)`
loads an inference bundle written by `parti-jax export` (parti_jax/bundle.py).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_bundle"]


def __getattr__(name: str) -> Any:
    if name == "load_bundle":
        from parti_jax.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'parti_jax' has no attribute {name!r}")
