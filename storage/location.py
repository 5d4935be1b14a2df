"""Where a cache lives: a local directory or any fsspec URL (s3://, gs://, http(s)://, hf://).

In: a path or URL (and optional fsspec storage options). Out: a ``Location`` that reads,
writes and publishes objects relative to the cache root, and turns the failures of
fsspec, s3fs and aiohttp into one-line ``CacheError``s naming the URL.

Publishing is atomic: on a local disk a file is written under a temporary name, fsynced
and renamed; on an object store a single PUT is already all-or-nothing. A directory (a
Zarr shard) is uploaded file by file and becomes visible only when the manifest lists it.

Remote access adds nothing that fsspec does itself: credentials and endpoints come from
the usual places (``AWS_*`` variables, ``~/.aws``, instance roles, ``FSSPEC_<PROTOCOL>``
fsspec configuration). logitcache sets only timeouts and a bounded number of attempts
(``$LOGITCACHE_TIMEOUT`` seconds per request, default 30; ``$LOGITCACHE_RETRIES``
attempts, default 3), so an unreachable server is an error after a bounded time, never a
hang. botocore retries S3 requests itself; fsspec's HTTP and huggingface_hub's
``HfFileSystem`` do not retry every call, so calls over http(s) and ``hf://`` are retried
here (``storage/remote.py`` says which failures are temporary). ``hf://datasets/ORG/NAME``
is read-only here: ``logitcache push`` writes it in batched commits (``storage/hub.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec

from logitcache.core.errors import LogitcacheError
from logitcache.core.untrusted import read_local, redact

from .errors import CacheError, RemoteError
from .remote import (
    HTTP,
    RETRIED_PROTOCOLS,
    backoff_s,
    classify,
    credentials_hint,
    default_options,
    merge_options,
    parse_hub_url,
    remote_settings,
    short,
)

__all__ = ["Location"]

_T = TypeVar("_T")


class Location:
    """A cache root with relative-path object operations."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        url = os.fspath(url)
        self.url = url
        """The URL as given, credentials included: for connecting only, never for a message."""
        self.shown = redact(url)
        """The URL with any credentials in it replaced by ``***``: for messages and files."""
        self._query = ""
        self.storage_options = dict(storage_options or {})
        self._pid = os.getpid()
        self.ranges_ignored = False
        """Set once the server answered a ranged read with the whole object."""
        if "://" in url and not url.startswith("file://"):
            self.protocol = url.split("://", 1)[0].lower()
            self.local = False
            self.timeout, self.retries = remote_settings()
            self._fs, self.root = self._connect()
        else:
            path = url[len("file://") :] if url.startswith("file://") else url
            self.protocol = "file"
            self.root = str(Path(path).expanduser().absolute())
            self._fs = fsspec.filesystem("file")
            self.local = True

    def __repr__(self) -> str:
        return f"Location({self.shown!r})"

    # -- connection -------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem; a fresh one after a fork (an aiohttp session is not fork-safe)."""
        if not self.local and self._pid != os.getpid():
            self._fs, self.root = self._connect()
            self._pid = os.getpid()
        return self._fs

    @property
    def fs_options(self) -> dict[str, Any]:
        """The storage options in effect: logitcache's timeouts, fsspec config, the caller's."""
        if self.local:
            return dict(self.storage_options)
        return merge_options(
            default_options(self.protocol, self.timeout, self.retries),
            fsspec.config.conf.get(self.protocol, {}),
            self.storage_options,
        )

    def _connect(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self.protocol == "hf":
            parse_hub_url(self.url)  # malformed: one redacted line, not a traceback
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self.fs_options)
        except ImportError as err:
            raise CacheError(f"cannot open {self.shown}: {redact(str(err))}") from None
        except (ValueError, TypeError) as err:
            raise CacheError(f"cannot open {self.shown}: {redact(str(err))}") from None
        if self.protocol in HTTP and "?" in root:
            # http://host/cache?token=...: every object of the cache is asked for with the
            # same query (a signed or token-protected folder), after its own path
            root, query = root.split("?", 1)
            self._query = f"?{query}"
        if self.protocol in ("s3", "s3a"):
            # botocore already retries (config_kwargs retries.max_attempts); s3fs's own loop
            # on top would multiply the attempts and the time to give up on a dead endpoint.
            fs.retries = 1
        return fs, root.rstrip("/")

    def _call(self, rel: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` with remote failures turned into CacheErrors.

        FileNotFoundError passes through (callers decide what a missing object means).
        Reads over http(s) are retried on transient failures; other protocols retry in
        their own client.
        """
        if self.local:
            return fn(*args, **kwargs)
        attempts = self.retries if self.protocol in RETRIED_PROTOCOLS else 1
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # classified below; anything unknown is re-raised
                kind = classify(err)
                if kind == "missing":
                    raise FileNotFoundError(f"{self.shown_of(rel)}: {redact(short(err))}") from None
                if kind == "transient" and attempt < attempts:
                    time.sleep(backoff_s(err, attempt))
                    continue
                if kind == "other":
                    raise
                raise self._error(err, kind, rel, attempt) from None
        raise AssertionError("unreachable")

    def _error(self, err: BaseException, kind: str, rel: str, attempts: int) -> CacheError:
        where = self.shown_of(rel)
        if kind == "norepo":
            return RemoteError(
                f"{self.shown}: no such Hub repository or revision, or it is private or gated "
                f"and the token in use cannot read it ({redact(short(err))}); check the name, or "
                f"{credentials_hint(self.protocol)}"
            )
        if kind == "credentials":
            return RemoteError(f"no credentials for {where}: {credentials_hint(self.protocol)}")
        if kind == "denied":
            return RemoteError(
                f"access to {where} was denied ({redact(short(err))}): the credentials in use lack "
                "permission for it, or the URL is wrong"
            )
        if self.protocol == "hf":  # huggingface_hub keeps its own timeouts and retries
            each, knobs = "each retried by huggingface_hub too", "LOGITCACHE_RETRIES"
        else:
            each, knobs = (
                f"{self.timeout:g} s timeout each",
                "LOGITCACHE_TIMEOUT / LOGITCACHE_RETRIES",
            )
        return RemoteError(
            f"cannot reach {where} after {attempts} attempt{'s' * (attempts > 1)} ({each}): "
            f"{redact(short(err))}; check the URL and the network, or raise {knobs}"
        )

    def check_writable(self) -> None:
        if self.protocol == "hf":
            raise CacheError(
                f"cannot write to {self.shown} file by file (one Hub commit per file): write the "
                f"cache to a directory, then `logitcache push DIR {self.shown}` (batched commits)"
            )
        if self.protocol in HTTP:
            raise CacheError(
                f"cannot write to {self.shown}: http(s) is read-only; write to a directory or an "
                "object store (s3://, gs://, ...) and serve that over HTTP"
            )

    # -- objects ------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """What the filesystem is asked for: ``rel`` under the root (and the URL's query)."""
        return self._bare(rel) + self._query

    def _bare(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        """A full URL (or local path) of ``rel``, credentials included: for zarr and pyarrow
        to open. Messages name ``shown_of(rel)``."""
        path = self.path(rel)
        if self.local or "://" in path:
            return path
        return f"{self.protocol}://{path}"

    def shown_of(self, rel: str) -> str:
        """``url_of(rel)`` with credentials replaced by ``***``: what messages name."""
        return redact(self.url_of(rel))

    def exists(self, rel: str = "") -> bool:
        if self.local:
            return self.fs.exists(self.path(rel))
        try:
            self._call(rel, self.fs.info, self.path(rel))
        except FileNotFoundError:
            return False
        return True

    def size(self, rel: str) -> int:
        return int(self._call(rel, self.fs.size, self.path(rel)))

    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """The object's bytes; with ``limit``, refused (one line) past ``limit`` bytes."""
        data = self.read_if_exists(rel, limit)
        if data is None:
            raise CacheError(f"{self.shown_of(rel)} does not exist")
        return data

    def read_if_exists(self, rel: str, limit: int | None = None) -> bytes | None:
        """The object's bytes, or None if there is none (one GET, no existence check).

        With ``limit`` (what a cache may hold there), a local file must be a regular file
        and is read by ``read_local``; a remote object is fetched with a ranged GET of at
        most ``limit + 1`` bytes. Either way more than ``limit`` bytes is a one-line error,
        decided before the bytes are held in memory.
        """
        if limit is not None and self.local:
            path = self.path(rel)
            if not os.path.lexists(path):
                return None
            try:
                return read_local(path, limit, what="cache file")
            except LogitcacheError as err:
                raise CacheError(str(err)) from None
        try:
            if limit is None:
                return self._call(rel, self.fs.cat_file, self.path(rel))
            data = self._call(rel, self.fs.cat_file, self.path(rel), start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise CacheError(
                f"{self.shown_of(rel)} holds more than the {limit:,} bytes a cache may hold "
                "there; refusing to read it"
            )
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object: one ranged GET on a remote store."""
        try:
            data = self._call(rel, self.fs.cat_file, self.path(rel), start=start, end=end)
        except FileNotFoundError:
            raise CacheError(f"{self.shown_of(rel)} does not exist") from None
        if len(data) >= end > start and len(data) != end - start:
            # a server without Range support answers 200 with the whole object (fsspec does
            # not cut it); the bytes are right, only wasteful: readers fetch whole shards then
            self.ranges_ignored = True
            return data[start:end]
        if len(data) != end - start:
            raise CacheError(
                f"{self.shown_of(rel)}: asked for bytes {start}..{end}, got {len(data)}: the "
                "object is shorter than its manifest says, or the server ignores Range requests"
            )
        return data

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.path(rel), mode)

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under rel; empty if it does not exist."""
        try:
            entries = self._call(rel, self.fs.ls, self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def find(self, rel: str) -> list[str]:
        """Paths, relative to ``rel``, of every file under ``rel`` (sorted)."""
        base = self._bare(rel)
        try:
            found = self._call(rel, self.fs.find, self.path(rel))
        except FileNotFoundError:
            return []
        return sorted(f[len(base) :].lstrip("/") for f in found if f.startswith(base))

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.local:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=self.fs.isdir(path))
            return
        with suppress(FileNotFoundError):
            self._call(rel, self.fs.rm, path, recursive=True)

    def get_file(self, rel: str, local_path: str | os.PathLike) -> None:
        """Download one object to a local file (one streaming GET)."""
        try:
            self._call(rel, self.fs.get_file, self.path(rel), os.fspath(local_path))
        except FileNotFoundError:
            raise CacheError(f"{self.shown_of(rel)} does not exist") from None

    def get_tree(self, rel: str, local_dir: str | os.PathLike) -> None:
        """Download every file under ``rel`` (a Zarr shard) into ``local_dir``."""
        names = self.find(rel)
        if not names:
            raise CacheError(f"{self.shown_of(rel)} does not exist (or cannot be listed)")
        for name in names:
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.get_file(f"{rel}/{name}", target)

    # -- publishing ---------------------------------------------------------------------
    def publish_bytes(self, rel: str, data: bytes) -> None:
        """Make ``rel`` hold exactly ``data``, all or nothing."""
        if not self.local:
            self.check_writable()
            with self._writing(rel):
                self._call(rel, self.fs.pipe_file, self.path(rel), data)
            return
        with self.staged(rel) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def put_local(self, rel: str, local: str | os.PathLike) -> None:
        """Publish a local file or directory as ``rel`` (a copy; ``local`` is left alone)."""
        local = Path(local)
        if self.local:
            with self.staged(rel) as tmp:
                if local.is_dir():
                    shutil.copytree(local, tmp)
                else:
                    shutil.copyfile(local, tmp)
            return
        self.check_writable()
        with self._writing(rel):
            if local.is_dir():
                self.remove(rel)  # a crashed upload's leftovers; unlisted, so never read
                for file in sorted(p for p in local.rglob("*") if p.is_file()):
                    name = f"{rel}/{file.relative_to(local).as_posix()}"
                    self._call(name, self.fs.put_file, str(file), self.path(name))
            else:
                self._call(rel, self.fs.put_file, str(local), self.path(rel))

    @contextmanager
    def _writing(self, rel: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as err:  # s3fs: NoSuchBucket
            raise CacheError(
                f"cannot write {self.shown_of(rel)}: {redact(str(err))}; create the bucket first"
            ) from None

    @contextmanager
    def staged(self, rel: str) -> Iterator[str]:
        """Yield a temporary local path to write ``rel`` into; on success publish it.

        Works for a file or a directory. Locally the temporary sits beside ``rel`` under a
        ``.tmp-`` name (never listed by a reader; a crash leaves only such names) and is
        renamed into place. For a remote cache it is a local temporary, uploaded on success.
        """
        if not self.local:
            self.check_writable()
            scratch = tempfile.mkdtemp(prefix="logitcache-upload-")
            try:
                tmp = os.path.join(scratch, Path(rel).name)
                yield tmp
                self.put_local(rel, tmp)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
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
