"""Folder tasks: `register_folder_task(name, folder, image_size=...)` -> `<name>_pixels`.

See `parti_jax.data.folder` for the layout (images + captions.jsonl or
captions.tsv), the path rules and the bad-row handling. Gin-callable: bind
`register_folder_task.folder = '/data/my_photos'` etc. in a run's gin file.
`add_pixels_task` is what every `<name>_pixels` task over a source of
{text, image} is made of (folder, WebDataset and Parquet tasks).
"""

from __future__ import annotations

import functools
from typing import Literal

import seqio

from parti_jax.data import features, preprocessors
from parti_jax.data import folder as folder_lib


def add_pixels_task(
    name: str,
    source: seqio.DataSource,
    *,
    image_size: int,
    random_crop: bool = False,
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 1000,
) -> seqio.Task:
    """Registers `<name>_pixels` over a source of {text, image uint8 [H, W, 3]}: images
    resized and cropped to `image_size`, captions tokenized into `inputs`."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    crop = preprocessors.random_crop_image if random_crop else preprocessors.center_crop_image
    return features.add_task(
        f"{name}_pixels",
        source=source,
        output_features=features.pixel_output_features(features.text_vocabulary(vocab_path)),
        preprocessors=[functools.partial(crop, image_size=image_size), preprocessors.tokenize_text],
        shuffle_buffer_size=max(1, shuffle_buffer_size),
    )


def register_folder_task(
    name: str,
    folder: str,
    *,
    image_size: int,
    random_crop: bool = False,
    validation_fraction: float = 0.0,
    skip_bad_examples: bool = False,
    verify_images: bool | Literal["auto"] = "auto",
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 1000,
) -> seqio.Task:
    """Scans `folder` (errors name the captions file and line) and registers `<name>_pixels`.

    Args:
      name: task prefix; the task is `<name>_pixels`.
      folder: images plus captions.jsonl / captions.tsv.
      image_size: output side; shorter side resized, then a centre (or random) crop.
      random_crop: random crops from a stateless per-example seed.
      validation_fraction: share of images hashed into 'validation' when rows
        have no split.
      skip_bad_examples: count and skip bad rows instead of failing: at the scan
        (logged, kept in `task.source.index.skipped`) and while reading, an image
        that turned bad since (logged, `task.source.skipped_at_read`, the
        iterator's `stats['skipped_at_read']`).
      verify_images: decode every image at registration (True), only when reading
        (False), or 'auto': at registration for folders of up to
        folder.EAGER_VERIFY_LIMIT rows, else when reading (see folder.scan_folder).
      vocab_path: SentencePiece model; default the shipped shapes vocabulary.
    """
    index = folder_lib.scan_folder(
        folder,
        validation_fraction=validation_fraction,
        skip_bad_examples=skip_bad_examples,
        verify_images=verify_images,
    )
    source = folder_lib.FolderDataSource(index, skip_bad_examples=skip_bad_examples)
    # A buffer larger than the data would only hold several epochs at once.
    buffer = min(shuffle_buffer_size, len(index.records))
    return add_pixels_task(name, source, image_size=image_size, random_crop=random_crop,
                           vocab_path=vocab_path, shuffle_buffer_size=buffer)  # fmt: skip
