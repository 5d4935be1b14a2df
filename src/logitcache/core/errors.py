"""The one exception family the CLI turns into a one-line message instead of a traceback,
and what it prints when a command is interrupted (Ctrl-C, SIGTERM)."""

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Interrupted", "LogitcacheError", "Terminated", "one_line_errors", "sigterm_raises"]


class LogitcacheError(Exception):
    """Something from outside (a flag, a file, a model, a shard) is wrong; the message says what."""


class Interrupted(Exception):
    """A command stopped on a signal; the message says what was kept and how to continue.

    The CLI prints it after ``interrupted: `` and exits with 128 + the signal's number (130
    for SIGINT, 143 for SIGTERM), as a shell reports a process the signal ended.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as an exception (``sigterm_raises``), so ``finally`` blocks run and
    the command exits with the same line as on Ctrl-C, and status 143."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the ``with`` block, SIGTERM raises ``Terminated`` in the main thread instead of
    ending the process at once; the previous handler is restored on exit. Outside the main
    thread (where handlers cannot be installed) it does nothing."""

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# What an interrupted command keeps, by command; printed after "interrupted: ".
_KEPT = {
    "precompute": "completed shards are kept; rerun the same command to continue",
    "push": "shards already copied are kept; rerun the same command to continue",
    "pull": "shards already copied are kept; rerun the same command to continue",
}


def _end_progress_bars() -> None:
    """Close the bars still open, so the message starts a line of its own instead of being
    appended to a bar's (a closed bar ends its line and is never drawn again)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


def one_line_errors(
    fn: Callable[..., Any],
    command: Callable[[], str | None] = lambda: None,
    clean: Callable[[str], str] = str,
) -> Callable[..., Any]:
    """Decorate a click command: a LogitcacheError prints ``error: ...`` and exits 1; so
    does an OSError (the file system refused: ``--out`` names a file, the disk is full).
    ``Interrupted`` prints ``interrupted: ...`` and exits 128 + its signal; a bare Ctrl-C
    (or ``Terminated``) prints what ``command()`` (the command's name) keeps, and exits 130
    (143 for SIGTERM).

    Every line is passed through ``clean`` last, whatever built the message: the CLI gives
    ``logitcache.core.untrusted.redact`` (which imports this module), so a URL's password or token
    never reaches the terminal, or a log that keeps it.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LogitcacheError as err:
            _end_progress_bars()
            print(clean(f"error: {err}"), file=sys.stderr)
            sys.exit(1)
        except OSError as err:  # the file system refused: a path that is a file, no space...
            _end_progress_bars()
            where = f": {err.filename}" if err.filename else ""
            print(clean(f"error: {err.strerror or err}{where}"), file=sys.stderr)
            sys.exit(1)
        except Interrupted as err:
            _end_progress_bars()
            print(clean(f"interrupted: {err}"), file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            _end_progress_bars()
            name = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
            kept = _KEPT.get(command() or "")
            print(f"interrupted: {name}" + (f"; {kept}" if kept else ""), file=sys.stderr)
            sys.exit(143 if isinstance(err, Terminated) else 130)

    return wrapper
