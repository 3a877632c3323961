"""Streamed shard tasks: WebDataset tar shards and Parquet files -> `<name>_pixels`.

    register_webdataset_task("laion", "gs://bucket/laion/{00000..09999}.tar", image_size=256)
    register_parquet_task("cc3m", "/data/cc3m/*.parquet", image_size=256)

The tasks have the features of the folder task (image uint8 [image_size, image_size, 3],
text, inputs), so `parti-jax precompute-codes` and train-vqgan run on them unchanged.
Registration lists the shards and reads no image (parti_jax.data.streaming); an
iterator opens a shard when it reaches it. Gin-callable like `register_folder_task`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio

from parti_jax.data import parquet, webdataset
from parti_jax.tasks.folder import add_pixels_task

Shards = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def register_webdataset_task(
    name: str,
    shards: Shards,
    *,
    image_size: int,
    random_crop: bool = False,
    skip_bad_examples: bool = False,
    caption_key: str | None = None,
    image_extensions: Sequence[str] = webdataset.IMAGE_EXTENSIONS,
    cycle_length: int = 4,
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 1000,
) -> seqio.Task:
    """Registers `<name>_pixels` over WebDataset tar shards.

    Args:
      name: task prefix; the task is `<name>_pixels`.
      shards: a folder (its *.tar), a glob in the file name, a brace pattern
        (`shards/{00000..00099}.tar`), a list of these (all 'train'), or
        {split: any of these}.
      image_size: output side; shorter side resized, then a centre (or random) crop.
      random_crop: random crops from a stateless per-example seed.
      skip_bad_examples: count and skip bad examples (task.source.skipped_per_shard,
        the iterator's stats['skipped_at_read']) instead of failing with one line
        naming the shard and member.
      caption_key: the caption field of .json members (default "caption", then "text");
        a .txt member wins over .json.
      image_extensions: image members, in order of preference.
      cycle_length: shards read at once when shuffling.
      vocab_path: SentencePiece model; default the shipped shapes vocabulary.
      shuffle_buffer_size: examples in the shuffle buffer (decoded, resized images).
    """
    source = webdataset.WebDatasetSource(
        shards,
        skip_bad_examples=skip_bad_examples,
        caption_key=caption_key,
        image_extensions=image_extensions,
        cycle_length=cycle_length,
    )
    return add_pixels_task(name, source, image_size=image_size, random_crop=random_crop,
                           vocab_path=vocab_path, shuffle_buffer_size=shuffle_buffer_size)  # fmt: skip


def register_parquet_task(
    name: str,
    files: Shards,
    *,
    image_size: int,
    caption_column: str | None = None,
    image_column: str | None = None,
    url_column: str | None = None,
    random_crop: bool = False,
    skip_bad_examples: bool = False,
    cycle_length: int = 4,
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 1000,
) -> seqio.Task:
    """Registers `<name>_pixels` over Parquet files (reads the first file's schema only).

    Args:
      name: task prefix; the task is `<name>_pixels`.
      files: as `shards` of register_webdataset_task, with *.parquet files.
      image_size, random_crop, skip_bad_examples, cycle_length, vocab_path,
        shuffle_buffer_size: as for register_webdataset_task.
      caption_column: text or binary column (default "caption", then "text").
      image_column: encoded images: binary, or a struct with a 'bytes' field (Hugging
        Face datasets); default the first of parquet.PARQUET_IMAGE_COLUMNS present.
      url_column: a column naming where a row's image came from (default "url"): a
        row with no image bytes is a bad example either way (nothing is downloaded).
    """
    source = parquet.ParquetSource(
        files,
        columns=parquet.ParquetColumns(caption_column, image_column, url_column),
        skip_bad_examples=skip_bad_examples,
        cycle_length=cycle_length,
    )
    return add_pixels_task(name, source, image_size=image_size, random_crop=random_crop,
                           vocab_path=vocab_path, shuffle_buffer_size=shuffle_buffer_size)  # fmt: skip
