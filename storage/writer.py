"""Writing whole caches: shards plus ``manifest.json`` (the reader is ``reader.py``).

In: a ``CacheSpec`` and, per shard, its ``SequenceRecord``s. Out: published shard objects
and a manifest rewritten after each one, listing completed shards only.

Parallel writers (torchrun ranks, cluster job arrays) each own the shards ``j`` with
``j % num_workers == worker`` and record them in ``parts/worker-I-of-N.json``; whichever
worker finishes last (or ``logitcache merge``) writes the complete ``manifest.json``.
Shard contents depend only on sequence indices, so any worker count gives the same bytes.
On a local disk a file lock refuses a second process for the same worker; object stores
have no locks, so there the rule is one process per (worker index, worker count) at a time
(two would publish identical shards, but each could drop the other's from its part file).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import stat
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from logitcache.core.version import __version__

from .containers import get_container
from .errors import CacheError
from .format import MANIFEST_BYTES, CacheSpec, Manifest, ShardInfo, diff_specs
from .formats import codec_for
from .formats.base import Mapper
from .location import Location
from .record import SequenceRecord

__all__ = [
    "MANIFEST",
    "PARTS",
    "CacheWriter",
    "WorkerView",
    "default_encode_threads",
    "merge_parts",
    "part_names",
    "read_manifest",
    "shard_stats",
    "stored_manifests",
]

MANIFEST = "manifest.json"
PARTS = "parts"
SHARDS = "shards"
MAX_ENCODE_THREADS = 8
_PART_RE = re.compile(r"^worker-(\d+)-of-(\d+)\.json$")


def shard_name(index: int, suffix: str) -> str:
    return f"{SHARDS}/shard-{index:06d}{suffix}"


def read_manifest(loc: Location, rel: str = MANIFEST) -> Manifest:
    """``manifest.json`` (or a worker's part, ``rel``), read with one bounded GET (opening a
    remote cache lists nothing): larger than ``MANIFEST_BYTES``, or not a regular file, it is
    refused unread."""
    data = loc.read_if_exists(rel, limit=MANIFEST_BYTES)
    if data is None and loc.local and os.path.isfile(loc.root):
        raise CacheError(f"cannot read {loc.url_of(rel)}: Not a directory ({loc.root} is a file)")
    if data is None:
        raise CacheError(
            f"no {rel} at {loc.shown_of(rel)}: not a logitcache cache, or its teacher pass has "
            "not completed a shard yet"
        )
    manifest = Manifest.from_json(data, where=loc.shown_of(rel))
    if rel == MANIFEST:
        manifest.check_listing(loc.shown_of(rel))
    return manifest


def shard_stats(records: Sequence[SequenceRecord], map_: Mapper = map) -> dict[str, float | int]:
    """A shard's manifest statistics; ``map_`` (an executor's) computes each record's in
    parallel, summed in record order (the same floats as one loop)."""
    n_tokens = sum(r.n_tokens for r in records)
    covered = entropy = 0.0
    for record_covered, record_entropy in map_(_record_stats, records):
        if record_covered is not None:
            covered += record_covered
        entropy += record_entropy
    return {
        "n_sequences": len(records),
        "n_tokens": n_tokens,
        "n_positions": n_tokens - len(records),
        "n_entries": sum(int(r.n_entries.sum()) for r in records),
        "covered_mass": covered,
        "entropy": entropy,
    }


def _record_stats(r: SequenceRecord) -> tuple[float | None, float]:
    """(covered mass, entropy of the stored entries) of one record; covered is None where
    it stores no tail mass (a format 2 sampled record read back)."""
    covered = None
    if r.tail_mass is not None:
        covered = float(np.sum(1.0 - r.tail_mass, dtype=np.float64))
    p = r.target_probs().astype(np.float64)
    return covered, float(-np.sum(p * np.log(np.where(p > 0, p, 1.0))))


def default_encode_threads() -> int:
    """Threads a writer encodes with: this process's CPUs, at most 8 (zstd and numpy run
    outside the GIL; one thread sustains ~60 k tokens/s at N=64, docs/benchmarks.md)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 2
    return max(2, min(MAX_ENCODE_THREADS, cpus))


class WorkerView:
    """Which shards one worker owns and which of them the manifest it holds lists as done."""

    manifest: Manifest
    worker: int
    num_workers: int

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def owns(self, shard: int) -> bool:
        return shard % self.num_workers == self.worker

    def is_done(self, shard: int) -> bool:
        return any(s.index == shard for s in self.manifest.shards)


class CacheWriter(WorkerView):
    """Publishes the shards of one worker and keeps the manifest (or its part) current.

    Use as a context manager; ``write_shard`` may be called from a writer thread.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        spec: CacheSpec,
        *,
        worker: int = 0,
        num_workers: int = 1,
        storage_options: dict[str, Any] | None = None,
        encode_threads: int | None = None,
    ) -> None:
        if not 0 <= worker < num_workers:
            raise CacheError(f"worker index {worker} is outside 0..{num_workers - 1}")
        self.loc = Location(url, storage_options)
        self.loc.check_writable()
        self.spec = spec
        self.shard_sequences = spec.shard_sequences
        self.worker, self.num_workers = worker, num_workers
        self.container = get_container(spec.container)
        self.format = codec_for(spec)
        threads = default_encode_threads() if encode_threads is None else max(1, encode_threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="encode")
        self._lock_fd: int | None = None
        self._tokenizer: Any = None
        # A run that fails before its first shard (an empty corpus) removes what it made.
        self._fresh = self.loc.local and num_workers == 1 and not self.loc.listdir("")
        self._root_existed = self.loc.exists()
        self.loc.makedirs()
        self._acquire_lock()
        try:
            self.manifest = self._existing_manifest()
            self.loc.makedirs(SHARDS)
            self._remove_stale_temporaries()
        except BaseException:
            self.close()  # a refused writer must not keep holding the lock
            raise

    # -- setup ----------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        if not self.loc.local:
            return
        self.loc.makedirs(".locks")
        path = self.loc.path(f".locks/worker-{self.worker}-of-{self.num_workers}.lock")
        # never through a link (a dangling one would create a file outside the cache), never
        # blocking on a FIFO, and only on a regular file
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as err:
            raise CacheError(f"cannot take the lock {path}: {err.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheError(f"the lock {path} is not a regular file; delete it and rerun")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(
                f"another process is writing worker {self.worker} of {self.num_workers} into "
                f"{self.loc.shown} (lock {path}); wait for it or choose another output"
            ) from None
        self._lock_fd = fd

    def _existing_manifest(self) -> Manifest:
        main, parts = stored_manifests(self.loc)
        merged = Manifest(spec=self.spec, created_by=f"logitcache {__version__}")
        for old in ([main] if main else []) + parts:
            if old.format_version != self.spec.format_version:
                raise CacheError(
                    f"{self.loc.shown} already holds a format {old.format_version} cache; "
                    f"resume it with --format-version {old.format_version}, or use another --out"
                )
            if old.spec.to_dict() != self.spec.to_dict():  # JSON form: tuples == lists
                changes = "; ".join(diff_specs(old.spec, self.spec)[:8])
                raise CacheError(
                    f"{self.loc.shown} already holds a cache made with other settings: {changes}. "
                    "Use another --out, or delete it to start over"
                )
            for info in old.shards:
                merged = merged.with_shard(info)
            if old.tokenizer_files:
                merged = replace(merged, tokenizer_files=old.tokenizer_files)
            # Only manifest.json speaks for the whole cache: a part marked complete says that
            # one worker is done, not that the others are.
            if old.complete and old is main:
                merged = replace(merged, complete=True, n_sequences_total=old.n_sequences_total)
        return merged

    def _remove_stale_temporaries(self) -> None:
        if not self.loc.local:
            return  # remote shards are staged locally: no temporaries exist there
        for name in self.loc.listdir(SHARDS):
            match = re.match(r"^\.tmp-shard-(\d+)\.", name)
            if match and self.owns(int(match.group(1))):
                self.loc.remove(f"{SHARDS}/{name}")
        # A writer killed while rewriting its manifest leaves the partial one beside it.
        if self.num_workers == 1:
            self.loc.remove_stale_temporaries("", prefix=f"{MANIFEST}.")
        else:
            part = f"worker-{self.worker:05d}-of-{self.num_workers:05d}.json."
            self.loc.remove_stale_temporaries(PARTS, prefix=part)

    # -- state ----------------------------------------------------------------------

    def shard_of(self, sequence_index: int) -> int:
        return sequence_index // self.shard_sequences

    # -- writing --------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Store the tokenizer's files in the cache (anything with ``save_pretrained``): they
        are written just before the first manifest that lists them."""
        self._tokenizer = tokenizer

    def write_shard(
        self,
        shard: int,
        records: Sequence[SequenceRecord],
        stats: Mapping[str, float] | None = None,
    ) -> ShardInfo:
        """Encode, publish and list one shard; its records must be its exact sequences.

        ``stats`` replaces the shard's ``covered_mass`` / ``entropy`` computed from the records
        (a converted cache keeps its source's, computed before quantization)."""
        first = shard * self.shard_sequences
        indices = [r.index for r in records]
        if not records or indices != list(range(first, first + len(records))):
            raise CacheError(f"shard {shard} must hold sequences {first}.. in order")
        if len(records) > self.shard_sequences:
            raise CacheError(f"shard {shard} has {len(records)} > {self.shard_sequences} sequences")
        rows, row_indices, shard_blobs = self.format.encode_shard(records, self._pool.map)
        rel = shard_name(shard, self.container.suffix)
        metadata = {
            "format_version": self.spec.format_version,
            "cache_id": self.spec.cache_id,
            "spec": self.spec.to_dict(),
            "shard_index": shard,
            "first_sequence": first,
            "n_sequences": len(records),
        }
        size, digest = self.container.write(
            self.loc, rel, metadata, row_indices, rows, self.format.fields, shard_blobs
        )
        info = ShardInfo(
            index=shard,
            path=rel,
            first_sequence=first,
            bytes=size,
            sha256=digest,
            **(shard_stats(records, self._pool.map) | dict(stats or {})),
        )
        self.manifest = self.manifest.with_shard(info)
        self._publish_manifest()
        return info

    def finish(self, n_sequences_total: int) -> Manifest | None:
        """Record that this worker is done; returns the complete manifest if all are."""
        self.manifest = replace(self.manifest, n_sequences_total=n_sequences_total)
        if self.num_workers == 1:
            n_missing, missing = _missing_shards(self.manifest, self.shard_sequences)
            if n_missing:
                raise CacheError(f"cannot finish: shards {missing} are not written in full")
            self.manifest = replace(self.manifest, complete=True)
            self._publish_manifest()
            return self.manifest
        self._publish_manifest(part_complete=True)
        try:
            return merge_parts(self.loc.url, self.loc.storage_options)
        except CacheError:
            return None  # other workers are still running; the last one merges

    def _publish_manifest(self, part_complete: bool = False) -> None:
        if self._tokenizer is not None:
            from .tokenizer_files import check_tokenizer_files, write_tokenizer_files

            # A resumed run keeps the files a previous one stored (the spec, and so the
            # fingerprint, is the same): rewriting them could change their bytes.
            kept = self.manifest.tokenizer_files
            if not kept or check_tokenizer_files(self.loc, self.manifest):
                files = write_tokenizer_files(self.loc, self._tokenizer)
                self.manifest = replace(self.manifest, tokenizer_files=files)
            self._tokenizer = None
        if self.num_workers == 1:
            self.loc.publish_bytes(MANIFEST, self.manifest.to_json().encode())
            return
        mine = replace(
            self.manifest,
            shards=tuple(s for s in self.manifest.shards if self.owns(s.index)),
            complete=part_complete,
        )
        self.loc.makedirs(PARTS)
        name = f"{PARTS}/worker-{self.worker:05d}-of-{self.num_workers:05d}.json"
        self.loc.publish_bytes(name, mine.to_json().encode())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close()
        if exc_type is not None and self._fresh and not self.manifest.shards:
            self._remove_stub()

    def _remove_stub(self) -> None:
        """Delete the empty directories a failed first run made (``.locks/``, ``shards/``)."""
        if self.loc.exists(MANIFEST) or self.loc.listdir(SHARDS):
            return
        for name in (".locks", SHARDS):
            self.loc.remove(name)
        if not self._root_existed and not self.loc.listdir(""):
            os.rmdir(self.loc.root)


def part_names(loc: Location) -> list[str]:
    """The workers' part manifests under ``parts/`` (``worker-I-of-N.json``), no temporaries."""
    return [n for n in loc.listdir(PARTS) if _PART_RE.match(n)]


def stored_manifests(loc: Location) -> tuple[Manifest | None, list[Manifest]]:
    """What a cache location already holds: its ``manifest.json`` (None if none yet) and every
    worker's part manifest."""
    main = read_manifest(loc) if loc.exists(MANIFEST) else None
    return main, [read_manifest(loc, f"{PARTS}/{n}") for n in part_names(loc)]


def _missing_shards(
    manifest: Manifest, shard_sequences: int, show: int = 10
) -> tuple[int, list[int]]:
    """(number of shards of the corpus not listed in full, the first ``show`` of them).

    Linear in the listed shards, not in the declared total: a part file claiming 10**15
    sequences gets an answer, not a 10**15-step loop.
    """
    total = manifest.n_sequences_total
    if total is None:
        return 1, [-1]
    n_shards = -(-total // shard_sequences)
    have = {
        s.index
        for s in manifest.shards
        if s.index < n_shards
        and s.n_sequences == min(shard_sequences, total - s.index * shard_sequences)
    }
    first = list(itertools.islice((j for j in range(n_shards) if j not in have), show))
    return n_shards - len(have), first


def merge_parts(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Combine the workers' part manifests into a complete ``manifest.json``.

    Raises CacheError naming what is missing if some worker has not finished.
    """
    loc = Location(url, storage_options)
    names = part_names(loc)
    if not names:
        if loc.exists(MANIFEST):
            return read_manifest(loc)
        raise CacheError(f"no worker manifests under {loc.path(PARTS)}: nothing to merge")
    parts = [read_manifest(loc, f"{PARTS}/{n}") for n in names]
    spec = parts[0].spec
    merged = Manifest(spec=spec, created_by=f"logitcache {__version__}")
    totals = set()
    for name, part in zip(names, parts):
        if part.spec.to_dict() != spec.to_dict():
            changes = diff_specs(spec, part.spec)
            raise CacheError(f"{PARTS}/{name} belongs to another cache: {changes}")
        if part.tokenizer_files:
            merged = replace(merged, tokenizer_files=part.tokenizer_files)
        for info in part.shards:
            clash = [s for s in merged.shards if s.index == info.index and s.sha256 != info.sha256]
            if clash:
                raise CacheError(f"shard {info.index} is listed twice with different hashes")
            merged = merged.with_shard(info)
        if part.complete:
            totals.add(part.n_sequences_total)
    if len(totals) > 1:
        raise CacheError(f"workers disagree on the corpus size: {sorted(totals)}")
    waiting = [n for n, p in zip(names, parts) if not p.complete]
    if not totals:
        raise CacheError(f"workers still running: {', '.join(waiting) or 'unknown'}")
    merged = replace(merged, n_sequences_total=totals.pop())
    n_missing, missing = _missing_shards(merged, spec.shard_sequences, show=5)
    if n_missing:
        counts = {int(m.group(2)) for m in map(_PART_RE.match, names)}
        owners = sorted({f"worker {j % n} of {n}" for j in missing for n in counts})
        raise CacheError(
            f"cannot merge yet: {n_missing} shard{'s' * (n_missing != 1)} missing (first: "
            f"{missing}, owned by "
            f"{', '.join(owners)}); unfinished workers: {', '.join(waiting) or 'none'}; run "
            "the missing workers (the same precompute command with their --worker-index)"
        )
    merged = replace(merged, complete=True)
    if merged.tokenizer_files:  # every worker saved them: list the copies that are there
        from .tokenizer_files import restate_tokenizer_files

        files = restate_tokenizer_files(loc, merged.tokenizer_files)
        merged = replace(merged, tokenizer_files=files)
    loc.publish_bytes(MANIFEST, merged.to_json().encode())
    return merged
