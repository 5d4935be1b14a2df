"""Where a cache lives: a local directory or any fsspec URL (s3://, gs://, http(s)://, file://).

In: a path or URL. Out: a ``Location`` that reads, writes and publishes objects relative to
the cache root. Publishing is atomic: on a local disk a file is written under a temporary
name, fsynced and renamed; on an object store a single PUT is already all-or-nothing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec

from .errors import CacheError

__all__ = ["Location"]


class Location:
    """A cache root with relative-path object operations."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        url = os.fspath(url)
        self.url = url
        if "://" in url and not url.startswith("file://"):
            self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
            self.root = self.root.rstrip("/")
            self.local = False
        else:
            path = url[len("file://") :] if url.startswith("file://") else url
            self.root = str(Path(path).expanduser().absolute())
            self.fs = fsspec.filesystem("file")
            self.local = True

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise CacheError(f"{self.path(rel)} does not exist") from None

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.path(rel), mode)

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under rel; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=self.fs.isdir(path))

    def publish_bytes(self, rel: str, data: bytes) -> None:
        """Make ``rel`` hold exactly ``data``, all or nothing."""
        if not self.local:
            self.fs.pipe_file(self.path(rel), data)
            return
        with self.staged(rel) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    @contextmanager
    def staged(self, rel: str) -> Iterator[str]:
        """Yield a temporary local path beside ``rel``; on success rename it into place.

        Works for a file or a directory. The temporary name starts with ``.tmp-`` so a
        reader never lists it, and a crash leaves only such names behind.
        """
        assert self.local, "staged() is for local caches"
        final = Path(self.path(rel))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}.{uuid.uuid4().hex[:8]}"
        try:
            yield str(tmp)
            if tmp.is_dir():
                for path in sorted(tmp.rglob("*")):
                    if path.is_file():
                        _fsync_file(path)
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    def remove_stale_temporaries(self, rel_dir: str, prefix: str = "") -> int:
        """Delete ``.tmp-*`` leftovers of crashed writers under rel_dir; returns the count."""
        if not self.local:
            return 0
        count = 0
        for name in self.listdir(rel_dir):
            if name.startswith(f".tmp-{prefix}"):
                self.remove(f"{rel_dir}/{name}" if rel_dir else name)
                count += 1
        return count


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
