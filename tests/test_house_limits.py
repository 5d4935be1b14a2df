"""The house limit of docs/design.md: no function over 80 lines.

Modules have no line limit: they are split where their concepts part (issue #23).
"""

from __future__ import annotations

import ast

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
