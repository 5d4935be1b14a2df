"""Package names imported on first use (PEP 562), so importing a package stays cheap.

In: a package's name and, per public name, the module that defines it. Out: the package's
module-level ``__getattr__``. ``logitcache``, ``logitcache.train`` and
``logitcache.precompute`` use it, so ``logitcache --help`` starts without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package``: ``modules`` maps each name to the module defining
    it (absolute, or relative to ``package`` with a leading dot)."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(modules[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
