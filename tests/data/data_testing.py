"""Helpers shared by the data tests: small codes folders."""

import numpy as np

from parti_jax.data import codes

CAPTIONS = ("a small red circle", "a big blue square on the left", "a green triangle")


def write_codes_folder(
    path,
    *,
    num_shards=2,
    per_shard=8,
    codebook_size=16,
    grid=(2, 3),
    split="train",
    codebook_hash="feedc0de",
    fill=None,
    seed=0,
    prefix="shard-000",
):
    """Writes a complete codes folder; returns {id: (text, codes)} of what was written."""
    rng = np.random.default_rng(seed)
    written = {}
    for s in range(num_shards):
        with codes.CodesShardWriter(
            str(path), f"{prefix}-{s:05d}.tfrecord", codebook_size=codebook_size, grid=grid
        ) as writer:
            for i in range(per_shard):
                example_id = f"{split}-{s}-{i}"
                text = CAPTIONS[(s * per_shard + i) % len(CAPTIONS)]
                if fill is None:
                    image_codes = rng.integers(0, codebook_size, size=grid)
                else:
                    image_codes = np.full(grid, fill)
                writer.write(example_id, text, image_codes)
                written[example_id] = (text, np.asarray(image_codes).reshape(-1))
    codes.finalize_codes_meta(
        str(path),
        codebook_size=codebook_size,
        grid=grid,
        codebook_hash=codebook_hash,
        image_size=64,
        vqgan_checkpoint="/ckpt/vqgan",
        vqgan_step=100,
        source_task="shapes_pixels",
        split=split,
    )
    return written
