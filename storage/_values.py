"""Checks of values read from a manifest: paths that must stay inside the cache, bounded
integers. In: a value and where it came from. Out: the value, or a one-line CacheError."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from .errors import CacheError

__all__ = ["check_int", "check_relative_path"]


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
