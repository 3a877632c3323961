"""Codes tasks: `register_codes_task(name, codes_dir)` -> `<name>_codes`.

Reads the precomputed codes of a folder written by precompute-codes
(`parti_jax.data.codes`). `codes_dir` is either one codes folder (its
codes_meta.json names the split) or a folder of per-split codes folders
(`codes_dir/train/codes_meta.json`, `codes_dir/validation/...`), locally or at a
URL (gs://...; parti_jax/storage.py).

Features: inputs (caption tokens with EOS), targets (image codes + 1 in a
pass-through vocabulary of K + 1, no EOS), text_truncated.
"""

from __future__ import annotations

from collections.abc import Sequence

import seqio

from parti_jax import storage
from parti_jax.data import codes as codes_lib
from parti_jax.data import features, preprocessors


def find_split_dirs(codes_dir: str) -> dict[str, str]:
    """{split: folder} from one codes folder or a folder of per-split codes folders."""
    if storage.exists(storage.join(codes_dir, codes_lib.META_FILE)):
        return {codes_lib.load_codes_meta(codes_dir)["split"]: codes_dir}
    if not storage.isdir(codes_dir):
        raise FileNotFoundError(f"{codes_dir}: no such codes folder")
    split_dirs = {}
    for child in storage.listdir(codes_dir):
        child_dir = storage.join(codes_dir, child.rstrip("/"))
        if storage.exists(storage.join(child_dir, codes_lib.META_FILE)):
            split = codes_lib.load_codes_meta(child_dir)["split"]
            if split in split_dirs:
                raise ValueError(
                    f"{codes_dir}: split {split!r} appears in both {split_dirs[split]} and {child_dir}"
                )
            split_dirs[split] = child_dir
    if not split_dirs:
        raise FileNotFoundError(
            f"{codes_dir}: no {codes_lib.META_FILE} here or in its subfolders; run "
            "parti-jax precompute-codes first (the meta is written when it finishes)"
        )
    return split_dirs


def register_codes_task(
    name: str,
    codes_dir: str,
    *,
    vocab_path: str | None = None,
    codebook_size: int | None = None,
    grid: Sequence[int] | None = None,
    codebook_hash: str | None = None,
    shuffle_buffer_size: int = 10_000,
) -> seqio.Task:
    """Registers `<name>_codes`; codebook_size / grid / codebook_hash, if given, must match the meta."""
    source = codes_lib.CodesDataSource(
        find_split_dirs(codes_dir),
        codebook_size=codebook_size,
        grid=grid,
        codebook_hash=codebook_hash,
    )
    return features.add_task(
        f"{name}_codes",
        source=source,
        output_features=features.codes_output_features(
            features.text_vocabulary(vocab_path), source.codebook_size
        ),
        preprocessors=[preprocessors.offset_image_codes, preprocessors.tokenize_text],
        # A buffer larger than the data would only hold several epochs at once.
        shuffle_buffer_size=max(
            1, min(shuffle_buffer_size, max(source.num_input_examples(s) for s in source.splits))
        ),
    )
