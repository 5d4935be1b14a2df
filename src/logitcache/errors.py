"""The one exception family the CLI turns into a one-line message instead of a traceback."""

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["LogitcacheError", "one_line_errors"]


class LogitcacheError(Exception):
    """Something from outside (a flag, a file, a model, a shard) is wrong; the message says what."""


def _end_progress_bars() -> None:
    """Close the bars still open, so the message starts a line of its own instead of being
    appended to a bar's (a closed bar ends its line)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command: a LogitcacheError prints ``error: ...`` and exits 1; so
    does an OSError (the file system refused: ``--out`` names a file, the disk is full).

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LogitcacheError as err:
            _end_progress_bars()
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except OSError as err:  # the file system refused: a path that is a file, no space...
            _end_progress_bars()
            where = f": {err.filename}" if err.filename else ""
            print(f"error: {err.strerror or err}{where}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            _end_progress_bars()
            print("interrupted: completed shards and checkpoints are kept", file=sys.stderr)
            sys.exit(130)

    return wrapper
