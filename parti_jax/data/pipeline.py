"""Host-sharded, checkpointable input iterators over SeqIO tasks and mixtures.

Each host builds its own iterator for its data shard (`shard_index` /
`num_shards`: the host's position along the mesh's batch axes, from
`partitioning.host_data_shard(mesh)`; this module never calls jax).

    it = make_codes_iterator("shapes_codes", batch_size=8, shard_index=0, num_shards=1)
    batch = next(it)       # the 4 batch keys of docs/DESIGN.md §3, numpy
    it.save(path)          # the data position (docs/DESIGN.md §3 "Data position")
    it.restore(path)       # continue exactly after the saved batch

The data position is the tf.data iterator itself, saved with
`tf.train.Checkpoint` (T5X's approach), so shuffle buffers, file offsets and
prefetched elements are all in it; a sidecar JSON records the settings it needs
and `restore` refuses a mismatch. `it.stats` (examples served, captions
truncated) travels in the same checkpoint.

Bad data met while iterating raises `DataPipelineError` (one line naming the
file) and closes the iterator. Every iterator is closed on its first error and
at interpreter exit: tf.data's map threads run Python (image decoding), and an
iterator left to interpreter shutdown deadlocks there (its destructor waits for
decode calls whose threads Python no longer runs), which hung the trainer after
it had printed the error.
"""

from __future__ import annotations

import atexit
import codecs
import logging
import os
import re
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from parti_jax import storage
from parti_jax.data import preprocessors
from parti_jax.data.features import ImageCodesFeatureConverter
from parti_jax.data.preprocessors import TEXT_LENGTH, TEXT_TRUNCATED

logger = logging.getLogger(__name__)
_DROPOUT_SEED_OFFSET = 0x5EED


class DataPipelineError(ValueError):
    """Bad data met while iterating (the message names the file / record)."""


class DataPositionMismatch(ValueError):
    """A saved data position written by a differently configured iterator."""


def _provider(name: str | seqio.Task | seqio.Mixture):
    if isinstance(name, (seqio.Task, seqio.Mixture)):
        return name
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        raise ValueError(
            f"no seqio task or mixture named {name!r} is registered; register it first "
            "(parti_jax.tasks.register_*_task; `import parti_jax.tasks` registers the "
            "built-in shapes_pixels, coco_captions_pixels and parti_prompts)"
        ) from None


def single_task(task: str | seqio.Task, split: str, *, where: str) -> seqio.Task:
    """The registered task `task` (a name or a task) that has `split`; a mixture is an
    error naming the `where` field (its tasks are encoded one by one)."""
    provider = _provider(task)
    if not isinstance(provider, seqio.Task):
        raise ValueError(
            f"{where}={getattr(provider, 'name', task)!r} is a {type(provider).__name__}; "
            "encode each `<name>_pixels` task of a mixture separately"
        )
    if split not in provider.splits:
        raise ValueError(
            f"task {provider.name!r} has no split {split!r}; it has {list(provider.splits)}"
        )
    return provider


def _tasks_of(provider) -> list[seqio.Task]:
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def _options(num_threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # Image decoding and the shapes world run in tf.numpy_function: pure
    # functions of their inputs, so saving the iterator without them is exact.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    if num_threads:
        options.threading.private_threadpool_size = num_threads
    return options


def _task_dataset(
    provider, sequence_length: Mapping[str, int], settings: Mapping
) -> tf.data.Dataset:
    """The task's or mixture's examples for an iterator's `settings` (split, order, host shard)."""
    shard_index, num_shards = settings["shard_index"], settings["num_shards"]
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} must be in [0, num_shards={num_shards})")
    split = settings["split"]
    mixture = isinstance(provider, seqio.Mixture)
    if not mixture and split not in provider.splits:
        raise ValueError(
            f"task {provider.name!r} has no split {split!r}; it has {list(provider.splits)}"
        )
    # A mixture passes the truncation count of its tasks through.
    extra = {"passthrough_features": [TEXT_TRUNCATED], "log_mixing_proportions": False}
    return provider.get_dataset(
        sequence_length,
        split=split,
        shuffle=settings["shuffle"],
        seed=settings["seed"],
        shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
        num_epochs=None if settings["repeat"] else 1,
        try_in_mem_cache=False,  # a cache would be written into every data checkpoint
        **(extra if mixture else {}),
    )


def num_image_tokens(task_or_mixture: str | seqio.Task | seqio.Mixture) -> int:
    """h * w of a codes task (from its codes meta)."""
    for task in _tasks_of(_provider(task_or_mixture)):
        grid = getattr(task.source, "grid", None)
        if grid is not None:
            return int(grid[0]) * int(grid[1])
    raise ValueError(f"{task_or_mixture}: not a codes task; pass feature_lengths['targets']")


# ------------------------------------------------------------------ iterator
_ASSERT = re.compile(r"assertion failed: \[(.*?)\]\s*(?:\n|$)", re.S)


def _clean_error(error: tf.errors.OpError) -> str:
    """The one useful line of a tf.data error (assert message or Python exception)."""
    message = error.message
    match = _ASSERT.search(message)
    if match:  # TensorFlow prints the message C-escaped: undo it (quotes, '\\', octal bytes)
        raw = codecs.escape_decode(match.group(1).encode("utf-8"))[0]
        return raw.decode("utf-8", "replace")
    for marker in ("ImageDecodeError: ", "ValueError: "):
        if marker in message:
            return message.split(marker, 1)[1].split("\n", 1)[0]
    return message.split("\n", 1)[0]


_OPEN: weakref.WeakSet[DataIterator] = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    """Closes the iterators still open at exit, while Python still runs their threads."""
    for iterator in list(_OPEN):
        iterator.close()


class DataIterator:
    """`next(it)` -> dict of numpy arrays; `save(path)` / `restore(path)` the data position."""

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        kind: str,
        description: Mapping,
        sources: Sequence[seqio.DataSource] = (),
    ) -> None:
        if kind not in ("codes", "pixels"):
            raise ValueError(f"kind must be 'codes' or 'pixels', got {kind!r}")
        self.kind = kind
        self.description = dict(description)
        self._sources = list(sources)
        self._examples = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._truncated = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._checkpoint = tf.train.Checkpoint(
            iterator=iter(dataset), examples=self._examples, text_truncated=self._truncated
        )
        self._warned = False
        self._closed = ""  # why the iterator was closed
        _OPEN.add(self)

    def close(self, reason: str = "the data iterator was closed") -> None:
        """Stops its tf.data threads and frees the tf.data iterator (idempotent)."""
        if self._checkpoint is not None:
            self._checkpoint = None
            self._closed = reason
            _OPEN.discard(self)

    def __iter__(self) -> DataIterator:
        return self

    def _open(self) -> tf.train.Checkpoint:
        """The iterator's checkpoint; DataPipelineError (why) once it is closed."""
        if self._checkpoint is None:
            raise DataPipelineError(self._closed)
        return self._checkpoint

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            element = next(self._open().iterator)
        except tf.errors.OpError as e:
            error = _clean_error(e)
        else:
            error = None
        if error is not None:  # outside the except: no traceback keeps the iterator alive
            self.close(error)
            raise DataPipelineError(error)
        batch = {k: v.numpy() for k, v in element.items()}
        truncated = batch.pop(TEXT_TRUNCATED)
        self._examples.assign_add(len(truncated))
        if truncated.any():
            self._truncated.assign_add(int(truncated.sum()))
            if not self._warned:
                logger.warning(
                    "captions longer than the text length were truncated (%d so far); "
                    "see DataIterator.stats",
                    int(self._truncated.numpy()),
                )
                self._warned = True
        if self.kind == "pixels":
            batch["image"] = batch["image"].astype(np.float32) / np.float32(255.0)
            batch["text"] = np.array([t.decode("utf-8") for t in batch["text"]], dtype=object)
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """{'examples': served so far, 'text_truncated': of those, captions cut to fit,
        'skipped_at_read': rows of its tasks found bad while reading in this process and
        skipped (skip_bad_examples=True; not part of the data position)}."""
        return {
            "examples": int(self._examples.numpy()),
            "text_truncated": int(self._truncated.numpy()),
            "skipped_at_read": sum(len(getattr(s, "skipped_at_read", ())) for s in self._sources),
        }

    def save(self, path: str) -> str:
        """Writes the data position under the prefix `path` (+ `path.json` describing it).

        `path` may be a URL (gs://...): TensorFlow writes into a local temporary folder
        whose files are then uploaded (parti_jax/storage.py; TensorFlow's own GCS client
        is never given a URL)."""
        with storage.staged(path, kind="prefix") as local:
            written = self._open().write(local)
            storage.write_json(f"{local}.json", self.description, sort_keys=True)
        return os.fspath(path) if storage.is_url(path) else written

    def restore(self, path: str) -> None:
        """Continues from a position saved by `save(path)` of an identically built iterator."""
        sidecar = f"{path}.json"
        if not storage.exists(sidecar):
            raise FileNotFoundError(f"{sidecar}: no saved data position at {path}")
        saved = storage.read_json(sidecar)
        diffs = [
            f"{k}: saved {saved.get(k)!r}, now {v!r}"
            for k, v in self.description.items()
            if saved.get(k) != v
        ]
        if diffs:
            raise DataPositionMismatch(
                f"{path}: data position was saved by a different pipeline ({'; '.join(diffs)}); "
                "resume with the same data settings and number of data shards, or start a "
                "fresh data order (train.allow_data_reshuffle=True)"
            )
        with storage.fetched(path, kind="prefix") as local:  # a URL: a local copy
            self._open().read(local).assert_consumed()


def _settings(arguments: Mapping) -> dict:
    """An iterator's arguments, as the description that a data position is saved with.

    Every argument but the task (recorded by name) and the thread count, so an
    argument added to an iterator is part of the position's key by default.
    """
    settings = {k: v for k, v in arguments.items() if k not in ("task_or_mixture", "num_threads")}
    if "feature_lengths" in settings:
        settings["feature_lengths"] = dict(settings["feature_lengths"] or {}) or None
    return settings


def _iterator(
    kind: str, task_or_mixture, ds: tf.data.Dataset, settings: Mapping, num_threads: int | None
) -> DataIterator:
    """Batches `ds` as `settings` say and wraps it, with the settings as its description."""
    ds = ds.batch(settings["batch_size"], drop_remainder=settings["drop_remainder"])
    ds = ds.prefetch(2).with_options(_options(num_threads))
    name = task_or_mixture if isinstance(task_or_mixture, str) else task_or_mixture.name
    sources = [t.source for t in _tasks_of(_provider(task_or_mixture))]
    return DataIterator(
        ds, kind=kind, description={"kind": kind, "task": name, **settings}, sources=sources
    )


def make_codes_iterator(
    task_or_mixture: str | seqio.Task | seqio.Mixture,
    *,
    batch_size: int,
    split: str = "train",
    feature_lengths: Mapping[str, int] | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    conditioning_dropout_rate: float = 0.0,
    drop_remainder: bool = True,
    num_threads: int | None = None,
) -> DataIterator:
    """Host-local encoder-decoder batches from a codes task or mixture.

    Args:
      task_or_mixture: a registered `<name>_codes` task or a mixture of them.
      batch_size: examples per host batch.
      split: the split to read.
      feature_lengths: {'inputs': text length (128), 'targets': h * w (from the meta)}.
      shard_index, num_shards: this host's position along the mesh batch axes.
      seed: shuffling and per-example randomness; the order is a function of it.
      shuffle, repeat: training (True, True) or one pass in order (False, False).
      conditioning_dropout_rate: share of examples whose text becomes `[EOS]`.
      num_threads: tf.data private thread pool size (None: TensorFlow's default).

    Returns:
      A DataIterator yielding {encoder_input_tokens, decoder_input_tokens,
      decoder_target_tokens (int32), decoder_loss_weights (float32)}.
    """
    settings = _settings(locals())
    provider = _provider(task_or_mixture)
    lengths = {"inputs": TEXT_LENGTH, "targets": None, **(feature_lengths or {})}
    if lengths["targets"] is None:
        lengths["targets"] = num_image_tokens(provider)
    ds = _task_dataset(provider, lengths, settings)
    if conditioning_dropout_rate > 0:
        eos_id = _tasks_of(provider)[0].output_features["inputs"].vocabulary.eos_id
        # Each host draws its own dropout stream (hosts see different examples).
        with seqio.utils.map_seed_manager(seed + _DROPOUT_SEED_OFFSET + 7919 * shard_index):
            ds = preprocessors.conditioning_dropout(
                ds, rate=conditioning_dropout_rate, eos_id=eos_id
            )
    ds = ImageCodesFeatureConverter()(ds, lengths)
    return _iterator("codes", task_or_mixture, ds, settings, num_threads)


def make_pixels_iterator(
    task_or_mixture: str | seqio.Task | seqio.Mixture,
    *,
    batch_size: int,
    split: str = "train",
    image_size: int | None = None,
    text_length: int = TEXT_LENGTH,
    shard_index: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    num_threads: int | None = None,
) -> DataIterator:
    """Host-local pixel batches: {image float32 [B, H, W, 3] in [0, 1], text (str) [B]}.

    Same arguments as `make_codes_iterator`; `image_size` checks the task's
    image side (tasks resize at registration).
    """
    settings = _settings(locals())
    provider = _provider(task_or_mixture)
    ds = _task_dataset(provider, {"inputs": text_length}, settings)
    shape = ds.element_spec["image"].shape
    if image_size is not None and tuple(shape[:2]) != (image_size, image_size):
        raise ValueError(
            f"{provider.name}: yields images of shape {shape} but image_size={image_size} "
            f"was asked; register the task with image_size={image_size}"
        )
    keep = ("image", "text", TEXT_TRUNCATED)
    select = tf.autograph.experimental.do_not_convert(lambda ex: {k: ex[k] for k in keep})
    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    return _iterator("pixels", task_or_mixture, ds, settings, num_threads)
