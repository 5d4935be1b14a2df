"""The teacher pass's writer stage: finished shards in, published shards out, off its thread.

In: a ``CacheWriter`` and (shard index, records) pairs from the teacher's thread. Out: each
shard encoded and published by a writer thread (its batches' fields compressed in the
``CacheWriter``'s encode threads, zstd outside the GIL), counted in ``shards_written`` and
``bytes_written``. The first error is kept in ``errors`` and sets ``stop``, which the teacher's
thread watches; a full disk becomes a one-line message that says how to resume.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Sequence
from typing import Any

from logitcache.core.errors import LogitcacheError
from logitcache.storage import CacheWriter, SequenceRecord

__all__ = ["ShardWriter"]

_END = object()


class ShardWriter:
    """A writer thread fed through a short queue (``depth`` shards wait at most)."""

    def __init__(
        self,
        writer: CacheWriter,
        out: Any,
        *,
        depth: int = 2,
        stop: threading.Event | None = None,
        errors: list[BaseException] | None = None,
    ) -> None:
        self.writer, self.out = writer, out
        self.stop = stop if stop is not None else threading.Event()
        self.errors = errors if errors is not None else []
        self.shards_written = 0
        self.bytes_written = 0
        self._inbox: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._write, daemon=True, name="write")

    def __enter__(self) -> ShardWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, shard: int, records: Sequence[SequenceRecord]) -> None:
        """Queue one shard's records; waits while the queue is full, gives up on a stop."""
        while not self.stop.is_set():
            try:
                self._inbox.put((shard, records), timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Let the thread finish what is queued (unless it died) and wait for it."""
        while self._thread.is_alive():
            try:
                self._inbox.put(_END, timeout=0.2)
                break
            except queue.Full:
                continue
        if self._thread.ident is not None:
            self._thread.join()

    def _write(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _END:
                return
            shard, records = item
            try:
                info = self.writer.write_shard(shard, records)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    err = LogitcacheError(
                        f"disk full while writing shard {shard} to {self.out}: the partial "
                        "shard was discarded; free space and rerun the same command to resume"
                    )
                self._fail(err)
                return
            except BaseException as err:
                self._fail(err)
                return
            self.shards_written += 1
            self.bytes_written += info.bytes

    def _fail(self, err: BaseException) -> None:
        self.errors.append(err)
        self.stop.set()
