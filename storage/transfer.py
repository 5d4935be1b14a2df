"""Copying a cache between places: ``logitcache push`` (to a URL) and ``pull`` (to a directory).

In: a source cache (path or URL), a destination (path or URL), optionally a subset of
shards. Out: the destination holds the chosen shards, each checked against the source
manifest's size and sha256 before it is published, and a manifest listing them (written
every few seconds while copying, and last).

Resuming is skipping: a shard the destination manifest already lists with the same sha256
(and whose object has the listed size) is not copied again; on a local destination an
unlisted shard file left by an interrupted run is hashed and kept if it is right. The
tokenizer's files (format 1.1) are copied first, each checked against its sha256. Every
shard goes through a local temporary (beside its final name on a local disk, so the rename
is atomic; uploaded in one PUT to an object store), so a partial copy is never visible.
A damaged source shard is named and refused; the others are still copied.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .containers import shard_digest
from .errors import CacheError, RemoteError, ShardCorruptError
from .format import MANIFEST_BYTES, Manifest, ShardInfo, diff_specs
from .location import Location
from .tokenizer_files import read_checked
from .writer import MANIFEST, SHARDS, read_manifest

__all__ = [
    "Progress",
    "TransferResult",
    "copy_cache",
    "no_progress",
    "parse_shard_list",
    "select_shards",
]

_MANIFEST_EVERY_S = 5.0  # a killed transfer re-copies at most ~5 s of shards

Progress = Callable[[int, int, "str | None"], None]
"""``progress(bytes copied, bytes to copy, message or None)``: called once before copying
(with a message when shards are skipped), after each shard, and with a message for each
shard refused. It may be called from several threads, never at once."""


def no_progress(done: int, total: int, message: str | None) -> None:
    """A ``Progress`` that reports nothing."""


@dataclass
class TransferResult:
    """What a copy did."""

    copied: int = 0
    """Shards transferred by this run."""
    skipped: int = 0
    """Shards already at the destination with the right hash."""
    bytes_copied: int = 0
    failed: list[str] = field(default_factory=list)
    """One message per shard that was refused (damaged at the source)."""
    manifest: Manifest | None = None
    """The destination's manifest as written last."""


def parse_shard_list(text: str) -> list[int]:
    """``"0-99,120"`` -> [0, ..., 99, 120] (shard indices, ranges inclusive)."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise CacheError(f"--shards {text!r}: expected indices and ranges like 0-99,120")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise CacheError(f"--shards {text!r}: range {part} is empty")
        out.extend(range(first, last + 1))
    return sorted(set(out))


def select_shards(
    manifest: Manifest, shards: str | list[int] | None = None, max_tokens: int | None = None
) -> list[ShardInfo]:
    """The listed shards to copy: those named (all by default), then the first of them
    (in index order) holding at least ``max_tokens`` tokens."""
    chosen = list(manifest.shards)
    if shards is not None:
        wanted = set(parse_shard_list(shards) if isinstance(shards, str) else shards)
        missing = sorted(wanted - {s.index for s in chosen})
        if missing:
            raise CacheError(
                f"shards {missing[:10]} are not in the source cache (it lists "
                f"{len(chosen)} shards, indices {chosen[0].index if chosen else '-'}.."
                f"{chosen[-1].index if chosen else '-'})"
            )
        chosen = [s for s in chosen if s.index in wanted]
    if max_tokens is not None:
        if max_tokens <= 0:
            raise CacheError("--max-tokens must be positive")
        taken, tokens = [], 0
        for info in chosen:
            if tokens >= max_tokens:
                break
            taken.append(info)
            tokens += info.n_tokens
        chosen = taken
    return chosen


def copy_cache(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    shards: str | list[int] | None = None,
    max_tokens: int | None = None,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    threads: int = 4,
    progress: Progress | None = None,
    private: bool = True,
) -> TransferResult:
    """Copy (part of) the cache at ``src`` to ``dst``, verifying every shard; resumable.

    Raises CacheError if a shard was refused (after copying the others and writing the
    destination manifest), RemoteError at once if a store cannot be reached. A ``dst`` of
    ``hf://datasets/ORG/NAME`` is pushed in batched commits (``storage/hub.py``), creating
    the repository (``private`` unless told otherwise) if it does not exist.
    """
    if str(dst).startswith("hf://"):
        return _push_to_hub(src, str(dst), shards, max_tokens, progress or no_progress, private)
    source, target = Location(src, src_options), Location(dst, dst_options)
    target.check_writable()
    manifest = read_manifest(source)
    chosen = select_shards(manifest, shards, max_tokens)
    copy = _Copy(source, target, manifest, progress or no_progress)
    todo = [info for info in chosen if not copy.already_there(info)]
    copy.result.skipped = len(chosen) - len(todo)
    copy.total = sum(s.bytes for s in todo)
    skipped = copy.result.skipped
    copy.report(f"{skipped} of {len(chosen)} shards already at {dst}" if skipped else None)
    copy.copy_tokenizer()
    errors: list[BaseException] = []
    try:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="copy") as pool:
            futures = [pool.submit(copy.one, info) for info in todo]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # KeyboardInterrupt: running shards finish and are listed
                copy.stop.set()
                raise
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                copy.stop.set()  # queued shards return at once; running ones finish
    finally:
        copy.publish()
    for err in errors:
        raise err
    if copy.result.failed:
        raise CacheError(
            f"{len(copy.result.failed)} of {len(chosen)} shards were refused and not copied: "
            + "; ".join(copy.result.failed[:3])
        )
    return copy.result


def _push_to_hub(src, url, shards, max_tokens, progress, private) -> TransferResult:
    from .hub import push_to_hub

    chosen = select_shards(read_manifest(Location(src)), shards, max_tokens)
    manifest, copied, skipped, sent = push_to_hub(
        src, url, chosen, progress=progress, private=private
    )
    return TransferResult(copied=copied, skipped=skipped, bytes_copied=sent, manifest=manifest)


class _Copy:
    """One transfer's state: what the destination lists, and publishing it."""

    def __init__(self, source: Location, target: Location, manifest: Manifest, progress: Progress):
        self.source, self.target, self.src_manifest = source, target, manifest
        self.progress = progress
        self.total = 0
        self.tokenizer_files = manifest.tokenizer_files
        self.result = TransferResult()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._last_publish = time.monotonic()
        self._dirty = False
        present = target.read_if_exists(MANIFEST, limit=MANIFEST_BYTES) is not None
        existing = read_manifest(target) if present else None
        if existing is not None and existing.spec.to_dict() != manifest.spec.to_dict():
            changes = "; ".join(diff_specs(existing.spec, manifest.spec)[:5])
            raise CacheError(
                f"{target.shown} holds another cache ({changes}); choose another destination"
            )
        self.listed = {s.index: s for s in (existing.shards if existing else ())}
        self._had_manifest = existing is not None
        if target.local:
            target.makedirs(SHARDS)
            target.remove_stale_temporaries(SHARDS, prefix="copy-")

    def already_there(self, info: ShardInfo) -> bool:
        have = self.listed.get(info.index)
        same = have is not None and (have.sha256, have.path) == (info.sha256, info.path)
        if same and _object_size(self.target, info.path) == info.bytes:
            return True
        # a local shard of an interrupted run, published but not yet listed
        unlisted = self.target.local and self.target.exists(info.path)
        if unlisted and shard_digest(self.target, info.path) == (info.bytes, info.sha256):
            self._list(info)
            return True
        self.listed.pop(info.index, None)  # listed but wrong or gone: copy it again
        return False

    def copy_tokenizer(self) -> None:
        """Copy the tokenizer's files (small: read whole, checked, published before the
        manifest that lists them); a damaged one is refused and left out of the manifest."""
        try:
            for entry in self.src_manifest.tokenizer_files:
                try:  # read no further than its listed size; code (auto_map) refused
                    data = read_checked(self.source, entry)
                except RemoteError:
                    raise
                except CacheError as err:
                    raise ShardCorruptError(
                        f"tokenizer file {self.source.shown_of(entry.path)} is missing or "
                        f"damaged ({err})"
                    ) from None
                self.target.publish_bytes(entry.path, data)
        except ShardCorruptError as err:
            self.tokenizer_files = ()
            self.result.failed.append(str(err))
            self.report(f"refused: {err}")

    def report(self, message: str | None = None) -> None:
        with self._lock:
            self.progress(self.result.bytes_copied, self.total, message)

    def one(self, info: ShardInfo) -> None:
        if self.stop.is_set():
            return
        try:
            if self.source.local:
                _check(self.source, info, self.source.shown_of(info.path))
                self.target.put_local(info.path, self.source.path(info.path))
            else:
                self._download_then_publish(info)
        except RemoteError:
            self.stop.set()  # the store, not this shard: stop the transfer
            raise
        except CacheError as err:  # damaged or missing at the source: name it, go on
            with self._lock:
                self.result.failed.append(str(err))
            self.report(f"refused: {err}")
            return
        self._list(info)
        with self._lock:
            self.result.copied += 1
            self.result.bytes_copied += info.bytes
        self.report()

    def _download_then_publish(self, info: ShardInfo) -> None:
        if self.target.local:  # beside the final name: publishing is one rename
            scratch = Path(self.target.path(SHARDS)) / f".tmp-copy-{uuid.uuid4().hex[:8]}"
            scratch.mkdir()
        else:
            scratch = Path(tempfile.mkdtemp(prefix="logitcache-copy-"))
        try:
            local = scratch / Path(info.path).name
            if info.path.endswith(".zarr"):
                self.source.get_tree(info.path, local)
            else:
                self.source.get_file(info.path, local)
            shown = self.source.shown_of(info.path)
            _check(Location(scratch), replace(info, path=local.name), shown)
            if self.target.local:
                final = Path(self.target.path(info.path))
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.is_dir():
                    shutil.rmtree(final)
                os.replace(local, final)
            else:
                self.target.put_local(info.path, local)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _list(self, info: ShardInfo) -> None:
        with self._lock:
            self.listed[info.index] = info
            self._dirty = True
            due = time.monotonic() - self._last_publish > _MANIFEST_EVERY_S
        if due:
            self.publish()

    def publish(self) -> None:
        """Write the destination manifest: the listed shards, complete if all are there."""
        with self._lock:
            shards = tuple(sorted(self.listed.values(), key=lambda s: s.index))
            self._dirty, self._last_publish = False, time.monotonic()
        if not shards and not self._had_manifest:
            return  # nothing arrived: leave no manifest behind
        src = self.src_manifest
        everything = {s.index for s in src.shards} <= {s.index for s in shards}
        manifest = replace(
            src,
            shards=shards,
            complete=src.complete and everything,
            # known for a copy of a finished cache even when only part of it is copied:
            # that is what tells a partial copy from an unfinished teacher pass
            n_sequences_total=src.n_sequences_total,
            tokenizer_files=self.tokenizer_files,
        )
        self.target.publish_bytes(MANIFEST, manifest.to_json().encode())
        self.result.manifest = manifest


def _check(loc: Location, info: ShardInfo, name: str) -> None:
    """Refuse a shard whose size or sha256 differs from the source manifest's."""
    size, digest = shard_digest(loc, info.path)
    if (size, digest) != (info.bytes, info.sha256):
        raise ShardCorruptError(
            f"shard {name} is damaged: sha256 {digest[:16]}… ({size} bytes), its manifest "
            f"says {info.sha256[:16]}… ({info.bytes} bytes)"
        )


def _object_size(loc: Location, rel: str) -> int | None:
    """Bytes of a shard file (or of a Zarr directory's files); None if absent."""
    if rel.endswith(".zarr"):
        names = loc.find(rel)
        return sum(loc.size(f"{rel}/{n}") for n in names) if names else None
    try:
        return loc.size(rel)
    except FileNotFoundError:
        return None
