"""The house limit of docs/design.md: no function over 80 lines.

Modules have no line limit: they are split where their concepts part (issue #23).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_imports import project_modules

MAX_FUNCTION_LINES = 80


def test_no_function_over_the_limit():
    too_long = []
    for name, path in project_modules().items():
        source = path.read_text()
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name}: {n} lines")
    assert too_long == [], "split these (docs/design.md, house limits): " + "; ".join(too_long)


def test_ruff_format_formats_everything():
    """No `# fmt: skip` / `# fmt: off` in the package, its tests or the benchmarks: the
    formatter decides the layout (issue #23), so hand-packed lines cannot come back."""
    root = Path(__file__).parent.parent
    folders = ["src", "storage", "precompute", "train", "tests", "benchmarks"]
    marked = [
        f"{path.relative_to(root)}:{n}"
        for folder in folders
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"#\s*fmt:\s*(skip|off)\s*$", line)
    ]
    assert marked == []
