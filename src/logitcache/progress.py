"""The one reporting helper: progress bars and status lines, all on stderr.

Library code reports only through a ``Reporter``; ``Reporter(enabled=False)`` keeps tests
and library users quiet.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Reporter", "human_bytes"]


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

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def bar(self, total: float | None = None, desc: str = "", unit: str = "tok", **kw: Any) -> tqdm:
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            dynamic_ncols=True,
            disable=not self.enabled,
            file=sys.stderr,
            **kw,
        )
