"""Errors raised by the storage layer."""

from logitcache.core.errors import LogitcacheError

__all__ = [
    "CacheError",
    "NoTokenizerError",
    "RemoteError",
    "ShardCorruptError",
    "TokenizerError",
]


class CacheError(LogitcacheError, ValueError):
    """A cache, manifest or shard is missing, malformed, foreign or from another version."""


class ShardCorruptError(CacheError):
    """A shard's bytes do not match the manifest (hash, size or content)."""


class RemoteError(CacheError):
    """A remote store is unreachable, or refused (or lacks) the credentials."""


class NoTokenizerError(CacheError):
    """The cache stores no tokenizer (written before format 1.1); the message says what to do."""


class TokenizerError(CacheError):
    """A tokenizer is not the cache's (its fingerprint differs), or a stored one is not plain
    data (it names code to run) or does not load: the one error of the tokenizer check."""
