"""Remote filesystems: their options, their failures, and how long to wait before a retry.

In: a protocol (``s3``, ``http(s)``, ``hf``, ...) and the exceptions its fsspec client
raises. Out: the storage options logitcache adds (timeouts, bounded attempts), a kind for
each failure (credentials, denied, a missing Hub repository, transient, missing, other) and
the one-line message for it. ``location.Location`` uses these; nothing here does I/O.

Status codes are found wherever the client keeps them: aiohttp's ``.status``, or the
``.response.status_code`` of httpx/requests errors (huggingface_hub's ``HfHubHTTPError``),
so a Hub 429 is treated as temporary like any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from logitcache.core.untrusted import redact

from .errors import CacheError

__all__ = [
    "RETRIED_PROTOCOLS",
    "backoff_s",
    "classify",
    "credentials_hint",
    "default_options",
    "merge_options",
    "parse_hub_url",
    "remote_settings",
    "short",
    "status_of",
]

HTTP = ("http", "https")
RETRIED_PROTOCOLS = (*HTTP, "hf")
"""Protocols whose client does not retry itself: logitcache retries their calls."""
BACKOFF_BASE_S = 0.2
"""First wait before a retry; doubled after each attempt, at most BACKOFF_MAX_S."""
BACKOFF_MAX_S = 2.0
RETRY_AFTER_MAX_S = 30.0
"""The longest 'Retry-After' of a 429 that is honoured."""

_CREDENTIAL_ERRORS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",  # google.auth
    "LocalTokenNotFoundError",  # huggingface_hub, when a token is required
}
# Failures worth another attempt: the network, timeouts, a truncated body, a busy server.
_TRANSIENT_ERRORS = {
    "ConnectionError",  # builtin (refused, reset) and botocore's
    "TimeoutError",  # builtin, asyncio's, and fsspec's FSTimeoutError
    "ClientConnectionError",  # aiohttp: connector, disconnects, server timeouts
    "ClientPayloadError",  # aiohttp: body shorter than its Content-Length
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "IncompleteRead",
    "ResponseStreamingError",
    "ConnectError",  # httpx
    "ReadError",
    "RemoteProtocolError",
    "TimeoutException",
}
# huggingface_hub: the repository or revision is absent, or invisible to this token.
_NO_REPO_ERRORS = {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"}


def remote_settings() -> tuple[float, int]:
    """(seconds per request, attempts) for remote stores, from the environment."""
    try:
        timeout = float(os.environ.get("LOGITCACHE_TIMEOUT", "30"))
        retries = int(os.environ.get("LOGITCACHE_RETRIES", "3"))
    except ValueError:
        raise CacheError(
            "LOGITCACHE_TIMEOUT must be seconds and LOGITCACHE_RETRIES an integer"
        ) from None
    if timeout <= 0 or retries < 1:
        raise CacheError("LOGITCACHE_TIMEOUT must be > 0 and LOGITCACHE_RETRIES >= 1")
    return timeout, retries


def default_options(protocol: str, timeout: float, retries: int) -> dict[str, Any]:
    """The storage options logitcache sets for ``protocol``: timeouts and attempts."""
    if protocol in HTTP:
        import aiohttp

        # No total limit (a large shard may take minutes); a connect or a read that stalls
        # for `timeout` seconds fails.
        client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        return {"client_kwargs": {"timeout": client_timeout}}
    if protocol in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": retries, "mode": "standard"},
            }
        }
    return {}


def merge_options(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; nested dicts (client_kwargs, config_kwargs) merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge_options(out[key], value)
            else:
                out[key] = value
    return out


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def status_of(err: BaseException) -> int | None:
    """The HTTP status an exception carries: aiohttp's ``.status`` or ``.response.status_code``."""
    status = getattr(err, "status", None)
    if not isinstance(status, int):
        status = getattr(getattr(err, "response", None), "status_code", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def classify(err: BaseException) -> str:
    """credentials, norepo, denied, transient (worth retrying), missing, or other."""
    chain = list(_chain(err))
    names = [{c.__name__ for c in type(e).__mro__} for e in chain]
    if any(n & _CREDENTIAL_ERRORS for n in names):
        return "credentials"
    if any(n & _NO_REPO_ERRORS for n in names):
        return "norepo"
    for e, n in zip(chain, names):
        status = status_of(e)
        if isinstance(e, PermissionError) or status in (401, 403):
            return "denied"
        if n & _TRANSIENT_ERRORS or (status is not None and (status >= 500 or status == 429)):
            return "transient"
    missing = isinstance(err, FileNotFoundError) or any("EntryNotFoundError" in n for n in names)
    if missing or any(status_of(e) == 404 for e in chain):
        return "missing"
    return "other"


def backoff_s(err: BaseException, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: a 429's Retry-After if it gives one
    (at most RETRY_AFTER_MAX_S), else BACKOFF_BASE_S doubled per attempt."""
    for e in _chain(err):
        headers = getattr(getattr(e, "response", None), "headers", None) or {}
        value = headers.get("Retry-After") if hasattr(headers, "get") else None
        if status_of(e) == 429 and value is not None:
            try:
                return min(max(float(value), 0.0), RETRY_AFTER_MAX_S)
            except ValueError:
                break  # an HTTP date: use the exponential wait
    return min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_MAX_S)


def short(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def parse_hub_url(url: str) -> Any:
    """huggingface_hub's parse of an ``hf://`` URL (its ``HfFileSystemResolvedPath``-like
    record: type, id, revision, path_in_repo), or one CacheError naming the URL redacted and
    what a cache's Hub URL looks like, instead of huggingface_hub's traceback."""
    from huggingface_hub.hf_file_system import parse_hf_uri

    try:
        return parse_hf_uri(url.rstrip("/"))
    except Exception as err:  # HfUriError, ValueError
        raise CacheError(
            f"{redact(url)}: not a Hub URL ({redact(short(err))}); expected "
            "hf://datasets/ORG/NAME[@REVISION][/PATH]"
        ) from None


def credentials_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with "
            "~/.aws/credentials, or use an instance role); for a public bucket set "
            "FSSPEC_S3='{\"anon\": true}'"
        )
    if protocol in ("gs", "gcs"):
        return (
            "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
            "`gcloud auth application-default login`"
        )
    if protocol == "hf":
        return "set HF_TOKEN to a Hugging Face access token, or run `hf auth login`"
    return f"configure them as fsspec's {protocol} filesystem expects (FSSPEC_{protocol.upper()})"
