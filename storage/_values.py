"""Checks of values read from a manifest: paths that must stay inside the cache, bounded
integers, JSON (the foundation's ``untrusted.load_json``, raising storage's error). In: a value
and where it came from. Out: the value, or a one-line CacheError."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from logitcache.core import untrusted
from logitcache.core.untrusted import MAX_JSON_DEPTH

from .errors import CacheError

__all__ = [
    "MAX_JSON_DEPTH",
    "check_int",
    "check_json_depth",
    "check_relative_path",
    "load_json",
    "load_json_object",
]


def check_relative_path(path: str) -> str:
    """Return ``path`` if it names a file inside the cache, else raise CacheError.

    A manifest is data from someone else's machine: absolute paths, URLs, ``..``
    components and backslashes are refused so a cache can never point outside itself.
    """
    if not isinstance(path, str) or not path:
        raise CacheError(f"manifest names an invalid shard path {path!r}")
    bad = (
        path.startswith(("/", "~"))
        or "\\" in path
        or "://" in path
        or ":" in path.split("/")[0]
        or any(part in ("..", "") for part in path.split("/"))
        or posixpath.normpath(path) != path
    )
    if bad:
        raise CacheError(f"manifest names a path outside the cache: {path!r}; refusing to read it")
    return path


def check_int(obj: Mapping, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheError(f"{where}: '{key}' must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise CacheError(f"{where}: '{key}' = {value} is outside [{lo}, {hi}]")
    return value


def check_json_depth(obj: object, where: str, most: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON (as ``json.loads`` returns it) nested more than ``most`` levels deep."""
    untrusted.check_json_depth(obj, where, most, error=CacheError)


def load_json(data: bytes | str, where: str) -> Any:
    """``json.loads(data)``, or one CacheError ``{where} is not valid JSON: {reason}``
    (``[[[[...]]]]`` too: nested too deeply); its depth is the caller's to check."""
    return untrusted.load_json(data, where, error=CacheError, max_depth=None)


def load_json_object(data: bytes | str, where: str) -> dict[str, Any]:
    """``load_json``, which must give an object nested at most MAX_JSON_DEPTH levels."""
    return untrusted.load_json_object(data, where, error=CacheError)
