"""Reading caches, local or remote: records by global sequence index or in order.

In: a path or URL. Out: ``SequenceRecord``s, each shard checked against its sha256 and
identity metadata the first time it is opened; and ``verify_cache``, which checks all.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .containers import get_container, shard_digest
from .errors import CacheError, RemoteError, ShardCorruptError
from .format import CacheSpec, Manifest, ShardInfo
from .formats import codec_for
from .local_copies import Prefetcher, ShardCache
from .location import Location
from .record import SequenceRecord
from .tokenizer import tokenizer_problems
from .writer import read_manifest, shard_stats

__all__ = [
    "DEFAULT_PREFETCH",
    "CacheReader",
    "check_shard_digest",
    "check_shard_metadata",
    "verify_cache",
]

DEFAULT_PREFETCH = 8
"""Shards a remote reader fetches ahead of the one it reads (2 blocks of --block-shards 4)."""
_MAX_OPEN_SHARDS = 64  # open handles kept per reader; a 10,000-shard cache is never all open
_VERIFY_CACHE_BYTES = 4 * 10**9  # verify's scratch copies: the prefetch window, then deleted
_DECODED_BYTES = 128 * 2**20
"""Format 2: decoded groups kept per reader, by their arrays' bytes. A training window
(--block-shards 4 x 256 sequences) reads its sequences in random order, so each group is
decoded once only if the window's groups fit: they do for sampled caches at seq_len 256
(~0.25 MB per 16-sequence group at N=16); a top-128 window fits about half."""


class CacheReader:
    """Random and sequential access to the records of a cache, local or remote.

    Opening reads ``manifest.json`` and nothing else. A remote cache is read through a
    local shard cache (``local_cache``, default ``$LOGITCACHE_HOME/shards``, at most
    ``local_cache_bytes``, least recently used copies evicted): a shard opened whole
    (iteration, ``open_shard``, or scheduled by ``prefetch``) is downloaded once and its
    sha256 checked on arrival. ``read(i)`` of a remote shard that is neither local nor
    scheduled is a ranged read of that one sequence: it cannot check the shard's sha256,
    but checks the shard's identity metadata, the row's index and every blob's zstd
    checksum. ``prefetch`` is the number of shards fetched ahead of the reader. A local
    cache is read in place (``local_cache``, ``prefetch`` do nothing). Format 2 stores
    sequences in groups: reading one decodes (and a ranged read fetches) its group, and the
    most recently read decoded groups are kept (``_DECODED_BYTES``), so neighbours cost
    nothing more (a record read twice
    may be the same object: copy its arrays before changing them).
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
        local_cache: str | os.PathLike | None = None,
        local_cache_bytes: int | None = None,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        self.loc = Location(url, storage_options)
        self.manifest = read_manifest(self.loc)
        self.spec = self.manifest.spec
        self.verify = verify
        self.format = codec_for(self.spec)
        self.container = get_container(self.spec.container)
        self._shards = self.manifest.shards
        self._starts = np.array([s.first_sequence for s in self._shards], dtype=np.int64)
        self.prefetch_depth = prefetch
        self.shard_cache: ShardCache | None = None
        if not self.loc.local:
            self.shard_cache = ShardCache(local_cache, local_cache_bytes)
        self._verified: set[int] = set()  # positions whose sha256 this reader has checked
        self._reset()

    def _reset(self) -> None:
        """Forget open handles and background threads (also in a forked child)."""
        self._pid = os.getpid()
        self._handles: OrderedDict[int, Any] = OrderedDict()  # whole shards, local files
        self._ranged: OrderedDict[int, Any] = OrderedDict()  # remote shards read by ranges
        self._tables: OrderedDict[int, Any] = OrderedDict()  # shard tables (format 2: rank -> id)
        self._decoded: OrderedDict[tuple[int, int], list[SequenceRecord]] = OrderedDict()
        self._decoded_bytes = 0
        self._prefetcher: Prefetcher | None = None

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def __len__(self) -> int:
        return self.manifest.n_sequences

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self._shards

    def sequence_indices(self) -> np.ndarray:
        """[n_sequences] int64 global indices of all listed sequences, in order."""
        if not self._shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [np.arange(s.first_sequence, s.first_sequence + s.n_sequences) for s in self._shards]
        )

    def locate(self, index: int) -> tuple[int, int]:
        """(position in the shard list, row inside the shard) of a global sequence index."""
        pos = int(np.searchsorted(self._starts, index, side="right")) - 1
        if pos < 0 or index >= self._shards[pos].first_sequence + self._shards[pos].n_sequences:
            raise IndexError(f"sequence {index} is not in this cache")
        return pos, index - self._shards[pos].first_sequence

    # -- prefetching (remote caches) --------------------------------------------------------
    def prefetch(self, positions: Iterable[int]) -> None:
        """Fetch these shards (positions in ``shards``), in this order, in the background.

        At most ``prefetch`` shards ahead of the last one opened are fetched; a new call
        replaces the order. A no-op for a local cache or ``prefetch=0``.
        """
        if self.loc.local or self.prefetch_depth <= 0:
            return
        self._check_fork()
        if self._prefetcher is None:
            cache, loc, shards = self.shard_cache, self.loc, self._shards  # not self: see below
            depth = self.prefetch_depth
            self._prefetcher = Prefetcher(
                lambda pos: cache.fetch(loc, shards[pos]), depth=depth, threads=min(4, depth)
            )
            # its threads hold no reference to this reader, so a reader dropped without
            # close() is collected, and this stops them
            weakref.finalize(self, self._prefetcher.close, wait=False)
        self._prefetcher.schedule(positions)

    def prefetch_sequences(self, indices: Sequence[int] | np.ndarray) -> None:
        """``prefetch`` the shards of these global sequence indices, in order of first use."""
        if self.loc.local or self.prefetch_depth <= 0 or len(indices) == 0:
            return
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"prefetch_sequences takes a 1-d index array, got shape {idx.shape}")
        pos = np.searchsorted(self._starts, idx, side="right") - 1  # [n] shard positions
        _, first = np.unique(pos, return_index=True)
        order = pos[np.sort(first)]
        self.prefetch(int(p) for p in order[order >= 0])

    # -- opening shards ---------------------------------------------------------------------
    def open_shard(self, pos: int) -> Any:
        """The whole shard at ``pos``, checked; a remote one comes from the local cache."""
        self._check_fork()
        handle = self._handles.get(pos)
        if handle is not None:
            self._handles.move_to_end(pos)
            return handle
        info = self._shards[pos]
        if self.loc.local:
            if self.verify and pos not in self._verified:
                check_shard_digest(self.loc, info)
                self._verified.add(pos)
            handle = self.container.open(self.loc, info.path)
        else:
            handle = self._open_copy(pos)
        check_shard_metadata(handle, info, self.spec)
        _remember(self._handles, pos, handle)
        return handle

    def _open_copy(self, pos: int) -> Any:
        info, cache = self._shards[pos], self.shard_cache
        if self._prefetcher is not None:
            self._prefetcher.reached(pos)
        for attempt in (1, 2):
            path = self._prefetcher.wait(pos) if self._prefetcher is not None else None
            fresh = path is not None  # fetched by this process: checked on arrival
            if path is None and (path := cache.lookup(info)) is None:
                path, fresh = cache.fetch(self.loc, info), True
            try:
                if self.verify and not fresh and pos not in self._verified:
                    check_shard_digest(Location(path.parent), replace(info, path=path.name))
                handle = self.container.open(Location(path.parent), path.name)
            except CacheError:
                if attempt == 2:
                    raise
                cache.discard(info)  # damaged, or evicted by another process: fetch again
                continue
            self._verified.add(pos)
            return handle
        raise AssertionError("unreachable")

    def _handle_for_read(self, pos: int) -> Any:
        """The whole shard if it is local or scheduled, else a ranged view of it."""
        if self.loc.local or pos in self._handles:
            return self.open_shard(pos)
        self._check_fork()
        scheduled = self._prefetcher is not None and self._prefetcher.pending(pos)
        local = self.shard_cache.lookup(self._shards[pos]) is not None
        if scheduled or local or self.loc.ranges_ignored:
            return self.open_shard(pos)
        handle = self._ranged.get(pos)
        if handle is None:
            handle = self.container.open_ranged(self.loc, self._shards[pos])
            check_shard_metadata(handle, self._shards[pos], self.spec)
            _remember(self._ranged, pos, handle)
        return handle

    # -- records ----------------------------------------------------------------------------
    def read(self, index: int) -> SequenceRecord:
        pos, row = self.locate(index)
        return self._read_row(pos, row, self._handle_for_read(pos))

    def _read_row(self, pos: int, row: int, handle: Any) -> SequenceRecord:
        group, at = divmod(row, self.format.sequences_per_row)
        if not self.format.keeps_decoded:
            info = self._shards[pos]
            return self.format.decode_row(handle, info, group, lambda: self._table(pos, handle))[at]
        return self._read_group(pos, group, handle)[at]

    def _read_group(self, pos: int, group: int, handle: Any) -> list[SequenceRecord]:
        """The records of container row ``group`` of a shard (decoded once while kept)."""
        records = self._decoded.get((pos, group))
        if records is not None:
            self._decoded.move_to_end((pos, group))
            return records
        info = self._shards[pos]
        records = self.format.decode_row(handle, info, group, lambda: self._table(pos, handle))
        self._keep_decoded((pos, group), records)
        return records

    def _table(self, pos: int, handle: Any) -> Any:
        """The shard's table (format 2: its rank -> id map), decoded once while kept."""
        table = self._tables.get(pos)
        if table is None:
            table = self.format.shard_table(handle, self._shards[pos])
            _remember(self._tables, pos, table)
        return table

    def _keep_decoded(self, key: tuple[int, int], records: list[SequenceRecord]) -> None:
        """Keep a decoded group; forget the least recently read past ``_DECODED_BYTES``."""
        self._decoded[key] = records
        self._decoded_bytes += _nbytes(records)
        while self._decoded_bytes > _DECODED_BYTES and len(self._decoded) > 1:
            self._decoded_bytes -= _nbytes(self._decoded.popitem(last=False)[1])

    def iter_shard(self, pos: int) -> Iterator[SequenceRecord]:
        handle = self.open_shard(pos)
        for row in range(self._shards[pos].n_sequences):
            yield self._read_row(pos, row, handle)

    def __iter__(self) -> Iterator[SequenceRecord]:
        self.prefetch(range(len(self._shards)))
        for pos in range(len(self._shards)):
            yield from self.iter_shard(pos)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._reset()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nbytes(records: list[SequenceRecord]) -> int:
    return sum(a.nbytes for r in records for a in vars(r).values() if isinstance(a, np.ndarray))


def _remember(handles: OrderedDict, key: Any, value: Any, most: int = _MAX_OPEN_SHARDS) -> None:
    handles[key] = value
    if len(handles) > most:
        handles.popitem(last=False)


def check_shard_digest(loc: Location, info: ShardInfo) -> None:
    size, digest = shard_digest(loc, info.path)
    if digest != info.sha256 or size != info.bytes:
        raise ShardCorruptError(
            f"shard {info.path} fails its check: sha256 {digest[:16]}… ({size} bytes), manifest "
            f"expects {info.sha256[:16]}… ({info.bytes} bytes); the shard is damaged or foreign"
        )


def check_shard_metadata(handle: Any, info: ShardInfo, spec: CacheSpec) -> None:
    meta = handle.metadata
    where = f"shard {info.path}"
    if meta.get("format_version") != spec.format_version:
        raise ShardCorruptError(
            f"{where} has format version {meta.get('format_version')!r}, expected "
            f"{spec.format_version}"
        )
    if meta.get("cache_id") != spec.cache_id or meta.get("spec") != spec.to_dict():
        raise ShardCorruptError(f"{where} belongs to another cache (its identity differs)")
    expected = (info.index, info.first_sequence, info.n_sequences)
    found = (meta.get("shard_index"), meta.get("first_sequence"), meta.get("n_sequences"))
    rows = codec_for(spec).rows(info.n_sequences)
    if found != expected or handle.n_rows != rows:
        raise ShardCorruptError(
            f"{where} disagrees with the manifest: (index, first, count) {found} with "
            f"{handle.n_rows} rows, manifest says {expected} ({rows} rows)"
        )


def verify_cache(
    url: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> tuple[Manifest, list[str]]:
    """Check every shard's hash, metadata and every record, and the stored tokenizer (its
    files' hashes, then the tokenizer check of ``train``); returns (manifest, problems).

    A remote cache is checked as it is in the store: every shard is fetched (a few ahead of
    the one being decoded) into a temporary directory, hashed on arrival, decoded and
    deleted; local copies made earlier are neither trusted nor touched. An unreachable
    store raises.
    """
    with tempfile.TemporaryDirectory(prefix="logitcache-verify-") as scratch:
        options = {"storage_options": storage_options, "local_cache": scratch}
        reader = CacheReader(url, **options, local_cache_bytes=_VERIFY_CACHE_BYTES)
        try:
            reader.prefetch(range(len(reader.shards)))
            problems = []
            for pos, info in enumerate(reader.shards):
                try:
                    stats = shard_stats(list(reader.iter_shard(pos)))
                    for key in ("n_tokens", "n_positions", "n_entries"):
                        if stats[key] != getattr(info, key):
                            raise ShardCorruptError(
                                f"shard {info.path}: {key} is {stats[key]}, manifest says "
                                f"{getattr(info, key)}"
                            )
                except RemoteError:
                    raise
                except CacheError as err:
                    problems.append(str(err))
            problems += tokenizer_problems(reader.loc, reader.manifest)
        finally:
            reader.close()
    return reader.manifest, problems
