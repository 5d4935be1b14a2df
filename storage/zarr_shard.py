"""Reading a Zarr shard (a v3 group as ``ZarrContainer`` writes it) by hand, bounded.

In: a ``Location`` and the shard's relative path. Out: a handle with the shard's identity
metadata, its shard-level blobs and ``read(row) -> (index, {field: blob})``; or a one-line
``ShardCorruptError`` naming the shard.

The zarr library trusts what a group declares: an ``index`` array of shape 2**31 made it
allocate 16 GB, a 32 kB zstd chunk was inflated to 1 GiB, and a vlen-bytes chunk declares
its item count. So the writer's exact layout is the only one read, and every size is
checked before anything is allocated:

- the group holds ``zarr.json``, and per array ``NAME/zarr.json`` and at most one chunk
  ``NAME/c/0`` (the writer's default chunk key encoding), nothing else (at most
  ``_MAX_FILES`` names);
- each ``zarr.json`` is a regular file of bounded size whose content is exactly what the
  writer writes (``_index_meta``, ``_field_meta``): same shape for every array (one row per
  record, compared with the manifest before a chunk is read), same codecs and
  configurations, so no codec of the file's choosing ever runs;
- ``index/c/0`` is one zstd frame that must declare exactly ``8 * rows`` bytes;
- a field's ``c/0`` is a zarr shard: the inner chunks, then an index of ``rows`` (offset,
  length) pairs and its crc32c; every chunk must lie inside the file and hold exactly one
  vlen-bytes item (a 4-byte count of 1, a 4-byte length, the blob).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from typing import Any

import numcodecs
import numpy as np

from ._values import load_json_object
from .codecs import zstd_declared_size
from .errors import CacheError, ShardCorruptError
from .location import Location

__all__ = ["META_KEY", "ZarrShard", "list_files"]

META_KEY = "logitcache"
_MAX_FILES = 64  # the writer's: 2 + 2 per array, at most 11 fields and the index: 26
_MAX_ROWS = 1 << 24  # the format's most sequences per shard (format.py)
_GROUP_JSON_BYTES = 1 << 22  # identity metadata (the spec, a few kB) + a 2 kB id table
_ARRAY_JSON_BYTES = 1 << 16  # ~1 kB as written
_EMPTY = (1 << 64) - 1  # a zarr shard index entry for a chunk never written (fill value)
_NAME = re.compile(r"^(zarr\.json|[a-z_]{1,32}/zarr\.json|[a-z_]{1,32}/c/0)$")


def _array(rows: int, dtype: str, fill: Any, codecs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "shape": [rows],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


_LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}


def _index_meta(rows: int) -> dict[str, Any]:
    zstd = {"name": "zstd", "configuration": {"level": 0, "checksum": False}}
    return _array(rows, "int64", 0, [_LITTLE, zstd])


def _field_meta(rows: int) -> dict[str, Any]:
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [1],
            "codecs": [{"name": "vlen-bytes", "configuration": {}}],
            "index_codecs": [_LITTLE, {"name": "crc32c"}],
            "index_location": "end",
        },
    }
    return _array(rows, "variable_length_bytes", "", [sharding])


def list_files(loc: Location, rel: str, most: int) -> list[str]:
    """Paths, relative to ``rel``, of the files under the directory ``rel`` (sorted), but
    no more than ``most + 1`` of them locally: a directory of a million files is refused
    without listing it all. A remote listing is what the store returns."""
    if not loc.local:
        return loc.find(rel)
    root, found = loc.path(rel), []
    if not os.path.isdir(root):
        return [""] if os.path.lexists(root) else []
    stack = [root]
    while stack and len(found) <= most:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    found.append(os.path.relpath(entry.path, root).replace(os.sep, "/"))
                if len(found) > most:
                    break
    return sorted(found)


class ZarrShard:
    """A Zarr shard opened for reading rows (``n_rows`` from its arrays' common shape)."""

    def __init__(self, loc: Location, rel: str) -> None:
        self._loc, self._rel, self._where = loc, rel, f"shard {rel}"
        names = list_files(loc, rel, _MAX_FILES)
        if not names:
            raise CacheError(f"shard {rel} is missing ({loc.url_of(rel)})")
        if len(names) > _MAX_FILES or not all(_NAME.match(n) for n in names):
            odd = next((n for n in names if not _NAME.match(n)), f"over {_MAX_FILES} files")
            raise self._bad(f"it holds {odd!r}, which a shard never has")
        group = self._json("zarr.json", _GROUP_JSON_BYTES)
        attrs = group.get("attributes")
        if set(group) != {"attributes", "zarr_format", "node_type"} or not isinstance(attrs, dict):
            raise self._bad("its zarr.json is not a zarr v3 group's")
        if (group["zarr_format"], group["node_type"]) != (3, "group"):
            raise self._bad("its zarr.json is not a zarr v3 group's")
        self.metadata = attrs.get(META_KEY, {})
        if not isinstance(self.metadata, dict):
            raise self._bad("its identity metadata is not an object")
        try:
            prefix = f"{META_KEY}."
            self.shard_blobs = {
                k[len(prefix) :]: base64.b64decode(v, validate=True)
                for k, v in attrs.items()
                if k.startswith(prefix)
            }
        except (binascii.Error, TypeError, ValueError) as err:
            raise self._bad(f"a shard-level blob is not base64: {err}") from None
        arrays = sorted({n.split("/")[0] for n in names if "/" in n})
        if "index" not in arrays or any(f"{a}/zarr.json" not in names for a in arrays):
            raise self._bad("it lacks an array's zarr.json")
        index = self._json("index/zarr.json", _ARRAY_JSON_BYTES)
        shape = index.get("shape")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)):
            raise self._bad("its index array's shape is not one length")
        self.n_rows = shape[0]
        if not 0 < self.n_rows <= _MAX_ROWS or index != _index_meta(self.n_rows):
            raise self._bad("its index array is not laid out as a shard's (zarr.json differs)")
        self._fields = [a for a in arrays if a != "index"]
        for name in self._fields:
            if self._json(f"{name}/zarr.json", _ARRAY_JSON_BYTES) != _field_meta(self.n_rows):
                raise self._bad(f"its array {name!r} is not laid out as a shard's field")
        self._chunks = {a for a in arrays if f"{a}/c/0" in names}
        self._index: np.ndarray | None = None
        self._offsets: dict[str, np.ndarray] = {}

    def _bad(self, what: str) -> ShardCorruptError:
        return ShardCorruptError(f"{self._where} is not a readable Zarr group: {what}")

    def _bytes(self, name: str, limit: int) -> bytes:
        """A file of the group, read whole (a regular file of at most ``limit`` bytes)."""
        try:
            return self._loc.read_bytes(f"{self._rel}/{name}", limit=limit)
        except CacheError as err:
            raise self._bad(f"{name}: {err}") from None

    def _json(self, name: str, limit: int) -> dict[str, Any]:
        data = self._bytes(name, limit)
        try:
            return load_json_object(data, name)
        except CacheError as err:
            raise self._bad(str(err)) from None

    # -- rows ---------------------------------------------------------------------------
    def read(self, row: int) -> tuple[int, dict[str, Any]]:
        if not 0 <= row < self.n_rows:
            raise ShardCorruptError(f"{self._where} has no row {row}")
        if self._index is None:
            self._index = self._read_index()
        return int(self._index[row]), {f: self._blob(f, row) for f in self._fields}

    def _read_index(self) -> np.ndarray:
        """[rows] int64 sequence indices (an all-zero index has no chunk: its fill value)."""
        if "index" not in self._chunks:
            return np.zeros(self.n_rows, dtype=np.int64)
        size = 8 * self.n_rows
        frame = self._bytes("index/c/0", size + 64 + size // 128)  # zstd's worst case
        declared = zstd_declared_size(frame)
        if declared != size:
            raise self._bad(f"index/c/0: its zstd frame declares {declared} bytes, not {size}")
        try:
            data = numcodecs.Zstd().decode(frame)
        except Exception as err:  # zstd raises assorted types on garbage
            raise self._bad(f"index/c/0 does not decode: {err}") from None
        if len(data) != size:
            raise self._bad(f"index/c/0 holds {len(data)} bytes, not {size}")
        return np.frombuffer(data, dtype="<i8")

    def _chunk_offsets(self, name: str) -> np.ndarray:
        """[rows, 2] uint64 (offset, length) of each row's chunk in ``name/c/0``, checked."""
        rel = f"{self._rel}/{name}/c/0"
        self._check_regular(rel)
        size, index_bytes = self._loc.size(rel), 16 * self.n_rows + 4
        if size < index_bytes:
            raise self._bad(f"{name}/c/0 is {size} bytes, shorter than its index")
        tail = self._loc.read_range(rel, size - index_bytes, size)
        import google_crc32c  # zarr's own crc32c (a dependency of zarr)

        crc = np.uint32(google_crc32c.value(tail[:-4])).tobytes()
        if crc != tail[-4:]:
            raise self._bad(f"{name}/c/0: its chunk index fails its crc32c")
        pairs = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.n_rows, 2)
        empty = (pairs == _EMPTY).all(axis=1)
        offset, length, end = pairs[:, 0], pairs[:, 1], np.uint64(size - index_bytes)
        with np.errstate(over="ignore"):  # end - length wraps only where length > end
            bad = ~empty & ((length < 8) | (length > end) | (offset > end - length))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self._bad(f"{name}/c/0: the chunk of row {row} lies outside the file")
        return pairs

    def _blob(self, name: str, row: int) -> bytes:
        if name not in self._chunks:
            return b""
        if name not in self._offsets:
            self._offsets[name] = self._chunk_offsets(name)
        offset, length = (int(x) for x in self._offsets[name][row])
        if offset == _EMPTY:
            return b""
        data = self._loc.read_range(f"{self._rel}/{name}/c/0", offset, offset + length)
        count, size = np.frombuffer(data[:8], dtype="<u4")
        if count != 1 or size != length - 8:
            raise ShardCorruptError(
                f"{self._where} row {row}: field {name!r} holds {count} items of "
                f"{size} bytes in a {length}-byte chunk, not one blob"
            )
        return data[8:]

    def _check_regular(self, rel: str) -> None:
        """A local chunk must be a regular file (a FIFO would block, /dev/zero never ends)."""
        if self._loc.local:
            path = self._loc.path(rel)
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise self._bad(f"{rel} is not a regular file; refusing to read it")
