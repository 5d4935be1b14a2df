"""The one reporting helper: progress bars and status lines, all on stderr.

Library code reports only through a ``Reporter``; ``Reporter(enabled=False)`` keeps tests
and library users quiet. Every line and bar title passes through ``redact``: a message that
names a cache URL never shows its password or token.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from logitcache.core.untrusted import redact

__all__ = ["ByteProgress", "Reporter", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Reporter:
    """Prints status lines and makes tqdm bars, unless disabled."""

    def __init__(self, enabled: bool = True, rank: int = 0) -> None:
        self.enabled = enabled and rank == 0
        self.rank = rank

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.write(redact(message), file=sys.stderr)

    def warn(self, message: str) -> None:
        """A line the user must see (rank 0 only), printed even when quiet."""
        if self.rank == 0:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def bar(self, total: float | None = None, desc: str = "", unit: str = "tok", **kw: Any) -> tqdm:
        return tqdm(
            total=total,
            desc=redact(desc),
            unit=unit,
            unit_scale=True,
            dynamic_ncols=True,
            disable=not self.enabled,
            file=sys.stderr,
            **kw,
        )


class ByteProgress:
    """Storage's progress callback ``(done_bytes, total_bytes, message)`` drawn as one bar.

    Storage reports through plain callbacks; this adapts one to a ``Reporter``. Use it as a
    context manager so the bar is closed (and the line cleared) however the copy ends.
    """

    def __init__(self, reporter: Reporter, desc: str = "copy") -> None:
        self.reporter, self.desc, self._bar = reporter, desc, None

    def __call__(self, done: int, total: int, message: str | None = None) -> None:
        if message:
            self.reporter.log(message)
        if self._bar is None:
            self._bar = self.reporter.bar(total=total, desc=self.desc, unit="B")
        self._bar.update(done - self._bar.n)

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
