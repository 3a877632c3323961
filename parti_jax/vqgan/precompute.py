"""precompute-codes: a `*_pixels` task split through a trained VQGAN encoder into code shards.

Each process (host) encodes its own data shard (index = process index, count
= process count) on its local devices, reading the split in a fixed,
unshuffled order, and writes shards of exactly `shard_size` examples
(the host's last shard holds the rest):

    <output_dir>/shard-{host:03d}-{index:05d}.tfrecord     (parti_jax.data.codes format)
    <output_dir>/precompute.json    the settings; a resume with other settings is refused
    <output_dir>/host-{host:03d}.done    written when a host has finished its shard
    <output_dir>/codes_meta.json    written last, by process 0, after every host is done

Shards appear atomically (CodesShardWriter), so after an interruption the
complete shards are exactly the first ones of each host; a resumed run skips
them and the examples they hold, and writes the rest byte-for-byte as an
uninterrupted run would (encoding does not depend on the batch an image is
in). Example ids are `<split>/<host>/<position>` (position in the host's
order). Progress is shown with tqdm on process 0. `output_dir` may be a URL
(`gs://...`): every file goes through parti_jax/storage.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from parti_jax import storage
from parti_jax.data import codes as codes_lib
from parti_jax.data import pipeline
from parti_jax.models.config import check_counts
from parti_jax.train import distributed
from parti_jax.vqgan.tokenizer import ImageTokenizer

SETTINGS_FILE = "precompute.json"


def shard_name(host: int, index: int) -> str:
    """`shard-{host:03d}-{index:05d}.tfrecord`."""
    return f"shard-{host:03d}-{index:05d}.tfrecord"


def _done_file(output_dir: str, host: int) -> str:
    return storage.join(output_dir, f"host-{host:03d}.done")


@dataclasses.dataclass
class PrecomputeResult:
    output_dir: str
    status: str  # 'done' | 'stopped' (test hook) | 'already_done'
    examples_written: int  # by this process in this call
    shards_written: int  # by this process in this call
    shards_skipped: int  # complete shards found from an earlier run
    meta: dict | None  # codes_meta.json (process 0, when finished)


def _check_settings(output_dir: str, settings: dict) -> None:
    path = storage.join(output_dir, SETTINGS_FILE)
    if storage.exists(path):
        saved = storage.read_json(path)
        diffs = [
            f"{k}: earlier run {saved.get(k)!r}, now {v!r}"
            for k, v in settings.items()
            if saved.get(k) != v
        ]
        if diffs:
            raise ValueError(
                f"{output_dir}: holds codes written with other settings ({'; '.join(diffs)}); "
                "resume with the same settings or write to an empty output_dir"
            )
        return
    storage.write_json(path, settings, sort_keys=True)


def _resume_point(output_dir: str, host: int, shard_size: int) -> tuple[int, bool]:
    """(complete shards at the start of this host's sequence, whether the host already finished)."""
    index = 0
    while codes_lib.shard_is_complete(output_dir, shard_name(host, index)):
        index += 1
    last = storage.join(output_dir, shard_name(host, index - 1))
    if index and codes_lib.count_records(last) < shard_size:
        return index, True  # a short shard is the host's last one
    return index, storage.exists(_done_file(output_dir, host))


def _source_task(task: Any, split: str) -> Any:
    """The seqio task to encode (a name or a task), checked for `split`."""
    if isinstance(task, str):
        import parti_jax.tasks  # noqa: F401  (registers the built-in tasks)
    return pipeline.single_task(task, split, where="precompute_codes.task")


def precompute_codes(
    *,
    vqgan: str,
    task: Any,
    output_dir: str,
    split: str = "train",
    vqgan_step: int | None = None,
    batch_size: int = 64,
    shard_size: int = 1024,
    progress: bool = True,
    max_shards: int | None = None,
) -> PrecomputeResult:
    """Encodes `task`'s `split` with the VQGAN of work directory `vqgan` into `output_dir`.

    Args:
      vqgan: a train-vqgan work directory (its latest checkpoint, or `vqgan_step`).
      task: a `<name>_pixels` seqio task (name or object).
      output_dir: the codes folder (created; resumed when it holds earlier shards).
      split: the task split to encode.
      batch_size: images per encoder call on this host.
      shard_size: examples per shard (fixed, so a resume finds the same boundaries).
      progress: a tqdm progress bar on process 0.
      max_shards: stop after writing this many new shards in this call, without the
        meta (a test hook that stands in for an interruption).

    Returns:
      PrecomputeResult; `meta` is the written codes_meta.json on process 0.
    """
    check_counts("precompute_codes", shard_size=shard_size, batch_size=batch_size)
    check_counts("precompute_codes", max_shards=max_shards)
    host, num_hosts = jax.process_index(), jax.process_count()
    tokenizer = ImageTokenizer.load(vqgan, step=vqgan_step, batch_size=batch_size)
    provider = _source_task(task, split)
    output_dir = storage.join(output_dir)  # `~` expanded, absolute; URLs as given
    meta_file = storage.join(output_dir, codes_lib.META_FILE)
    if storage.exists(meta_file):
        existing = codes_lib.load_codes_meta(output_dir)
        tokenizer.check_codes_meta(existing)
        if existing["source_task"] != provider.name or existing["split"] != split:
            raise ValueError(
                f"{meta_file}: already holds codes of {existing['source_task']}/"
                f"{existing['split']}, not {provider.name}/{split}; pick another output_dir"
            )
        return PrecomputeResult(output_dir, "already_done", 0, 0, 0, existing)
    record = dict(  # what the meta records
        codebook_size=tokenizer.codebook_size,
        grid=tokenizer.grid,
        codebook_hash=tokenizer.codebook_hash,
        image_size=tokenizer.image_size,
        vqgan_checkpoint=tokenizer.meta["checkpoint"],
        vqgan_step=int(tokenizer.meta["step"]),
        source_task=provider.name,
        split=split,
    )
    settings = {k: record[k] for k in ("source_task", "split", "codebook_hash", "vqgan_checkpoint")}
    settings.update(shard_size=int(shard_size), num_hosts=num_hosts)
    if host == 0:
        _check_settings(output_dir, settings)
    distributed.barrier("precompute_settings")
    if host != 0:
        _check_settings(output_dir, settings)

    first_shard, finished = _resume_point(output_dir, host, shard_size)
    written = shards_written = 0
    if not finished:
        from tqdm import tqdm

        skip = position = first_shard * shard_size  # the examples of the complete shards
        try:
            total = int(provider.num_input_examples(split)) // num_hosts
        except Exception:  # noqa: BLE001 - unknown size: the bar counts without a total
            total = None
        quiet = not progress or host != 0
        bar = tqdm(total=total, initial=skip, unit="img", desc=f"precompute {split}", disable=quiet)
        batches = pipeline.make_pixels_iterator(
            provider,
            batch_size=batch_size,
            split=split,
            image_size=tokenizer.image_size,
            shard_index=host,
            num_shards=num_hosts,
            shuffle=False,
            repeat=False,
            drop_remainder=False,
        )

        def encoded() -> Iterator[tuple[str, np.ndarray]]:
            """(caption, codes) of this host's examples after those of the complete shards."""
            nonlocal skip
            for batch in batches:
                images, texts = batch["image"][skip:], batch["text"][skip:]
                skip = max(0, skip - len(batch["text"]))
                if len(texts):
                    yield from zip(texts, tokenizer.encode(images))
                    bar.update(len(texts))

        examples = encoded()
        with bar:
            for index in itertools.count(first_shard):
                shard = list(itertools.islice(examples, shard_size))
                if not shard:
                    break
                with codes_lib.CodesShardWriter(
                    output_dir,
                    shard_name(host, index),
                    codebook_size=tokenizer.codebook_size,
                    grid=tokenizer.grid,
                ) as writer:
                    for text, image_codes in shard:
                        writer.write(f"{split}/{host:03d}/{position:09d}", text, image_codes)
                        position += 1
                written, shards_written = written + len(shard), shards_written + 1
                if max_shards is not None and shards_written >= max_shards:
                    # Stopped (the test hook): no .done file, no meta.
                    return PrecomputeResult(
                        output_dir, "stopped", written, shards_written, first_shard, None
                    )
        storage.write_json(_done_file(output_dir, host), {"host": host, "examples": position})

    distributed.barrier("precompute_done")
    meta = None
    if host == 0:
        missing = [h for h in range(num_hosts) if not storage.exists(_done_file(output_dir, h))]
        if missing:
            raise RuntimeError(
                f"{output_dir}: host(s) {missing} have not finished their shards; rerun "
                "precompute-codes on every host"
            )
        meta = codes_lib.finalize_codes_meta(output_dir, **record, shard_pattern="shard-*.tfrecord")
    distributed.barrier("precompute_meta")
    return PrecomputeResult(output_dir, "done", written, shards_written, first_shard, meta)


def output_dirs(output_dir: str, splits: list[str]) -> dict[str, str]:
    """{split: folder}: `output_dir` itself for one split, `output_dir/<split>` for several."""
    if len(splits) == 1:
        return {splits[0]: output_dir}
    return {s: storage.join(output_dir, s) for s in splits}
