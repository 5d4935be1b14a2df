"""A cache's tokenizer files: publishing them under ``tokenizer/`` and checking them.

In: a tokenizer (anything with ``save_pretrained(directory)``) and a cache ``Location``.
Out: the files published in the cache and their ``StoredFile`` manifest entries; or each
listed file's bytes, checked against its size and sha256. The writer (``cache.py``) and
``verify`` use these; fetching, loading and checking a tokenizer is ``tokenizer.py``.

A stored tokenizer is data, never code: only the files named in ``TOKENIZER_FILE_NAMES`` are
stored (the manifest parser refuses any other name), and a ``tokenizer_config.json`` with an
``auto_map`` (the classes of a tokenizer that runs its own code) is refused when it is
written and each time it is read.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from ._values import load_json
from .errors import CacheError, RemoteError, ShardCorruptError, TokenizerError
from .format import (
    MAX_TOKENIZER_FILE_BYTES,
    TOKENIZER_DIR,
    TOKENIZER_FILE_NAMES,
    Manifest,
    StoredFile,
)
from .location import Location

__all__ = [
    "check_tokenizer_files",
    "read_checked",
    "refuse_code",
    "restate_tokenizer_files",
    "write_tokenizer_files",
]


# How a tokenizer was loaded, not what it is: transformers saves these into
# tokenizer_config.json (``local_files_only`` follows $HF_HUB_OFFLINE), so without this the
# same teacher wrote different cache bytes online and offline.
_LOAD_TIME_KEYS = (
    "local_files_only",
    "is_local",
    "cache_dir",
    "revision",
    "token",
    "use_auth_token",
    "trust_remote_code",
    "force_download",
    "proxies",
    "subfolder",
    "_commit_hash",
)


def _portable(name: str, data: bytes) -> bytes:
    """``tokenizer_config.json`` without the keys that say how it was loaded (written as
    transformers writes it); any other file as it is."""
    if name != "tokenizer_config.json":
        return data
    config = json.loads(data)
    if not isinstance(config, dict) or not any(key in config for key in _LOAD_TIME_KEYS):
        return data
    for key in _LOAD_TIME_KEYS:
        config.pop(key, None)
    return (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_tokenizer_files(loc: Location, tokenizer: Any) -> tuple[StoredFile, ...]:
    """Save ``tokenizer`` into the cache at ``loc`` under ``tokenizer/``; returns the entries
    for the manifest (which the caller publishes after them).

    Only the data files of ``TOKENIZER_FILE_NAMES`` are stored; a tokenizer that names its
    own code (``auto_map``) is refused: no reader would run it."""
    with tempfile.TemporaryDirectory(prefix="logitcache-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = []
        for path in sorted(Path(tmp).iterdir()):
            if not path.is_file() or path.name not in TOKENIZER_FILE_NAMES:
                continue  # code (*.py) and anything else that is not a tokenizer's data
            data = _portable(path.name, path.read_bytes())
            rel = f"{TOKENIZER_DIR}/{path.name}"
            refuse_code(rel, data, "the tokenizer to store")
            files.append((rel, data))
        for rel, data in files:
            loc.publish_bytes(rel, data)
    if not files:
        raise CacheError("the tokenizer saved no files; it cannot be stored in the cache")
    return tuple(
        StoredFile(rel, len(data), hashlib.sha256(data).hexdigest()) for rel, data in files
    )


def refuse_code(rel: str, data: bytes, what: str) -> None:
    """Refuse a ``tokenizer_config.json`` that names code (``auto_map``), one line."""
    if Path(rel).name != "tokenizer_config.json":
        return
    try:
        config = load_json(data, rel)  # [[[[...]]]] too: a RecursionError was a traceback
    except CacheError:
        raise TokenizerError(f"{what}: {rel} is not valid JSON; refusing it") from None
    if isinstance(config, dict) and "auto_map" in config:
        raise TokenizerError(
            f"{what}: {rel} names code to run (auto_map); a cache's tokenizer is data only and "
            "is never loaded with remote code: refusing it (use a tokenizer with a "
            "tokenizer.json)"
        )


def restate_tokenizer_files(loc: Location, files: tuple[StoredFile, ...]) -> tuple[StoredFile, ...]:
    """The entries of ``files`` as the cache holds them now.

    Parallel workers each save the tokenizer, and ``save_pretrained`` output is not stable
    across processes and library versions (``tokenizer_config.json`` differs by a byte); each
    file is published whole, so the last worker's copy of each is what a merged manifest lists.
    """
    out = []
    for entry in files:
        data = loc.read_if_exists(entry.path, limit=MAX_TOKENIZER_FILE_BYTES)
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
    """The bytes of one listed tokenizer file, refused unless they match the manifest (read
    no further than its listed size) and are data (``refuse_code``)."""
    try:
        data = loc.read_if_exists(entry.path, limit=entry.bytes)
    except RemoteError:
        raise
    except CacheError as err:  # not a regular file, or more bytes than listed
        raise ShardCorruptError(f"tokenizer file {entry.path} fails its check: {err}") from None
    if data is None:
        raise ShardCorruptError(f"tokenizer file {entry.path} is missing from {loc.shown}")
    digest = hashlib.sha256(data).hexdigest()
    if (len(data), digest) != (entry.bytes, entry.sha256):
        raise ShardCorruptError(
            f"tokenizer file {entry.path} fails its check: sha256 {digest[:16]}… ({len(data)} "
            f"bytes), manifest expects {entry.sha256[:16]}… ({entry.bytes} bytes)"
        )
    refuse_code(entry.path, data, f"the tokenizer stored in {loc.url}")
    return data
