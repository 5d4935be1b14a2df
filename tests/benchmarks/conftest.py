"""The studies in benchmarks/ are scripts, not a package: their tests import them as the
scripts import each other (benchmarks/ on sys.path), and reuse tests/storage's cache maker."""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for folder in (_ROOT / "benchmarks", _ROOT / "tests" / "storage"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
