"""Reading what a teammate hands over: bounded reads of local files, and URL redaction.

A cache, a recipe and a run directory are untrusted input. In: a local path and the most
bytes its reader may take. Out: the file's bytes, or a ``LogitcacheError`` naming the file
when it is not a regular file (a FIFO would block the open, ``/dev/zero`` never ends), is
larger than allowed (a sparse multi-GB file is refused by its size before any byte is read),
or cannot be read. Nothing is read past ``limit + 1`` bytes, whatever ``stat`` claims.

``load_json`` parses what such a file holds: one implementation for every reader, bounded in
nesting (``json.loads`` recurses once per level: ``[[[[...]]]]`` is a RecursionError, a deep
value makes every later ``==`` or ``repr`` recurse too), every failure one error of the
caller's type naming the file.

``redact`` removes what must never be printed or saved: the ``user:password@`` part of a URL,
and query values and tokens that look like credentials (``hf_…``, ``token=…``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .errors import LogitcacheError

__all__ = [
    "MAX_JSON_DEPTH",
    "check_json_depth",
    "is_within",
    "load_json",
    "load_json_object",
    "read_local",
    "read_local_text",
    "redact",
    "redact_values",
]

MAX_JSON_DEPTH = 32
"""Nesting a JSON file from outside may have (a manifest: 6, a checkpoint's state.json and
train_config.json: 3); deeper is refused, as code that walks it recurses once per level."""


def read_local(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular local file of at most ``limit`` bytes, or one-line error.

    The file is opened without blocking (a FIFO in its place returns at once), checked to be
    a regular file on the open descriptor (no race with a swap after a check), its size
    compared with ``limit`` before reading, and at most ``limit + 1`` bytes are read, so a
    file that grows or lies about its size is still refused.
    """
    path = os.fspath(path)
    if "\0" in path:
        raise LogitcacheError(f"{what} {redact(path)!r}: a path with a NUL byte; refusing it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise LogitcacheError(f"{what} {redact(path)} does not exist") from None
    except OSError as err:
        raise LogitcacheError(f"cannot read {what} {redact(path)}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LogitcacheError(
                f"{what} {redact(path)} is not a regular file; refusing to read it"
            )
        if info.st_size > limit:
            raise LogitcacheError(
                f"{what} {redact(path)} is {info.st_size:,} bytes, more than the "
                f"{limit:,} allowed; refusing to read it"
            )
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise LogitcacheError(
                f"{what} {redact(path)} holds more than the {limit:,} bytes allowed; "
                "refusing to read it"
            )
        return b"".join(chunks)
    except OSError as err:
        raise LogitcacheError(f"cannot read {what} {redact(path)}: {err.strerror}") from None
    finally:
        os.close(fd)


def read_local_text(path: str | os.PathLike, limit: int, what: str = "file") -> str:
    """``read_local`` decoded as UTF-8, a bad byte a one-line error."""
    data = read_local(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LogitcacheError(
            f"{what} {redact(os.fspath(path))} is not UTF-8 text (byte {err.start})"
        ) from None


def load_json(
    data: bytes | str,
    where: str,
    *,
    error: type[Exception] = LogitcacheError,
    max_depth: int | None = MAX_JSON_DEPTH,
) -> Any:
    """``json.loads(data)`` (read bounded first: ``read_local``), or one ``error``: ``{where}
    is not valid JSON: {reason}`` (``nested too deeply`` for what makes json.loads recurse
    past Python's limit), or, nested deeper than ``max_depth`` (None: unchecked),
    ``check_json_depth``'s."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise error(f"{where} is not valid JSON: {reason}") from None
    if max_depth is not None:
        check_json_depth(value, where, max_depth, error=error)
    return value


def load_json_object(
    data: bytes | str, where: str, *, error: type[Exception] = LogitcacheError
) -> dict[str, Any]:
    """``load_json``, which must give an object (nested at most ``MAX_JSON_DEPTH`` levels)."""
    value = load_json(data, where, error=error)
    if not isinstance(value, dict):
        raise error(f"{where} is not a JSON object")
    return value


def check_json_depth(
    value: object,
    where: str,
    most: int = MAX_JSON_DEPTH,
    *,
    error: type[Exception] = LogitcacheError,
) -> None:
    """Refuse JSON (as ``json.loads`` returns it) nested more than ``most`` levels deep; the
    walk keeps its own stack, so a deep value never recurses."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > most:
                raise error(f"{where}: JSON nested over {most} levels deep; refusing it")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# scheme://user:password@host -> scheme://***@host (also user@ alone: it can be a token)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]*@")
# ?token=…, &sig=…, X-Amz-Signature=… : values of query keys that carry credentials
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*?(?:token|key|secret|password|passwd|sig|signature|"
    r"credential|auth)[A-Za-z0-9_.-]*)=)[^&#\s'\"]*",
    re.IGNORECASE,
)
# Hugging Face user tokens (hf_ + 30 or more letters and digits), wherever they appear
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str | os.PathLike) -> str:
    """``text`` with credentials in any URL it holds replaced by ``***``.

    >>> redact("s3://AKIA:secret@bucket/cache?X-Amz-Signature=abc&x=1")
    's3://***@bucket/cache?X-Amz-Signature=***&x=1'
    """
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _SECRET_QUERY.sub(r"\g<key>***", text)
    return _HF_TOKEN.sub("hf_***", text)


def redact_values(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings...) with ``redact`` applied to every string
    in it, keys included: what a saved settings file or summary holds."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_values(k): redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, links resolved, lies inside ``root`` (links resolved)."""
    try:
        resolved = Path(path).resolve()
        base = Path(root).resolve()
    except (OSError, RuntimeError):
        return False
    return resolved == base or base in resolved.parents
