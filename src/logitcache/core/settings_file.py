"""Settings files from outside (recipes, a student's config.json or YAML): the bounded,
checked YAML loader and its limits. In the foundation, so that the stages read such files
without importing the CLI's recipes (``logitcache.recipes`` builds recipes on top of it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_DEPTH", "MAX_NODES", "RECIPE_LIMIT", "Refused", "load_yaml"]

RECIPE_LIMIT = 1 << 20
"""Bytes a recipe may hold (1 MiB; the shipped ones are ~1.5 kB)."""
MAX_DEPTH = 8
"""Nesting a recipe may have (it needs 2: a mapping of lists of scalars)."""
MAX_NODES = 10_000
"""Values (scalars, lists, mappings) a YAML recipe may hold: a mix of thousands of caches
fits; building 10,000 takes ~0.3 s."""


class Refused(ValueError):
    """What the recipe loader refuses to build (aliases, deep nesting, too many values)."""


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of a recipe, checked first (one pass over libyaml's events, which
    stops at the first offence): no anchors or aliases, at most MAX_DEPTH levels deep and
    MAX_NODES values. Only then is anything built (pure-Python PyYAML builds ~20 kB/s on a
    busy machine; libyaml builds a checked 1 MiB in about a second)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = nodes = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1
            raise Refused(f"line {line}: anchors and aliases (& and *) are not allowed")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise Refused(f"nested more than {MAX_DEPTH} levels deep (settings need 3)")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise Refused(f"more than {MAX_NODES:,} values; a settings file holds a few dozen")
    return yaml.load(text, Loader=loader)
