"""The one exception family the CLI turns into a one-line message instead of a traceback."""

__all__ = ["LogitcacheError"]


class LogitcacheError(Exception):
    """Something from outside (a flag, a file, a model, a shard) is wrong; the message says what."""
