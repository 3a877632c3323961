"""parti_jax: Parti text-to-image in JAX/Flax, from a laptop CPU to a pod.

`import parti_jax` stays light (no jax import); `parti_jax.load_bundle(path)`
loads an inference bundle written by `parti-jax export` (parti_jax/bundle.py) and
`parti_jax.Pipeline.from_pretrained(path)` wraps a bundle or work directories as a
diffusers-style pipeline (parti_jax/pipeline.py, docs/PYTHON.md).
"""

from __future__ import annotations

import os
from typing import Any

# The storage layer's client choice (parti_jax/storage.py), made before any module can ask
# etils.epath for a backend: gs:// goes through fsspec/gcsfs, never TensorFlow's GCS client
# (which no emulator reaches); gcsfs's zonal-bucket probe (60 s of gRPC against anything but
# real GCS) is off: set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true for zonal buckets.
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__", "load_bundle"]


def __getattr__(name: str) -> Any:
    if name == "load_bundle":
        from parti_jax.bundle import load_bundle

        return load_bundle
    if name == "Pipeline":
        from parti_jax.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'parti_jax' has no attribute {name!r}")
