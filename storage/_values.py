"""Checks of values read from a manifest: paths that must stay inside the cache, bounded
integers. In: a value and where it came from. Out: the value, or a one-line CacheError."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from typing import Any

from .errors import CacheError

__all__ = [
    "MAX_JSON_DEPTH",
    "check_int",
    "check_json_depth",
    "check_relative_path",
    "load_json",
    "load_json_object",
]

MAX_JSON_DEPTH = 32
"""Nesting a manifest or shard metadata may have (ours: 6); deeper JSON is refused, as code
that walks it (``==``, ``json.dumps`` of the spec for its hash) recurses once per level."""


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
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            if depth > most:
                raise CacheError(f"{where}: JSON nested over {most} levels deep; refusing it")
            stack.extend((child, depth + 1) for child in children)


def load_json(data: bytes | str, where: str) -> Any:
    """``json.loads(data)``, or one CacheError ``{where} is not valid JSON: {reason}``.

    ``json.loads`` recurses once per level, so ``[[[[...]]]]`` from a file raises
    RecursionError; that is refused here too (reason: nested too deeply), not a traceback."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CacheError(f"{where} is not valid JSON: {reason}") from None


def load_json_object(data: bytes | str, where: str) -> dict[str, Any]:
    """``load_json``, which must give an object nested at most MAX_JSON_DEPTH levels."""
    obj = load_json(data, where)
    if not isinstance(obj, dict):
        raise CacheError(f"{where} is not a JSON object")
    check_json_depth(obj, where)
    return obj
