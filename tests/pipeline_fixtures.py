"""Tiny trained checkpoints of the whole pipeline, built once per test session.

    paths = build_tiny_pipeline(root)      # also works outside pytest
    paths["vqgan"]      train-vqgan work directory (16x16 images -> 4x4 grid, 64 codes)
    paths["codes"]      codes folder (codes_meta.json + one TFRecord shard)
    paths["t2i"]        train work directory (models/tiny.gin sizes, trained on those codes)
    paths["upsampler"]  train-upsampler work directory (16 -> 64, trained on VQGAN reconstructions)
    paths["vocab"]      the SentencePiece model the encoder-decoder was trained with

In a test module:

    pytest_plugins = ["tests.pipeline_fixtures"]

    def test_something(tiny_pipeline):     # session scoped: built once, shared
        Generator.load(tiny_pipeline["t2i"], tiny_pipeline["vqgan"], tiny_pipeline["upsampler"])

Everything is made by the library functions themselves (train_vqgan,
ImageTokenizer, the codes writer, t2i.train on the registered codes task,
train_upsampler), in process, on the shapes world; the sizes are those of
gin/vqgan/tiny.gin, gin/models/tiny.gin and gin/upsampler/tiny.gin. Training
is a handful of steps: the checkpoints are real (formats, metas, hashes) but
the models are barely trained. Building takes about a minute on a loaded
2-core machine (mostly compiling); the compile cache makes reruns faster.
Tests must treat the returned folders as read-only (copy before editing).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

# Sizes (the gin files named in the module docstring).
TINY_VQGAN = dict(
    image_size=16,
    patch_size=4,
    encoder_width=32,
    encoder_depth=1,
    encoder_heads=2,
    encoder_mlp_dim=64,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
    decoder_mlp_dim=64,
    codebook_size=64,
    code_dim=8,
    decoder_tanh_ffn="before",
    dtype="float32",
)
TINY_MODEL = dict(
    text_vocab_size=256,
    codebook_size=64,
    image_grid=(4, 4),
    max_text_length=16,
    num_encoder_layers=1,
    num_decoder_layers=1,
    d_model=32,
    mlp_dim=64,
    num_heads=2,
    dtype="float32",
    dropout_rate=0.0,
)
TINY_UPSAMPLER = dict(scale=4, input_size=16, num_blocks=1, channels=8, expansion=2)
TINY_CONTRASTIVE = dict(
    image_size=16, patch_size=4, image_width=64, image_depth=1, image_heads=2,
    image_mlp_dim=128, embed_dim=64,
)  # fmt: skip
TEXT_LENGTH = 16
CONTRASTIVE_STEPS = 300
NUM_CODE_EXAMPLES = 48
BATCH = 8
VQGAN_STEPS = 6
T2I_STEPS = 12
UPSAMPLER_STEPS = 4


class ShapesAtSize:
    """Shapes-world images drawn at 32px (the world's minimum) and area-downsampled to `size`.

    A `data_factory` for train_vqgan: {'image': float32 [B, size, size, 3]}.
    """

    def __init__(self, *, size: int, batch_size: int, shard_index=0, num_shards=1, seed=0,
                 split="train"):  # fmt: skip
        from parti_jax.train.synthetic import ShapesPixelsIterator

        self.size = size
        self.inner = ShapesPixelsIterator(
            batch_size=batch_size,
            image_size=32,
            split=split,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=seed,
        )
        self.save, self.restore = self.inner.save, self.inner.restore

    def __iter__(self):
        return self

    def __next__(self):
        from parti_jax.upsampler.data import area_downsample

        images = next(self.inner)["image"]
        return {"image": area_downsample(images, 32 // self.size)}


def shapes_examples(num: int, size: int, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """(float32 [num, size, size, 3] images, captions) of shapes examples 0..num-1."""
    from parti_jax.data import shapes
    from parti_jax.upsampler.data import area_downsample

    world = shapes.ShapesWorldConfig(resolution=32)
    examples = [shapes.generate_example(i, split, 0, world) for i in range(num)]
    images = np.stack([e.image for e in examples]).astype(np.float32) / 255.0
    return area_downsample(images, 32 // size), [e.caption for e in examples]


def _loop(num_steps: int):
    """Log and checkpoint once, at the end; no TensorBoard files."""
    from parti_jax.train.loop import LoopConfig

    return LoopConfig(
        num_steps=num_steps,
        log_every=num_steps,
        checkpoint_every=num_steps,
        async_checkpoints=False,
        tensorboard=False,
    )


def _mesh_config():
    from parti_jax.partitioning import MeshConfig

    return MeshConfig(data=-1, fsdp=1, tensor=1, rules="data_parallel")


def build_vqgan(workdir: Path) -> Path:
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.vqgan.config import VQGANConfig
    from parti_jax.vqgan.losses import LossConfig
    from parti_jax.vqgan.train import train_vqgan

    train_vqgan(
        workdir=str(workdir),
        vqgan_config=VQGANConfig(**TINY_VQGAN),
        batch_size=BATCH,
        loop=_loop(VQGAN_STEPS),
        loss_config=LossConfig(perceptual_weight=0.0, adversarial_weight=0.0),
        mesh_config=_mesh_config(),
        generator_optimizer=OptimizerConfig.adamw_defaults(learning_rate=3e-4, warmup_steps=1),
        data_factory=lambda **kw: ShapesAtSize(size=TINY_VQGAN["image_size"], **kw),
    )
    return workdir


def build_codes(codes_dir: Path, vqgan_dir: Path) -> Path:
    """Encodes shapes examples with the VQGAN into one shard + codes_meta.json (TensorFlow)."""
    from parti_jax.data import codes as codes_lib
    from parti_jax.vqgan.tokenizer import ImageTokenizer

    tokenizer = ImageTokenizer.load(vqgan_dir)
    images, captions = shapes_examples(NUM_CODE_EXAMPLES, TINY_VQGAN["image_size"])
    codes = tokenizer.encode(images)
    meta = tokenizer.meta
    with codes_lib.CodesShardWriter(
        str(codes_dir), "shard-000-00000.tfrecord", codebook_size=meta["codebook_size"],
        grid=meta["grid"],
    ) as writer:  # fmt: skip
        for i, (caption, c) in enumerate(zip(captions, codes)):
            writer.write(f"train-{i}", caption, c.reshape(-1))
    codes_lib.finalize_codes_meta(
        str(codes_dir),
        codebook_size=meta["codebook_size"],
        grid=meta["grid"],
        codebook_hash=meta["codebook_hash"],
        image_size=meta["image_size"],
        vqgan_checkpoint=str(meta["checkpoint"]),
        vqgan_step=int(meta["step"]),
        source_task="shapes_pixels",
        split="train",
    )
    return codes_dir


def build_t2i(workdir: Path, codes_dir: Path, codebook_hash: str) -> Path:
    """Trains the tiny encoder-decoder a few steps on the codes task (TensorFlow input)."""
    import parti_jax.tasks
    from parti_jax.models.config import ModelConfig
    from parti_jax.train import t2i
    from parti_jax.train.optimizers import OptimizerConfig

    name = "tiny_fixture_" + hashlib.sha256(str(codes_dir).encode()).hexdigest()[:8]
    task = parti_jax.tasks.register_codes_task(name, str(codes_dir), shuffle_buffer_size=64)
    t2i.train(
        workdir=str(workdir),
        model_config=ModelConfig(**TINY_MODEL),
        batch_size=BATCH,
        loop=_loop(T2I_STEPS),
        mesh_config=_mesh_config(),
        optimizer_config=OptimizerConfig(
            learning_rate=1e-2, warmup_steps=2, min_dim_size_to_factor=16
        ),
        task=task,
        text_length=TEXT_LENGTH,
        conditioning_dropout_rate=0.1,
        codebook_hash=codebook_hash,
    )
    return workdir


def build_upsampler(workdir: Path, vqgan_dir: Path) -> Path:
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.upsampler.config import UpsamplerConfig
    from parti_jax.upsampler.train import train_upsampler
    from parti_jax.vqgan.losses import LossConfig

    train_upsampler(
        workdir=str(workdir),
        upsampler_config=UpsamplerConfig(**TINY_UPSAMPLER),
        batch_size=BATCH,
        loop=_loop(UPSAMPLER_STEPS),
        loss_config=LossConfig(perceptual_weight=0.0, adversarial_weight=0.0),
        vqgan_path=str(vqgan_dir),
        clean_fraction=0.25,
        mesh_config=_mesh_config(),
        generator_optimizer=OptimizerConfig.adamw_defaults(learning_rate=1e-3, warmup_steps=1),
    )
    return workdir


def build_contrastive(workdir: Path) -> Path:
    """The tiny dual encoder: its text tower is TINY_MODEL's encoder (a warm start fits),
    trained on 16px shapes-world scenes with 2 hard negatives each."""
    from parti_jax.contrastive.model import ContrastiveConfig
    from parti_jax.contrastive.train import train_contrastive
    from parti_jax.models.config import ModelConfig
    from parti_jax.train.optimizers import OptimizerConfig

    config = ContrastiveConfig(text=ModelConfig(**TINY_MODEL), **TINY_CONTRASTIVE)
    train_contrastive(
        workdir=str(workdir),
        config=config,
        batch_size=32,
        loop=_loop(CONTRASTIVE_STEPS),
        optimizer_config=OptimizerConfig.adamw_defaults(
            learning_rate=2e-3, warmup_steps=10, decay_end_step=CONTRASTIVE_STEPS
        ),
        text_length=TEXT_LENGTH,
        hard_negatives=2,
        mesh_config=_mesh_config(),
    )
    return workdir


def build_tiny_pipeline(root: str | os.PathLike, *, verbose: bool = False) -> dict[str, str]:
    """Builds (or reuses, when `root` already holds them) the four tiny work directories.

    Returns {'vqgan', 'codes', 't2i', 'upsampler', 'contrastive', 'vocab', 'root'} as
    strings.
    """
    from parti_jax.data.vocab import default_vocab_path
    from parti_jax.vqgan.tokenizer import load_vqgan_meta

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {k: root / k for k in ("vqgan", "codes", "t2i", "upsampler", "contrastive")}
    timings = {}

    def stage(name, done: bool, fn) -> None:
        start = time.perf_counter()
        if not done:
            fn()
        timings[name] = time.perf_counter() - start

    stage("vqgan", (paths["vqgan"] / "checkpoints" / str(VQGAN_STEPS)).exists(),
          lambda: build_vqgan(paths["vqgan"]))  # fmt: skip
    stage("codes", (paths["codes"] / "codes_meta.json").exists(),
          lambda: build_codes(paths["codes"], paths["vqgan"]))  # fmt: skip
    codebook_hash = load_vqgan_meta(paths["vqgan"])["codebook_hash"]
    stage("t2i", (paths["t2i"] / "checkpoints" / str(T2I_STEPS)).exists(),
          lambda: build_t2i(paths["t2i"], paths["codes"], codebook_hash))  # fmt: skip
    stage("upsampler", (paths["upsampler"] / "checkpoints" / str(UPSAMPLER_STEPS)).exists(),
          lambda: build_upsampler(paths["upsampler"], paths["vqgan"]))  # fmt: skip
    stage("contrastive",
          (paths["contrastive"] / "checkpoints" / str(CONTRASTIVE_STEPS)).exists(),
          lambda: build_contrastive(paths["contrastive"]))  # fmt: skip
    if verbose:
        print("build_tiny_pipeline:", {k: round(v, 1) for k, v in timings.items()})
    out = {k: str(v) for k, v in paths.items()}
    out.update(vocab=default_vocab_path(), root=str(root))
    return out


def export_tiny_bundle(paths: dict[str, str], out: str | os.PathLike, sampling_config) -> Path:
    """`export_bundle` of the whole tiny pipeline (all four models, no jax.export artefact)
    into `out`, with `sampling_config` as the bundle's default."""
    from parti_jax.export import export_bundle

    export_bundle(out, t2i_path=paths["t2i"], vqgan_path=paths["vqgan"],
                  upsampler_path=paths["upsampler"], contrastive_path=paths["contrastive"],
                  sampling_config=sampling_config, jax_export=False)  # fmt: skip
    return Path(out)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> dict[str, str]:
    """Paths of the tiny trained pipeline (see build_tiny_pipeline); read-only, shared.

    Set PARTI_JAX_TINY_PIPELINE=<folder> to build it there once and reuse it
    across sessions (local iteration; delete the folder after changing a
    format or a trainer).
    """
    root = os.environ.get("PARTI_JAX_TINY_PIPELINE")
    return build_tiny_pipeline(root or tmp_path_factory.mktemp("tiny_pipeline"))


if __name__ == "__main__":  # python -m tests.pipeline_fixtures /tmp/tiny_pipeline
    import sys

    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_pipeline"
    print(build_tiny_pipeline(root, verbose=True))
