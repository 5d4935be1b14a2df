"""Local copies of remote shards: fetched whole ahead of the reader, checked on arrival,
evicted least-recently-used.

In: a remote ``Location`` and the manifest's ``ShardInfo``s (and, for prefetching, the order
in which a reader will need them). Out: paths of verified local copies.

A copy is named by its shard's sha256 (``objects/ab/ab12….arrow``), so a copy can never
stand in for another shard or another cache's, and two URLs of the same cache share
copies. A download goes to ``tmp/<sha>.<pid>.<random>.part``, is hashed, and only a copy
whose size and sha256 equal the manifest's is renamed into ``objects/``: a partial or
damaged download is never used. Several processes (DataLoader workers, DDP ranks) may share
one directory: a download holds a file lock (one of 256 stripes by hash), so each shard is
fetched once, and whoever comes second finds the copy. The size limit is kept after each
download by deleting the least recently used copies (use = modification time, touched on
every open); an open copy may be deleted, which POSIX allows (its reader keeps its pages).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .containers import shard_digest
from .errors import CacheError, ShardCorruptError
from .format import ShardInfo
from .location import Location

__all__ = ["DEFAULT_LOCAL_CACHE_BYTES", "Prefetcher", "ShardCache", "default_local_cache"]

DEFAULT_LOCAL_CACHE_BYTES = 20 * 10**9
"""20 GB: a few hundred 100 MB shards, room for any shuffle window on a laptop disk."""


def default_local_cache() -> Path:
    """``$LOGITCACHE_HOME/shards``, else ``~/.cache/logitcache/shards``."""
    home = os.environ.get("LOGITCACHE_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "logitcache") / "shards"


class ShardCache:
    """A size-limited directory of verified local shard copies."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.root = Path(root).expanduser() if root is not None else default_local_cache()
        self.max_bytes = DEFAULT_LOCAL_CACHE_BYTES if max_bytes is None else int(max_bytes)
        if self.max_bytes <= 0:
            raise CacheError(f"the local shard cache size must be > 0 bytes, got {max_bytes}")
        try:
            for sub in ("objects", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cannot use {self.root} as the local shard cache: {err}") from None
        self._remove_dead_partials()

    def __repr__(self) -> str:
        return f"ShardCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def object_path(self, info: ShardInfo) -> Path:
        suffix = Path(info.path).suffix
        return self.root / "objects" / info.sha256[:2] / f"{info.sha256}{suffix}"

    def lookup(self, info: ShardInfo) -> Path | None:
        """The local copy of ``info`` if there is one (and mark it used)."""
        path = self.object_path(info)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def discard(self, info: ShardInfo) -> None:
        """Delete the copy of ``info`` (found damaged by a reader)."""
        _remove(self.object_path(info))

    def fetch(self, loc: Location, info: ShardInfo) -> Path:
        """Download ``info`` from ``loc`` unless a copy exists; return the verified copy."""
        final = self.object_path(info)
        with self._lock(f"{info.sha256[:2]}.lock"):
            if self.lookup(info) is not None:
                return final
            tmp = self.root / "tmp" / f"{info.sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            try:
                if final.suffix == ".zarr":
                    loc.get_tree(info.path, tmp)
                else:
                    loc.get_file(info.path, tmp)
                size, digest = shard_digest(Location(tmp.parent), tmp.name)
                if (size, digest) != (info.bytes, info.sha256):
                    raise ShardCorruptError(
                        f"shard {loc.shown_of(info.path)} arrived damaged: sha256 {digest[:16]}… "
                        f"({size} bytes), manifest expects {info.sha256[:16]}… ({info.bytes} "
                        "bytes); the copy was discarded"
                    )
                final.parent.mkdir(exist_ok=True)
                os.replace(tmp, final)
            finally:
                _remove(tmp)
        self.evict()
        return final

    def evict(self) -> int:
        """Delete least recently used copies until the total fits; returns bytes freed."""
        with self._lock("evict.lock"):
            entries = []
            for sub in (self.root / "objects").iterdir():
                for entry in os.scandir(sub):
                    try:
                        entries.append((entry.stat().st_mtime, _tree_size(entry), entry.path))
                    except FileNotFoundError:  # evicted by another process meanwhile
                        continue
            total = sum(size for _, size, _ in entries)
            freed = 0
            # The newest copy (the one just fetched) is kept even if it alone is too big.
            for _, size, path in sorted(entries)[:-1]:
                if total - freed <= self.max_bytes:
                    break
                _remove(Path(path))
                freed += size
            return freed

    def total_bytes(self) -> int:
        return sum(
            _tree_size(e) for sub in (self.root / "objects").iterdir() for e in os.scandir(sub)
        )

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        fd = os.open(self.root / "locks" / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _remove_dead_partials(self) -> None:
        """Delete ``.part`` downloads of processes that no longer run (killed mid-download)."""
        for entry in (self.root / "tmp").iterdir():
            parts = entry.name.split(".")
            if len(parts) >= 4 and parts[1].isdigit() and not _alive(int(parts[1])):
                _remove(entry)


class Prefetcher:
    """Fetches shards on background threads in the order a reader will open them.

    ``schedule(order)`` sets the order (shard positions; a new call replaces it). At most
    ``depth`` shards past the last one the reader reached (``reached(pos)``) are fetched or
    in flight, so the local copies in use stay bounded. ``wait(pos)`` blocks until a
    scheduled shard inside that window has arrived and returns ``fetch(pos)``'s result
    (or raises its error); for any other shard it returns None at once.
    """

    def __init__(self, fetch: Callable[[int], Path], depth: int = 8, threads: int = 4) -> None:
        if depth < 1 or threads < 1:
            raise ValueError("prefetch depth and threads must be >= 1")
        self._fetch, self.depth, self.n_threads = fetch, depth, threads
        self._cond = threading.Condition()
        self._order: list[int] = []
        self._rank: dict[int, int] = {}
        self._next = 0  # rank of the next shard to start
        self._cursor = -1  # highest rank the reader has reached
        self._inflight: set[int] = set()
        self._done: dict[int, Path | BaseException] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False

    def schedule(self, order: Iterable[int]) -> None:
        with self._cond:
            self._order = list(dict.fromkeys(int(p) for p in order))
            self._rank = {p: i for i, p in enumerate(self._order)}
            self._next, self._cursor = 0, -1
            self._done.clear()
            self._cond.notify_all()
            while len(self._threads) < self.n_threads:
                thread = threading.Thread(target=self._work, daemon=True, name="prefetch")
                thread.start()
                self._threads.append(thread)

    def reached(self, pos: int) -> None:
        """The reader opens ``pos``: the window moves on if ``pos`` is inside it."""
        with self._cond:
            rank = self._rank.get(pos)
            if rank is not None and self._cursor < rank <= self._cursor + self.depth:
                self._cursor = rank
                self._cond.notify_all()

    def pending(self, pos: int) -> bool:
        """Whether ``pos`` has arrived, is in flight, or will be fetched without waiting."""
        with self._cond:
            return self._pending(pos)

    def _pending(self, pos: int) -> bool:
        if pos in self._done or pos in self._inflight:
            return True
        rank = self._rank.get(pos)
        return rank is not None and self._next <= rank <= self._cursor + self.depth

    def wait(self, pos: int) -> Path | None:
        with self._cond:
            if not self._pending(pos):
                return None
            while pos not in self._done:
                self._cond.wait()
            result = self._done.pop(pos)
        if isinstance(result, BaseException):
            raise result
        return result

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (
                    self._next < len(self._order) and self._next <= self._cursor + self.depth
                ):
                    self._cond.wait()
                if self._closed:
                    return
                pos = self._order[self._next]
                self._next += 1
                if pos in self._done or pos in self._inflight:
                    continue
                self._inflight.add(pos)
            try:
                result: Path | BaseException = self._fetch(pos)
            except BaseException as err:  # handed to the reader that waits for this shard
                result = err
            with self._cond:
                self._inflight.discard(pos)
                self._done[pos] = result
                self._cond.notify_all()

    def close(self, wait: bool = True) -> None:
        """Start no more fetches; with ``wait``, let those in flight finish (each is bounded
        by its timeouts)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()


def _tree_size(entry: os.DirEntry | Path) -> int:
    path = Path(entry)
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
