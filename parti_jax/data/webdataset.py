"""WebDataset tar shards (the layout img2dataset writes) as a seqio source.

    shards/00000.tar   000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...

An example is the members sharing a key (the member name up to the first '.' of its
base name): a .jpg/.jpeg/.png/.webp image and a caption from .txt, else the "caption"
(or "text") field of .json. Other members are ignored. See `parti_jax.data.streaming`
for listing, host sharding, resuming and bad examples.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence

from parti_jax import storage
from parti_jax.data.streaming import (
    Record,
    ShardedSource,
    ShardSpec,
    caption_problem,
    decoded_caption,
    reason,
    shards_by_split,
)
from parti_jax.data.vocab import CAPTION_KEYS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (member name, data) in order: one shard of the layout this
    source reads (`<key>.jpg` + `<key>.txt`/`.json`), e.g. to write a few shards by hand."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _TarReader:
    """Reads a tar shard front to back, one example (the members sharing a key) at a time.

    Only forward reads: a member's data is read right after its header, so a shard on
    an object store is one stream. A problem met while looking ahead (a corrupt
    header, a truncated file) belongs to the next example; after it the shard ends.
    """

    def __init__(self, shard: str, image_extensions: Sequence[str], caption_keys: Sequence[str]):
        self.shard = shard
        self.position = 0
        self._image_extensions = tuple(image_extensions)
        self._caption_keys = tuple(caption_keys)
        self._file = self._tar = None
        self._pending: tuple[tarfile.TarInfo, str, str] | None = None  # (member, key, ext)
        self._pending_problem = ""
        self._ended = False
        self._last = ""  # the last member read
        try:
            self._file = storage.open(shard, "rb")
            self._tar = tarfile.open(fileobj=self._file, mode="r:")  # noqa: SIM115 - kept open
        except (OSError, tarfile.TarError, EOFError) as e:
            self._pending_problem = f"cannot read the shard as a tar file ({reason(e)})"
        else:
            self._advance()

    def _advance(self) -> None:
        """Reads the next file member's header into `_pending` (None at the end)."""
        self._pending = None
        try:
            while (member := self._tar.next()) is not None:
                self._tar.members.clear()  # tarfile keeps every header; this reader needs none
                key, ext = _key_and_extension(member.name)
                if member.isfile() and key:
                    self._pending = (member, key, ext.lower())
                    return
        except (OSError, tarfile.TarError, EOFError) as e:
            self._pending_problem = f"the tar is corrupt {self._after()} ({reason(e)})"
            return
        self._pending_problem = self._end_problem()

    def _after(self) -> str:
        return f"after member {self._last}" if self._last else "at its start"

    def _end_problem(self) -> str:
        """Why reading stopped early, or "" at a proper end of archive (tarfile reads an
        invalid header or a missing end marker as the end)."""
        offset = self._tar.offset
        try:
            self._file.seek(offset)
            block = self._file.read(tarfile.BLOCKSIZE)
        except OSError as e:
            return f"cannot read {self._after()} ({reason(e)})"
        if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
            return ""
        if not block:
            return f"the shard ends {self._after()} without the end-of-archive marker (truncated?)"
        return f"invalid tar header at byte {offset}, {self._after()} (the shard is corrupt)"

    def _example(self, *, read_data: bool) -> tuple[str, dict[str, tuple[str, bytes]]] | None:
        """(key, {extension: (member name, data)}) of the next example, None at the end;
        raises _ShardEnds for a problem that ends the shard."""
        if self._pending is None:
            if self._pending_problem:
                raise _ShardEnds("", self._pending_problem)
            return None
        key = self._pending[1]
        members: dict[str, tuple[str, bytes]] = {}
        while self._pending is not None and self._pending[1] == key:
            member, _, ext = self._pending
            data = b""
            wanted = ext in self._image_extensions or ext in ("txt", "json")
            if read_data and wanted:
                try:
                    data = self._tar.extractfile(member).read()
                except (OSError, tarfile.TarError, EOFError) as e:
                    problem = f"cannot read the member ({reason(e)})"
                    raise _ShardEnds(member.name, problem) from None
            members.setdefault(ext, (member.name, data))
            self._last = member.name
            self._advance()
        return key, members

    def skip(self) -> bool:
        if self._ended:
            return False
        try:
            example = self._example(read_data=False)
        except _ShardEnds:
            example = None
        if example is None:
            self._ended = True
            return False
        self.position += 1
        return True

    def next(self) -> Record | None:
        if self._ended:
            return None
        try:
            example = self._example(read_data=True)
        except _ShardEnds as e:
            self._ended = True
            self.position += 1
            return Record(e.member, problem=e.problem)
        if example is None:
            self._ended = True
            return None
        self.position += 1
        return self._record(*example)

    def _record(self, key: str, members: Mapping[str, tuple[str, bytes]]) -> Record:
        image = next((members[e] for e in self._image_extensions if e in members), None)
        if image is None:
            names = ", ".join(sorted(name for name, _ in members.values()))
            wanted = "/".join(f".{e}" for e in self._image_extensions)
            return Record(key, problem=f"no image ({wanted}) in the example (members: {names})")
        if "txt" in members:
            name, data = members["txt"]
            caption, problem = decoded_caption(data.strip())
        elif "json" in members:
            name, data = members["json"]
            caption, problem = self._json_caption(data)
        else:
            name, caption = image[0], ""
            problem = f"no caption (a {key}.txt member, or {key}.json with a caption field)"
        if problem:
            return Record(name, problem=problem)
        return Record(image[0], image=image[1], caption=caption)

    def _json_caption(self, data: bytes) -> tuple[str, str]:
        try:
            row = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            return "", f"the JSON is not valid UTF-8 ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            return "", f"malformed JSON ({e.msg} at column {e.colno})"
        keys = [k for k in self._caption_keys if isinstance(row, dict) and k in row]
        caption = row[keys[0]] if keys else None
        if not isinstance(caption, str):
            # No quotes: tf.data's assertion messages escape or drop them.
            fields = " or ".join(self._caption_keys)
            return "", f"no caption in the JSON (a string field named {fields})"
        return caption, caption_problem(caption)

    def close(self) -> None:
        for handle in (self._tar, self._file):
            if handle is not None:
                with contextlib.suppress(Exception):  # closing a broken shard must not fail
                    handle.close()
        self._tar = self._file = None
        self._ended = True


class _ShardEnds(Exception):
    def __init__(self, member: str, problem: str) -> None:
        super().__init__(problem)
        self.member, self.problem = member, problem


def _key_and_extension(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ('dir/000012', 'jpg') for 'dir/000012.jpg';
    ('', '') for names whose base name has no '.' or starts with one."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), ext


class WebDatasetSource(ShardedSource):
    """WebDataset tar shards (img2dataset's layout): {file, text, image}."""

    kind = "tar shard"

    def __init__(
        self,
        shards: ShardSpec | Mapping[str, ShardSpec],
        *,
        skip_bad_examples: bool = False,
        caption_key: str | None = None,
        image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
        cycle_length: int = 4,
    ) -> None:
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        if not self.image_extensions:
            raise ValueError("image_extensions is empty; give e.g. ('jpg', 'png', 'webp')")
        self.caption_keys = (caption_key,) if caption_key else CAPTION_KEYS
        super().__init__(
            shards_by_split(shards, suffix=".tar"),
            skip_bad_examples=skip_bad_examples,
            cycle_length=cycle_length,
        )

    def _open(self, shard: str) -> _TarReader:
        return _TarReader(shard, self.image_extensions, self.caption_keys)
