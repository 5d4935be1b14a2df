"""The house limits of docs/design.md: no module over 450 lines, no function over 80."""

from __future__ import annotations

import ast

from test_imports import project_modules

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def test_no_module_or_function_over_the_limits():
    too_long = []
    for name, path in project_modules().items():
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {n} lines")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name}: {n} lines")
    assert too_long == [], "split these (docs/design.md, module limits): " + "; ".join(too_long)
