"""A cache's tokenizer files: publishing them under ``tokenizer/`` and checking them.

In: a tokenizer (anything with ``save_pretrained(directory)``) and a cache ``Location``.
Out: the files published in the cache and their ``StoredFile`` manifest entries; or each
listed file's bytes, checked against its size and sha256. The writer (``cache.py``) and
``verify`` use these; fetching and adding a tokenizer is ``tokenizer.py``.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from .errors import CacheError, ShardCorruptError
from .format import TOKENIZER_DIR, Manifest, StoredFile
from .location import Location

__all__ = [
    "check_tokenizer_files",
    "read_checked",
    "restate_tokenizer_files",
    "write_tokenizer_files",
]


def write_tokenizer_files(loc: Location, tokenizer: Any) -> tuple[StoredFile, ...]:
    """Save ``tokenizer`` into the cache at ``loc`` under ``tokenizer/``; returns the entries
    for the manifest (which the caller publishes after them)."""
    with tempfile.TemporaryDirectory(prefix="logitcache-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = []
        for path in sorted(Path(tmp).iterdir()):
            if not path.is_file():
                continue  # save_pretrained writes flat files; nothing else belongs to a tokenizer
            data = path.read_bytes()
            rel = f"{TOKENIZER_DIR}/{path.name}"
            loc.publish_bytes(rel, data)
            files.append(StoredFile(rel, len(data), hashlib.sha256(data).hexdigest()))
    if not files:
        raise CacheError("the tokenizer saved no files; it cannot be stored in the cache")
    return tuple(files)


def restate_tokenizer_files(loc: Location, files: tuple[StoredFile, ...]) -> tuple[StoredFile, ...]:
    """The entries of ``files`` as the cache holds them now.

    Parallel workers each save the tokenizer, and ``save_pretrained`` output is not stable
    across processes and library versions (``tokenizer_config.json`` differs by a byte); each
    file is published whole, so the last worker's copy of each is what a merged manifest lists.
    """
    out = []
    for entry in files:
        data = loc.read_if_exists(entry.path)
        if data is None:
            raise CacheError(f"tokenizer file {entry.path} listed by a worker is missing")
        out.append(StoredFile(entry.path, len(data), hashlib.sha256(data).hexdigest()))
    return tuple(out)


def check_tokenizer_files(loc: Location, manifest: Manifest) -> list[str]:
    """One problem per listed tokenizer file that is missing or differs from the manifest."""
    problems = []
    for entry in manifest.tokenizer_files:
        try:
            read_checked(loc, entry)
        except CacheError as err:
            problems.append(str(err))
    return problems


def read_checked(loc: Location, entry: StoredFile) -> bytes:
    """The bytes of one listed tokenizer file, refused unless they match the manifest."""
    data = loc.read_if_exists(entry.path)
    if data is None:
        raise ShardCorruptError(f"tokenizer file {entry.path} is missing from {loc.shown}")
    digest = hashlib.sha256(data).hexdigest()
    if (len(data), digest) != (entry.bytes, entry.sha256):
        raise ShardCorruptError(
            f"tokenizer file {entry.path} fails its check: sha256 {digest[:16]}… ({len(data)} "
            f"bytes), manifest expects {entry.sha256[:16]}… ({entry.bytes} bytes)"
        )
    return data
