"""The module graph stays a stack of layers (LAYERS, drawn in docs/design.md): no module
imports a higher layer or a sibling stage, no import cycle among the project's modules, and no
module imports another's private (``_name``) names. Every import counts: imports inside
functions (they wait for a call) and imports under ``if TYPE_CHECKING:`` (a type-only import
still ties the two modules together: whoever reads one must read the other)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {  # import name -> directory (see pyproject.toml's package-dir)
    "logitcache": ROOT / "src" / "logitcache",
    "logitcache.storage": ROOT / "storage",
    "logitcache.precompute": ROOT / "precompute",
    "logitcache.train": ROOT / "train",
}

# Bottom to top; a module may import its own layer's modules and lower layers only. The two
# stages share layer 3 but not each other ("sibling stages"). The longest prefix decides;
# anything else in the package (the CLI, recipes, describe, demo/toy, bench, the root
# package with its lazy public names) is the top.
LAYERS: dict[str, tuple[int, str]] = {
    "logitcache.core": (0, "foundation"),
    "logitcache.storage": (1, "storage"),
    "logitcache.models": (2, "models"),
    "logitcache.precompute": (3, "precompute"),
    "logitcache.train": (3, "train"),
    "logitcache": (4, "top"),
}


def layer_of(module: str) -> tuple[int, str]:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)]


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, or of the sibling stage, as 'a (layer) imports b (layer)'."""
    out = []
    for source, targets in sorted(edges.items()):
        (low, mine) = layer_of(source)
        for target in sorted(targets):
            (high, theirs) = layer_of(target)
            if high > low or (high == low and theirs != mine):
                out.append(f"{source} ({mine}) imports {target} ({theirs})")
    return out


def project_modules() -> dict[str, Path]:
    out = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


_TYPE_CHECKING = {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


def imports(name: str, path: Path, modules: dict[str, Path], *, type_only: bool = True):
    """(imported module, private names taken from it) for every import in the file; without
    ``type_only``, leaving out those under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped = set()
    if not type_only:
        skipped = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) in _TYPE_CHECKING
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (
                (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            )
            if target not in modules:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    yield sub, []
                else:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    yield target, [alias.name] if private else []


def graph(*, type_only: bool = True) -> tuple[dict[str, set[str]], list[str]]:
    modules = project_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        for target, names in imports(name, path, modules, type_only=type_only):
            if target != name:
                edges[name].add(target)
            private += [f"{name} imports {target}.{n}" for n in names if target != name]
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles():
    edges, _ = graph(type_only=False)
    assert len(edges) > 40  # the walk found the project
    assert cycles(edges) == []
    assert cycles(graph()[0]) == []  # type-only imports included


def test_no_module_imports_a_higher_layer():
    edges, _ = graph()
    assert {layer_of(name)[1] for name in edges} == {v[1] for v in LAYERS.values()}
    assert layer_violations(edges) == []


def test_the_layer_check_catches_an_upward_and_a_sideways_import(tmp_path):
    edges = {
        "logitcache.storage.writer": {"logitcache", "logitcache.core.errors"},
        "logitcache.train.student": {"logitcache.precompute.teacher", "logitcache.models"},
        "logitcache.cli": {"logitcache.train.loop"},
    }
    assert layer_violations(edges) == [
        "logitcache.storage.writer (storage) imports logitcache (top)",
        "logitcache.train.student (train) imports logitcache.precompute.teacher (precompute)",
    ]
    x = tmp_path / "x.py"
    x.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .y import T\n")
    modules = {"logitcache.x": x, "logitcache.y": tmp_path / "y.py"}
    assert list(imports("logitcache.x", x, modules)) == [("logitcache.y", [])]


def test_no_module_imports_another_modules_private_names():
    _, private = graph()
    assert private == []


def benchmark_imports(modules: dict[str, Path]) -> list[str]:
    """Imports of benchmarks/ (the folder or one of its scripts by name) by these modules."""
    studies = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {"benchmarks"}
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.partition(".")[0]]
            else:
                continue
            found += [f"{name} imports {root}" for root in roots if root in studies]
    return found


def test_the_product_never_imports_the_benchmarks(tmp_path):
    """benchmarks/ is research and is not installed: the package must run without it."""
    assert benchmark_imports(project_modules()) == []
    x = tmp_path / "x.py"
    x.write_text("def f():\n    from real_teacher import run_study\n")
    assert benchmark_imports({"logitcache.x": x}) == ["logitcache.x imports real_teacher"]


def test_the_checks_catch_a_cycle_and_a_private_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    x = tmp_path / "x.py"
    x.write_text("def f():\n    from .y import _secret, public, __version__\n")
    modules = {"logitcache.x": x, "logitcache.y": tmp_path / "y.py"}
    assert list(imports("logitcache.x", x, modules)) == [
        ("logitcache.y", ["_secret"]),
        ("logitcache.y", []),
        ("logitcache.y", []),
    ]


def test_the_cli_starts_without_torch():
    """`logitcache --help` and argument errors must not wait ~1 s for torch (and CUDA)."""
    import subprocess
    import sys

    code = "import sys, logitcache.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lazy_package_names_are_the_objects_not_their_modules():
    import importlib
    import inspect

    import logitcache
    import logitcache.train.loop  # imports every trainer module, as a training run does

    for package in ("logitcache", "logitcache.train", "logitcache.precompute"):
        module = importlib.import_module(package)
        for name in module.__all__:
            if name != "__version__":
                value = getattr(module, name)
                assert not inspect.ismodule(value), f"{package}.{name} is a module"
    assert logitcache.train.evaluate is logitcache.evaluate
