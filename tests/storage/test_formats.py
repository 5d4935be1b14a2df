"""Format versions behind one interface (``storage/formats/``, docs/design.md "The cache"):
the registry covers every version read, an unknown version is one clear error, and no
storage module outside ``storage/formats/`` branches on the version."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from storage_synth import make_spec

import logitcache.storage
from logitcache.storage import FORMAT_VERSION, READ_VERSIONS, CacheError
from logitcache.storage.formats import codec_for, format_class

STORAGE = Path(logitcache.storage.__file__).parent
_CODEC_CLASSES = {"RecordCodec", "GroupCodec", "FormatV1", "FormatV2"}


def test_the_registry_covers_every_version_read():
    assert FORMAT_VERSION in READ_VERSIONS
    for version in READ_VERSIONS:
        spec = make_spec(format_version=version)
        codec = codec_for(spec)
        assert type(codec) is format_class(version) and codec.version == version
        assert codec.fields == codec.fields_for(spec)
        assert codec.rows(spec.shard_sequences) >= 1


@pytest.mark.parametrize("version", [0, 3, "2", None, 2.5, [2]])
def test_an_unknown_version_is_one_error_naming_the_versions_read(version):
    with pytest.raises(CacheError) as err:
        format_class(version)
    assert str(err.value) == f"--format-version must be 1 or 2, got {version}"


def _mentions_version(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Attribute) and n.attr == "format_version")
        or (isinstance(n, ast.Name) and n.id in ("format_version", "version"))
        or (isinstance(n, ast.Constant) and n.value == "format_version")
        for n in ast.walk(node)
    )


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_number(e) for e in node.elts)
    return isinstance(node, ast.Constant) and type(node.value) is int


def version_branches(source: str, name: str) -> list[str]:
    """Where ``source`` compares a format version with a number, or asks which version's
    codec it holds (``isinstance``)."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_mentions_version, operands)) and any(map(_is_number, operands)):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance":
            classes = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if classes & _CODEC_CLASSES:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_storage_module_outside_formats_branches_on_the_version():
    """Equality of two versions (a shard's or a manifest's against its spec's) is an identity
    check and allowed; choosing behaviour by version number is ``storage/formats/``'s."""
    found = []
    for path in sorted(STORAGE.rglob("*.py")):
        if "formats" not in path.relative_to(STORAGE).parts:
            found += version_branches(path.read_text(), str(path.relative_to(STORAGE)))
    assert found == []


def test_the_branch_finder_finds_branches():
    code = "if spec.format_version == 2: pass\nv1 = m.format_version in (1,)\n"
    code += "isinstance(c, GroupCodec)"
    assert len(version_branches(code, "x.py")) == 3
    assert version_branches("ok = a.format_version != spec.format_version", "x.py") == []
