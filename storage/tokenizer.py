"""A cache's own tokenizer: its files under ``tokenizer/``, listed in the manifest with hashes.

In: a tokenizer (anything with ``save_pretrained(directory)``, e.g. a transformers tokenizer)
at precompute time, or a cache (path, URL or ``Location``) to read one from. Out: the files
published in the cache and their ``StoredFile`` entries; or a local directory holding exactly
the listed files, each checked against its size and sha256, ready for
``AutoTokenizer.from_pretrained``. Whoever loads it compares the loaded tokenizer's
fingerprint with ``spec.tokenizer["fingerprint"]`` (``train`` does, in ``check_student``).

Caches written before format 1.1 have no tokenizer files; ``add_tokenizer`` stores one in
them, refusing a tokenizer whose fingerprint is not the cache's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cache import MANIFEST, read_manifest
from .errors import CacheError, NoTokenizerError
from .format import Manifest, StoredFile
from .location import Location
from .shardcache import default_local_cache
from .tokenizer_files import read_checked, write_tokenizer_files

__all__ = [
    "add_tokenizer",
    "fetch_tokenizer",
    "missing_tokenizer_hint",
]


def missing_tokenizer_hint(url: str, manifest: Manifest) -> str:
    """What to say about a cache without tokenizer files (written before format 1.1)."""
    name = manifest.spec.tokenizer.get("name_or_path")
    return (
        f"{url} does not store its tokenizer (written before logitcache 0.2); it was "
        f"{name!r} on the machine that made it. Add it once with `logitcache tokenizer "
        f"{url} --add TOKENIZER` (the teacher's directory or hub id), or pass --tokenizer"
    )


def fetch_tokenizer(
    cache: str | os.PathLike | Location,
    out: str | os.PathLike | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """A local directory holding exactly the cache's tokenizer files, each verified.

    ``out`` (created, must not hold other files) or, by default, a directory named by the
    files' hashes under ``$LOGITCACHE_HOME/tokenizers``, reused once verified. Never the
    cache's own ``tokenizer/``: a file placed there that the manifest does not list (a
    ``tokenizer_config.json`` naming remote code, say) is never seen by the loader.
    """
    loc = cache if isinstance(cache, Location) else Location(cache, storage_options)
    manifest = read_manifest(loc)
    files = manifest.tokenizer_files
    if not files:
        raise NoTokenizerError(missing_tokenizer_hint(loc.shown, manifest))
    if out is not None:
        target = Path(out).expanduser()
        names = {Path(f.path).name for f in files}
        present = list(target.iterdir()) if target.is_dir() else []
        extra = sorted(p.name for p in present if p.name not in names)
        if extra:
            raise CacheError(f"{target} already holds other files ({extra[:3]}); choose a new OUT")
        target.mkdir(parents=True, exist_ok=True)
        for entry in files:
            _write(target / Path(entry.path).name, read_checked(loc, entry))
        return target
    listing = "".join(f"{f.path}\0{f.sha256}\n" for f in files).encode()
    target = default_local_cache().parent / "tokenizers" / hashlib.sha256(listing).hexdigest()[:32]
    if _holds(target, files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for entry in files:
            _write(tmp / Path(entry.path).name, read_checked(loc, entry))
        if target.exists():  # a copy that failed its check, or another process's
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another rank renamed its copy first
            if not _holds(target, files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def add_tokenizer(
    cache: str | os.PathLike, tokenizer: Any, fingerprint: str, *, name: str | None = None
) -> Manifest:
    """Store ``tokenizer`` in a cache that lacks one (or replace it by an identical one).

    ``fingerprint`` is the tokenizer's (``logitcache.identity.tokenizer_fingerprint``); it must
    equal the one the cache was made with. The manifest is rewritten after the files, so a
    crash leaves the cache as it was. Only local caches: add it before ``push``.
    """
    loc = Location(cache)
    if not loc.local:
        raise CacheError(
            f"add the tokenizer to a local copy of {loc.shown} (pull it), then push it again"
        )
    manifest = read_manifest(loc)
    expected = manifest.spec.tokenizer.get("fingerprint")
    if fingerprint != expected:
        made_with = manifest.spec.tokenizer.get("name_or_path")
        raise CacheError(
            f"the tokenizer {name or ''} (fingerprint {fingerprint[:16]}) is not the one this "
            f"cache was made with (fingerprint {str(expected)[:16]}, {made_with!r}); refusing it"
        )
    files = write_tokenizer_files(loc, tokenizer)
    updated = replace(manifest, tokenizer_files=files)
    loc.publish_bytes(MANIFEST, updated.to_json().encode())
    return updated


def _holds(directory: Path, files: tuple[StoredFile, ...]) -> bool:
    """Whether ``directory`` holds exactly ``files``, each with its listed hash."""
    if not directory.is_dir():
        return False
    if sorted(p.name for p in directory.iterdir()) != sorted(Path(f.path).name for f in files):
        return False
    return all(
        hashlib.sha256((directory / Path(f.path).name).read_bytes()).hexdigest() == f.sha256
        for f in files
    )


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
