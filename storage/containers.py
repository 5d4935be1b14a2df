"""The two shard containers: Arrow IPC files and Zarr v3 groups.

In: rows of per-field blobs (from ``RecordCodec``) plus the shard's identity metadata.
Out: one published shard object, its byte size and sha256; and readers that return one
row by position with a single ranged read (Arrow: one record batch per row; Zarr: one inner
chunk per row inside a sharded array). A row is one sequence (format 1) or one batch of
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

from .errors import CacheError, ShardCorruptError
from .format import ShardInfo
from .location import Location

__all__ = ["CONTAINERS", "ShardHandle", "get_container", "shard_digest"]

_META_KEY = "logitcache"
_HASH_BLOCK = 1 << 22
_TAIL_BYTES = 1 << 16  # an Arrow footer is ~100 B + 24 B per sequence + the schema (~3 KB)


class ShardHandle(Protocol):
    metadata: dict[str, Any]
    n_rows: int

    shard_blobs: dict[str, bytes]

    def read(self, row: int) -> tuple[int, dict[str, Any]]: ...


class ArrowContainer:
    """One IPC file per shard; one record batch of one row per container row (a sequence in
    format 1, a batch of sequences in format 2).

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
        extra = {f"{_META_KEY}.{k}": v for k, v in (shard_blobs or {}).items()}
        schema = pa.schema(
            [pa.field("index", pa.int64())] + [pa.field(f, pa.binary()) for f in fields],
            metadata={_META_KEY: json.dumps(metadata), **extra},
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
        try:
            if ranged_size is not None:
                source: Any = pa.PythonFile(_RangedFile(loc, rel, ranged_size), mode="r")
            elif loc.local:
                source = pa.memory_map(where, "r")
            else:
                source = pa.PythonFile(loc.open(rel), mode="r")
            self._reader = pa.ipc.open_file(source)
            meta = self._reader.schema.metadata or {}
            raw = meta.get(_META_KEY.encode())
            self.metadata = json.loads(raw) if raw else {}
            prefix = f"{_META_KEY}.".encode()
            self.shard_blobs = {
                k[len(prefix) :].decode(): v for k, v in meta.items() if k.startswith(prefix)
            }
        except CacheError:
            raise
        except FileNotFoundError:
            raise CacheError(f"shard {rel} is missing ({where})") from None
        except (pa.ArrowInvalid, OSError, ValueError) as err:
            raise ShardCorruptError(f"shard {rel} is not a readable Arrow file: {err}") from None
        self.n_rows = self._reader.num_record_batches
        self._fields = [f for f in self._reader.schema.names if f != "index"]
        self._rel = rel

    def read(self, row: int) -> tuple[int, dict[str, Any]]:
        try:
            batch = self._reader.get_batch(row)
            index = batch.column(0)[0].as_py()
            return index, {f: batch.column(f)[0].as_buffer() for f in self._fields}
        except CacheError:  # the network, from a ranged read: not the shard's fault
            raise
        except Exception as err:  # a damaged file raises assorted pyarrow errors
            raise ShardCorruptError(f"shard {self._rel} row {row} is unreadable: {err}") from None


class _RangedFile(io.RawIOBase):
    """A read-only remote object seen as a file: its tail is fetched once on open, and
    every other read is one ranged GET of exactly the bytes asked for (pyarrow reads a
    record batch, metadata and body, in one read)."""

    def __init__(self, loc: Location, rel: str, size: int) -> None:
        super().__init__()
        self._loc, self._rel, self._size, self._pos = loc, rel, size, 0
        self._tail_start = max(0, size - _TAIL_BYTES)
        self._tail = loc.read_range(rel, self._tail_start, size)

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
            group.attrs[_META_KEY] = metadata
            for key, blob in (shard_blobs or {}).items():  # small: format 2's id table (~2 kB)
                group.attrs[f"{_META_KEY}.{key}"] = base64.b64encode(blob).decode()
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

    def open(self, loc: Location, rel: str) -> _ZarrShard:
        return _ZarrShard(loc, rel)

    def open_ranged(self, loc: Location, info: ShardInfo) -> _ZarrShard:
        """Random access to a remote shard through zarr's own ranged reads."""
        return _ZarrShard(loc, info.path)


class _ZarrShard:
    def __init__(self, loc: Location, rel: str) -> None:
        import zarr

        where = loc.url_of(rel)
        if not loc.exists(rel if loc.local else f"{rel}/zarr.json"):
            raise CacheError(f"shard {rel} is missing ({where})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if loc.local:
                    self._group = zarr.open_group(where, mode="r")
                else:
                    store = zarr.storage.FsspecStore.from_url(
                        where, storage_options=loc.fs_options, read_only=True
                    )
                    self._group = zarr.open_group(store, mode="r")
                attrs = dict(self._group.attrs)
                self.metadata = dict(attrs.get(_META_KEY, {}))
                prefix = f"{_META_KEY}."
                self.shard_blobs = {
                    k[len(prefix) :]: base64.b64decode(v, validate=True)
                    for k, v in attrs.items()
                    if k.startswith(prefix)
                }
                self._index = self._group["index"][:]
                self._fields = [k for k in self._group.array_keys() if k != "index"]
                self._arrays = {f: self._group[f] for f in self._fields}
        except Exception as err:  # zarr raises many types for a damaged group
            raise ShardCorruptError(f"shard {rel} is not a readable Zarr group: {err}") from None
        self.n_rows = int(self._index.shape[0])
        self._rel = rel

    def read(self, row: int) -> tuple[int, dict[str, Any]]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                blobs = {f: a[row : row + 1][0] for f, a in self._arrays.items()}
            return int(self._index[row]), blobs
        except Exception as err:  # zarr raises many types for a damaged chunk
            raise ShardCorruptError(f"shard {self._rel} row {row} is unreadable: {err}") from None


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
    total, outer = 0, hashlib.sha256()
    for file in sorted(loc.fs.find(path)):
        name = file[len(path) :].lstrip("/")
        size, digest = _file_digest(loc, file)
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
