"""A cache's own tokenizer: its files under ``tokenizer/``, listed in the manifest with hashes,
and the one check that a tokenizer is the cache's.

In: a tokenizer (anything with ``save_pretrained(directory)``, e.g. a transformers tokenizer)
at precompute time, or a cache (path, URL or ``Location``) to read one from. Out: the files
published in the cache and their ``StoredFile`` entries; a local directory holding exactly
the listed files, each checked against its size and sha256 (``fetch_tokenizer``); or the
stored tokenizer loaded as data (remote code off, whatever a flag says) and checked against
the cache's tokenizer record (``stored_tokenizer``). ``check_tokenizer`` is the check, for
a stored tokenizer and a student's alike: ``verify``, ``train`` and ``logitcache tokenizer``
all refuse with its ``TokenizerError``.

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

from logitcache.core.errors import LogitcacheError
from logitcache.core.identity import tokenizer_difference
from logitcache.core.untrusted import read_local

from .errors import CacheError, NoTokenizerError, TokenizerError
from .format import MAX_TOKENIZER_FILE_BYTES, Manifest, StoredFile
from .local_copies import default_local_cache
from .location import Location
from .tokenizer_files import check_tokenizer_files, read_checked, refuse_code, write_tokenizer_files
from .writer import MANIFEST, read_manifest

__all__ = [
    "add_tokenizer",
    "check_tokenizer",
    "fetch_tokenizer",
    "load_stored_tokenizer",
    "missing_tokenizer_hint",
    "stored_tokenizer",
    "tokenizer_problems",
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
    manifest: Manifest | None = None,
) -> Path:
    """A local directory holding exactly the cache's tokenizer files, each verified.

    ``out`` (created if needed; may hold a model, not another tokenizer's files of the same
    names) or, by default, a directory named by the
    files' hashes under ``$LOGITCACHE_HOME/tokenizers``, reused once verified. Never the
    cache's own ``tokenizer/``: a file placed there that the manifest does not list (a
    ``tokenizer_config.json`` naming remote code, say) is never seen by the loader.
    """
    loc = cache if isinstance(cache, Location) else Location(cache, storage_options)
    manifest = read_manifest(loc) if manifest is None else manifest  # (the caller's, if read)
    files = manifest.tokenizer_files
    if not files:
        raise NoTokenizerError(missing_tokenizer_hint(loc.shown, manifest))
    if out is not None:
        target = Path(out).expanduser()
        checked = [(target / Path(f.path).name, read_checked(loc, f)) for f in files]
        clash = sorted(p.name for p, data in checked if _differs(p, data))
        if clash:
            raise CacheError(
                f"{target} already holds other {', '.join(clash)}; choose another OUT, or "
                "remove them to put the cache's tokenizer beside the model"
            )
        target.mkdir(parents=True, exist_ok=True)
        for path, data in checked:
            _write(path, data)
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


def add_tokenizer(cache: str | os.PathLike, tokenizer: Any, *, name: str | None = None) -> Manifest:
    """Store ``tokenizer`` in a cache that lacks one (or replace it by an identical one).

    It must be the one the cache was made with (``check_tokenizer``). The manifest is
    rewritten after the files, so a crash leaves the cache as it was. Only local caches: add
    it before ``push``.
    """
    loc = Location(cache)
    if not loc.local:
        raise CacheError(
            f"add the tokenizer to a local copy of {loc.shown} (pull it), then push it again"
        )
    manifest = read_manifest(loc)
    check_tokenizer(tokenizer, manifest.spec.tokenizer, f"the tokenizer {name or ''}".rstrip())
    files = write_tokenizer_files(loc, tokenizer)
    updated = replace(manifest, tokenizer_files=files)
    loc.publish_bytes(MANIFEST, updated.to_json().encode())
    return updated


def check_tokenizer(tokenizer: Any, record: Any, what: str) -> None:
    """Refuse ``tokenizer`` (one line, ``TokenizerError``) unless it is the one a cache's
    tokenizer ``record`` (``spec.tokenizer``) names: same ids for every text, same text for
    every ids (``logitcache.core.identity.tokenizer_difference``)."""
    difference = tokenizer_difference(tokenizer, record)
    if difference is not None:
        raise TokenizerError(
            f"{what} is not the one the cache was made with ({record.get('name_or_path')!r}): "
            f"{difference}; token ids or text would not mean the same thing"
        )


def load_stored_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer in a directory of a cache's files (``fetch_tokenizer``), loaded as data:
    no remote code, whatever the flags say, nothing fetched, ``auto_map`` refused."""
    from transformers import AutoTokenizer

    config = Path(directory) / "tokenizer_config.json"
    if config.exists():
        try:
            data = read_local(config, MAX_TOKENIZER_FILE_BYTES, "tokenizer config")
        except LogitcacheError as err:
            raise TokenizerError(str(err)) from None
        refuse_code("tokenizer/tokenizer_config.json", data, f"the tokenizer in {directory}")
    try:
        return AutoTokenizer.from_pretrained(
            str(directory), trust_remote_code=False, local_files_only=True
        )
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TokenizerError(f"the cache's tokenizer does not load: {first}") from None


def stored_tokenizer(
    cache: str | os.PathLike | Location,
    *,
    storage_options: dict[str, Any] | None = None,
    manifest: Manifest | None = None,
) -> tuple[Any, Path]:
    """The cache's stored tokenizer, loaded as data and checked against its record: (the
    tokenizer, the verified local directory it came from). ``NoTokenizerError`` if it stores
    none; ``TokenizerError`` if it is not the cache's; ``ShardCorruptError`` for a bad file."""
    loc = cache if isinstance(cache, Location) else Location(cache, storage_options)
    manifest = read_manifest(loc) if manifest is None else manifest  # read once, used twice
    directory = fetch_tokenizer(loc, manifest=manifest)
    tokenizer = load_stored_tokenizer(directory)
    check_tokenizer(tokenizer, manifest.spec.tokenizer, f"the tokenizer stored in {loc.shown}")
    return tokenizer, directory


def tokenizer_problems(loc: Location, manifest: Manifest) -> list[str]:
    """``verify``'s part: one line per bad tokenizer file, else the tokenizer check's."""
    if not manifest.tokenizer_files:
        return []
    problems = check_tokenizer_files(loc, manifest)
    if problems:
        return problems
    try:
        stored_tokenizer(loc, manifest=manifest)
    except CacheError as err:
        return [str(err)]
    return []


def _holds(directory: Path, files: tuple[StoredFile, ...]) -> bool:
    """Whether ``directory`` holds exactly ``files``, each with its listed hash."""
    if not directory.is_dir():
        return False
    if sorted(p.name for p in directory.iterdir()) != sorted(Path(f.path).name for f in files):
        return False
    try:
        return all(
            hashlib.sha256(read_local(directory / Path(f.path).name, f.bytes)).hexdigest()
            == f.sha256
            for f in files
        )
    except LogitcacheError:  # not a regular file, or larger than listed: fetched again
        return False


def _differs(path: Path, data: bytes) -> bool:
    """Whether ``path`` exists with other content than ``data`` (read no further than it)."""
    if not os.path.lexists(path):
        return False
    try:
        return read_local(path, len(data), "file") != data
    except LogitcacheError:
        return True


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
