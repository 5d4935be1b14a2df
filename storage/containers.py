"""The two shard containers: Arrow IPC files and Zarr v3 groups.

In: rows of per-field blobs (from a format's row codec) plus the shard's identity metadata.
Out: one published shard object, its byte size and sha256; and readers that return one
row by position with a single ranged read (Arrow: one record batch per row; Zarr: one inner
chunk per row inside a sharded array). A row is one sequence (format 1) or one group of
sequences (format 2); a shard may also carry a few shard-level blobs (format 2's id table).

A shard is opened either from a local file (memory-mapped) or, for random access to a
remote shard that has no local copy, over ranged reads: an Arrow shard costs one GET of
its last 64 KiB (magic, footer, schema and the identity metadata) and then one GET per
sequence (the footer gives each record batch's offset and length).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ._values import load_json_object
from .errors import CacheError, ShardCorruptError
from .format import ShardInfo
from .ipc import check_batch_header, read_footer
from .location import Location
from .zarr_shard import META_KEY, ZarrShard, list_files

__all__ = ["CONTAINERS", "ShardHandle", "get_container", "shard_digest"]

_MAX_SHARD_FILES = 64  # a zarr shard holds ~20 files; an Arrow shard is one
_HASH_BLOCK = 1 << 22
_TAIL_BYTES = 1 << 16  # an Arrow footer is ~100 B + 24 B per sequence + the schema (~3 KB)


class ShardHandle(Protocol):
    metadata: dict[str, Any]
    n_rows: int

    shard_blobs: dict[str, bytes]

    def read(self, row: int) -> tuple[int, dict[str, Any]]: ...


class ArrowContainer:
    """One IPC file per shard; one record batch of one row per container row (a sequence in
    format 1, a group of sequences in format 2).

    The blobs are already zstd-compressed by the field codecs, so Arrow's own buffer
    compression is off (it would spend time for no gain).
    """

    name = "arrow"
    suffix = ".arrow"

    def write(
        self,
        loc: Location,
        rel: str,
        metadata: dict[str, Any],
        indices: Sequence[int],
        rows: Sequence[dict[str, bytes]],
        fields: Sequence[str],
        shard_blobs: dict[str, bytes] | None = None,
    ) -> tuple[int, str]:
        extra = {f"{META_KEY}.{k}": v for k, v in (shard_blobs or {}).items()}
        schema = pa.schema(
            [pa.field("index", pa.int64())] + [pa.field(f, pa.binary()) for f in fields],
            metadata={META_KEY: json.dumps(metadata), **extra},
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            for index, row in zip(indices, rows):
                arrays = [pa.array([index], pa.int64())]
                arrays += [pa.array([row[f]], pa.binary()) for f in fields]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
        data = sink.getvalue().to_pybytes()
        loc.publish_bytes(rel, data)
        return len(data), hashlib.sha256(data).hexdigest()

    def open(self, loc: Location, rel: str) -> _ArrowShard:
        return _ArrowShard(loc, rel)

    def open_ranged(self, loc: Location, info: ShardInfo) -> _ArrowShard:
        """Random access to a remote shard without fetching it: one GET per sequence."""
        return _ArrowShard(loc, info.path, ranged_size=info.bytes)


class _ArrowShard:
    def __init__(self, loc: Location, rel: str, ranged_size: int | None = None) -> None:
        where = loc.url_of(rel)
        self._ranged: _RangedFile | None = None
        try:
            if ranged_size is not None:
                self._ranged = _RangedFile(loc, rel, ranged_size)
                source: Any = pa.PythonFile(self._ranged, mode="r")
            elif loc.local:
                source = pa.memory_map(where, "r")
            else:
                source = pa.PythonFile(loc.open(rel), mode="r")
            self._source = source
            # the footer and each batch header are checked by hand before pyarrow reads them
            self._blocks = read_footer(self._read_at, source.size(), f"shard {rel}")
            self._reader = pa.ipc.open_file(source)
            _check_schema(self._reader.schema, rel)
            meta = self._reader.schema.metadata or {}
            raw = meta.get(META_KEY.encode())
            self.metadata = _json_object(raw, f"shard {rel}") if raw else {}
            prefix = f"{META_KEY}.".encode()
            self.shard_blobs = {
                k[len(prefix) :].decode(): v for k, v in meta.items() if k.startswith(prefix)
            }
        except CacheError:
            raise
        except FileNotFoundError:
            raise CacheError(f"shard {rel} is missing ({where})") from None
        except (pa.ArrowException, OSError, ValueError) as err:  # a damaged schema: assorted types
            raise ShardCorruptError(f"shard {rel} is not a readable Arrow file: {err}") from None
        self.n_rows = self._reader.num_record_batches
        if self.n_rows != len(self._blocks):
            raise ShardCorruptError(
                f"shard {rel} is not a readable Arrow file: its footer lists "
                f"{len(self._blocks)} batches, pyarrow {self.n_rows}"
            )
        self._fields = [f for f in self._reader.schema.names if f != "index"]
        self._rel = rel

    def _read_at(self, offset: int, n: int) -> bytes:
        data = self._source.read_at(n, offset)
        if len(data) != n:
            raise ShardCorruptError(
                f"shard {self._rel}: bytes {offset}..{offset + n} are past its end"
            )
        return data

    def read(self, row: int) -> tuple[int, dict[str, Any]]:
        where = f"shard {self._rel} row {row}"
        if not 0 <= row < len(self._blocks):
            raise ShardCorruptError(f"shard {self._rel} has no row {row}")
        block = self._blocks[row]
        if self._ranged is not None:  # one GET for the header we check and the batch pyarrow reads
            self._ranged.preload(block.offset, block.offset + block.header_bytes + block.body_bytes)
        check_batch_header(self._read_at, block, 1 + len(self._fields), where)
        try:
            batch = self._reader.get_batch(row)
            batch.validate(full=True)  # binary offsets inside their data: pyarrow trusts them
            index = batch.column(0)[0].as_py()
            return index, {f: batch.column(f)[0].as_buffer() for f in self._fields}
        except CacheError:  # the network, from a ranged read: not the shard's fault
            raise
        except Exception as err:  # a damaged file raises assorted pyarrow errors
            raise ShardCorruptError(f"{where} is unreadable: {err}") from None


def _check_schema(schema: pa.Schema, rel: str) -> None:
    """int64 ``index``, then binary columns of distinct names: what every shard holds."""
    names, types = schema.names, schema.types
    fine = (
        names[:1] == ["index"]
        and types[0] == pa.int64()
        and all(t == pa.binary() for t in types[1:])
        and len(set(names)) == len(names)
    )
    if not fine:
        columns = dict(zip(names, map(str, types)))
        raise ShardCorruptError(
            f"shard {rel} has columns {columns}, not an int64 index and binary fields"
        )


def _json_object(raw: bytes | str, where: str) -> dict[str, Any]:
    """A JSON object from a shard's metadata; anything else is one line naming the shard."""
    try:
        obj = load_json_object(raw, f"{where}: its metadata")
    except CacheError as err:
        raise ShardCorruptError(str(err)) from None
    return obj


class _RangedFile(io.RawIOBase):
    """A read-only remote object seen as a file: its tail is fetched once on open, and
    every other read is one ranged GET of exactly the bytes asked for (pyarrow reads a
    record batch, metadata and body, in one read)."""

    def __init__(self, loc: Location, rel: str, size: int) -> None:
        super().__init__()
        self._loc, self._rel, self._size, self._pos = loc, rel, size, 0
        self._tail_start = max(0, size - _TAIL_BYTES)
        self._tail = loc.read_range(rel, self._tail_start, size)
        self._window, self._window_start = b"", 0

    def preload(self, start: int, end: int) -> None:
        """Fetch bytes [start, end) in one GET; reads inside them are served from memory."""
        end = min(end, self._size)
        if start < self._tail_start:
            self._window, self._window_start = self._loc.read_range(self._rel, start, end), start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        start, cut = self._pos, self._tail_start
        if start >= end:
            return b""
        w0 = self._window_start
        if w0 <= start and end <= w0 + len(self._window):
            self._pos = end
            return self._window[start - w0 : end - w0]
        head = self._loc.read_range(self._rel, start, min(end, cut)) if start < cut else b""
        tail = self._tail[max(start, cut) - cut : end - cut] if end > cut else b""
        self._pos = end
        return head + tail

    def readall(self) -> bytes:
        return self.read(-1)


class ZarrContainer:
    """One Zarr v3 group per shard; per field a variable-length-bytes array whose inner
    chunks hold one sequence each, all chunks of a field in one zarr shard object."""

    name = "zarr"
    suffix = ".zarr"

    def write(
        self,
        loc: Location,
        rel: str,
        metadata: dict[str, Any],
        indices: Sequence[int],
        rows: Sequence[dict[str, bytes]],
        fields: Sequence[str],
        shard_blobs: dict[str, bytes] | None = None,
    ) -> tuple[int, str]:
        import zarr

        n = len(rows)
        with loc.staged(rel) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vlen-bytes has no frozen v3 spec yet
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            group.attrs[META_KEY] = metadata
            for key, blob in (shard_blobs or {}).items():  # small: format 2's id table (~2 kB)
                group.attrs[f"{META_KEY}.{key}"] = base64.b64encode(blob).decode()
            index = group.create_array("index", shape=(n,), dtype="int64", chunks=(n,))
            index[:] = np.asarray(indices, dtype=np.int64)
            for f in fields:
                arr = group.create_array(
                    f, shape=(n,), dtype="bytes", chunks=(1,), shards=(n,), compressors=None
                )
                values = np.empty(n, dtype=object)
                values[:] = [bytes(row[f]) for row in rows]
                arr[:] = values
            digest = shard_digest(Location(Path(tmp).parent), Path(tmp).name)
        return digest

    def open(self, loc: Location, rel: str) -> ZarrShard:
        return ZarrShard(loc, rel)

    def open_ranged(self, loc: Location, info: ShardInfo) -> ZarrShard:
        """Random access to a remote shard: ranged reads of its chunks' index and rows."""
        return ZarrShard(loc, info.path)


CONTAINERS = {"arrow": ArrowContainer(), "zarr": ZarrContainer()}


def get_container(name: str) -> ArrowContainer | ZarrContainer:
    try:
        return CONTAINERS[name]
    except KeyError:
        choices = sorted(CONTAINERS)
        raise CacheError(f"unknown container {name!r}; expected one of {choices}") from None


def shard_digest(loc: Location, rel: str) -> tuple[int, str]:
    """(bytes, sha256) of a shard: of the file, or for a directory of its sorted
    (relative name, file sha256) list, so a renamed, missing or extra file changes it."""
    path = loc.path(rel)
    if not loc.fs.exists(path):
        raise CacheError(f"shard {rel} is missing ({path})")
    if not loc.fs.isdir(path):
        return _file_digest(loc, path)
    names = list_files(loc, rel, _MAX_SHARD_FILES)
    if len(names) > _MAX_SHARD_FILES:
        raise ShardCorruptError(
            f"shard {rel} is a directory of over {_MAX_SHARD_FILES} files; a shard has far fewer"
        )
    total, outer = 0, hashlib.sha256()
    for name in names:
        size, digest = _file_digest(loc, f"{path}/{name}")
        total += size
        outer.update(f"{name}\0{digest}\n".encode())
    return total, outer.hexdigest()


def _file_digest(loc: Location, path: str) -> tuple[int, str]:
    if loc.local and not stat.S_ISREG(os.stat(path).st_mode):
        # a shard linked to /dev/zero would be hashed forever, a FIFO would block the open
        raise ShardCorruptError(f"{path} is not a regular file; refusing to read it")
    h, size = hashlib.sha256(), 0
    with loc.fs.open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()
