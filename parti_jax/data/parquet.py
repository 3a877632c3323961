"""Parquet files of image-text pairs as a seqio source.

A caption column (text or binary; default the first of "caption", "text") and an
image column holding the encoded image (binary, or a struct with a 'bytes' field as
Hugging Face datasets store images; default the first of PARQUET_IMAGE_COLUMNS). A row
without image bytes (only a URL or a path) is a bad example: nothing is downloaded.
Rows are named "row <i>" (0-based, in the file). See `parti_jax.data.streaming` for
listing, host sharding, resuming and bad examples.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Mapping

from parti_jax import storage
from parti_jax.data.streaming import (
    Record,
    ShardedSource,
    ShardSpec,
    decoded_caption,
    reason,
    shards_by_split,
)
from parti_jax.data.vocab import CAPTION_KEYS

PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")  # tried when none is named
PARQUET_URL_COLUMNS = ("url", "URL")
PARQUET_BATCH_ROWS = 64  # rows read from a file at once


@dataclasses.dataclass(frozen=True)
class ParquetColumns:
    """Column names; None: the first present of the defaults (caption: "caption", "text";
    image: PARQUET_IMAGE_COLUMNS; url: PARQUET_URL_COLUMNS, only named in messages)."""

    caption: str | None = None
    image: str | None = None
    url: str | None = None

    def resolve(self, schema, where: str) -> tuple[str, str, str | None]:
        """(caption, image, url or None) columns of a pyarrow schema; ValueError naming
        `where` and the columns it has when one is missing or of the wrong type."""
        import pyarrow as pa

        names = list(schema.names)

        def pick(given, defaults, what, argument):
            if given is not None:
                if given not in names:
                    raise ValueError(
                        f"{where}: no {what} column {given!r} (columns: {', '.join(names)}); "
                        f"set {argument}"
                    )
                return given
            found = next((n for n in defaults if n in names), None)
            if found is None:
                raise ValueError(
                    f"{where}: no {what} column (tried {', '.join(defaults)}; columns: "
                    f"{', '.join(names)}); set {argument}"
                )
            return found

        caption = pick(self.caption, CAPTION_KEYS, "caption", "caption_column")
        image = pick(self.image, PARQUET_IMAGE_COLUMNS, "image", "image_column")
        url = self.url if self.url in names else None
        if self.url is None:
            url = next((n for n in PARQUET_URL_COLUMNS if n in names), None)
        caption_type, image_type = schema.field(caption).type, schema.field(image).type
        if not _is_text_or_binary(caption_type):
            raise ValueError(f"{where}: caption column {caption!r} holds {caption_type}, not text")
        if pa.types.is_struct(image_type):
            fields = [image_type.field(i).name for i in range(image_type.num_fields)]
            ok = "bytes" in fields and _is_binary(image_type.field("bytes").type)
        else:
            ok = _is_binary(image_type)
        if not ok:
            raise ValueError(
                f"{where}: image column {image!r} holds {image_type}; it must hold the "
                "encoded image (binary, or a struct with a binary 'bytes' field)"
            )
        return caption, image, url


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_text_or_binary(t) -> bool:
    import pyarrow as pa

    return _is_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _as_bytes(column) -> list[bytes | None]:
    """A text or binary column's values as bytes (text is not validated by Arrow)."""
    import pyarrow as pa

    if pa.types.is_string(column.type):
        column = column.view(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.view(pa.large_binary())
    return column.to_pylist()


class _ParquetReader:
    """Reads a Parquet file's rows front to back, PARQUET_BATCH_ROWS at a time. A row
    group that cannot be read makes its remaining rows one bad example."""

    def __init__(self, path: str, columns: ParquetColumns):
        self.shard = path
        self.position = 0
        self._file = self._parquet = None
        self.problem = ""  # the file cannot be read at all: one bad example says why
        self._starts = [0]
        self._rows: list[Record] = []  # the rows read, from self._rows_start
        self._rows_start = 0
        self._batches = None
        self._group = -1
        try:
            import pyarrow.parquet as pq

            self._file = storage.open(path, "rb")
            self._parquet = pq.ParquetFile(self._file)
            metadata, schema = self._parquet.metadata, self._parquet.schema_arrow
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ...
            self.problem = f"cannot read the Parquet file ({reason(e)})"
            return
        try:
            self._columns = columns.resolve(schema, path)
        except ValueError as e:
            self.problem = str(e).removeprefix(f"{path}: ")
            return
        for g in range(metadata.num_row_groups):
            self._starts.append(self._starts[-1] + metadata.row_group(g).num_rows)

    @property
    def num_rows(self) -> int:
        return 1 if self.problem else self._starts[-1]

    def skip(self) -> bool:
        if self.position >= self.num_rows:
            return False
        self.position += 1
        return True

    def next(self) -> Record | None:
        row = self.position
        if row >= self.num_rows:
            return None
        self.position += 1
        if self.problem:
            return Record("", problem=self.problem)
        if not self._rows_start <= row < self._rows_start + len(self._rows):
            self._load(row)
        return self._rows[row - self._rows_start]

    def _load(self, row: int) -> None:
        """Reads on to the batch holding `row`, from its row group's start when the rows
        read so far lie elsewhere."""
        group = bisect.bisect_right(self._starts, row) - 1
        if self._batches is None or group != self._group or row < self._rows_start:
            self._group, self._rows, self._rows_start = group, [], self._starts[group]
            columns = [c for c in self._columns if c is not None]
            self._batches = self._parquet.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=columns,
                use_threads=False,
            )  # fmt: skip
        while row >= self._rows_start + len(self._rows):
            self._rows_start += len(self._rows)
            try:
                batch = next(self._batches)
            except Exception as e:  # noqa: BLE001 - a corrupt page, a failed read, ...
                end = self._starts[group + 1]
                bad = Record(
                    f"row group {group}",
                    problem=f"rows {self._rows_start}-{end - 1} cannot be read ({reason(e)})",
                )
                self._rows = [bad] * (end - self._rows_start)
                self._batches = None
                return
            self._rows = self._batch_records(batch, self._rows_start)

    def _batch_records(self, batch, start: int) -> list[Record]:
        import pyarrow as pa

        caption_column, image_column, url_column = self._columns
        captions = _as_bytes(batch.column(caption_column))
        images = batch.column(image_column)
        paths = [None] * len(captions)
        if pa.types.is_struct(images.type):
            if images.type.get_field_index("path") >= 0:
                paths = images.field("path").to_pylist()
            images = images.field("bytes")
        images = images.to_pylist()
        urls = batch.column(url_column).to_pylist() if url_column else [None] * len(captions)
        return [
            _parquet_record(start + i, caption, image, url or path)
            for i, (caption, image, url, path) in enumerate(zip(captions, images, urls, paths))
        ]

    def close(self) -> None:
        self._batches = None
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
        self._file = self._parquet = None


def _parquet_record(row: int, caption: bytes | None, image: bytes | None, link) -> Record:
    member = f"row {row}"
    if not image:
        problem = "no image bytes"
        if link:
            problem += " (only a URL or path: nothing is downloaded; fetch the images first)"
        return Record(member, problem=problem)
    if caption is None:
        return Record(member, problem="no caption (null)")
    text, problem = decoded_caption(caption)
    return Record(member, problem=problem) if problem else Record(member, image, text)


class ParquetSource(ShardedSource):
    """Parquet files with a caption column and an encoded-image column: {file, text, image}.

    Registration reads the first file's schema (its footer) to check the columns.
    """

    kind = "Parquet file"

    def __init__(
        self,
        files: ShardSpec | Mapping[str, ShardSpec],
        *,
        columns: ParquetColumns = ParquetColumns(),
        skip_bad_examples: bool = False,
        cycle_length: int = 4,
        check_columns: bool = True,
    ) -> None:
        self.columns = columns
        super().__init__(
            shards_by_split(files, suffix=".parquet"),
            skip_bad_examples=skip_bad_examples,
            cycle_length=cycle_length,
        )
        if check_columns:
            first = next(iter(self.shards.values()))[0]
            reader = _ParquetReader(first, columns)
            reader.close()
            if reader.problem:
                raise ValueError(f"{first}: {reader.problem}")

    def _open(self, shard: str) -> _ParquetReader:
        return _ParquetReader(shard, self.columns)
