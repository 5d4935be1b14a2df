"""Recipe files: a command's settings as YAML or JSON, under its command-line flags.

In: a ``--config`` file, a mapping of recipe keys (a flag's name without the dashes, ``_``
for ``-``; see ``logitcache.options``) to values, and the command's parsed flags. Out: flat
settings where a flag given on the command line wins over the file, and the file over the
defaults (``resolve``); the text of a resolved recipe (``recipe_yaml``), which read back
with ``--config`` makes the same run.
"""

from __future__ import annotations

import difflib
import json
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from logitcache.errors import LogitcacheError
from logitcache.options import Setting, settings, settings_of, to_argv

Reader = Callable[[str], dict[str, Any]]

__all__ = ["load_recipe", "parse_recipe_file", "recipe_options", "recipe_yaml", "resolve"]


def load_recipe(
    path: str, cls: type, *, ignore: Iterable[str] = (), read: Reader | None = None
) -> dict[str, Any]:
    """The settings a recipe gives, converted to the fields' types.

    ``ignore``: keys a saved file may carry besides settings (e.g. train_config.json's
    ``world_size``). Any other unknown key is an error naming the closest valid one.
    ``read``: how ``path`` becomes a mapping (default: ``parse_recipe_file``).
    """
    data = (read or parse_recipe_file)(path)
    by_key = {s.key: s for s in settings(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignore:
            continue
        if key not in by_key:
            raise LogitcacheError(f"{path}: unknown key {key!r}{_suggest(key, by_key)}")
        setting = by_key[key]
        if setting.meta.rest_into and isinstance(value, list):  # as the repeated flag
            if not value:
                raise LogitcacheError(f"{path}: {key}: expected at least one value")
            out[setting.meta.rest_into] = by_key[setting.meta.rest_into].convert(value[1:], path)
            value = value[0]
        out[key] = setting.convert(value, path)
    return out


def parse_recipe_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML file (JSON when the name ends in .json); one-line errors."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as err:
        raise LogitcacheError(f"--config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise LogitcacheError(f"--config {path}: not a UTF-8 text file") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError's parents
        first = str(err).strip().splitlines()[0]
        raise LogitcacheError(f"--config {path}: cannot parse: {first}") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LogitcacheError(f"--config {path}: cannot parse: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise LogitcacheError(f"--config {path}: expected a mapping of settings (key: value)")
    return data


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; keys are the flags of the command's --help, with _ for -"


def recipe_options(fn):
    """``--config`` and ``--dry-run``, shared by the commands made from a config class."""
    fn = click.option(
        "--dry-run",
        is_flag=True,
        help="Print the resolved settings as a YAML recipe (headed by the equivalent command "
        "line) and exit without running, after every check the run makes before its work (no "
        "weights read, nothing written).",
    )(fn)
    return click.option(
        "--config",
        "recipe",
        default=None,
        metavar="FILE",
        help="A YAML or JSON recipe of this command's settings (keys: the flags' names with _ "
        "for -); flags given here override it. Saved runs are recipes: precompute takes a "
        "cache (its manifest records how it was made), train a run's train_config.json.",
    )(fn)


def resolve(
    cls: type,
    ctx: click.Context | None,
    params: dict[str, Any],
    *,
    config: str | None = None,
    ignore: Iterable[str] = (),
    read: Reader | None = None,
) -> dict[str, Any]:
    """Flat settings of ``cls``: flags given on the command line, then the ``config``
    recipe, then the defaults. Without ``ctx`` every flag counts as given."""
    from_file = load_recipe(config, cls, ignore=ignore, read=read) if config else {}
    flat: dict[str, Any] = {}
    for s in settings(cls):
        if not s.meta.cli:  # a key only; or the rest of a flag given on the command line
            if s.key in from_file and s.key not in flat:
                flat[s.key] = from_file[s.key]
            continue
        given = ctx is None or ctx.get_parameter_source(s.key) not in (
            ParameterSource.DEFAULT,
            ParameterSource.DEFAULT_MAP,
        )
        if given or s.key not in from_file:
            flat.update(_from_flag(s, params[s.key]))
        else:
            flat[s.key] = from_file[s.key]
    for s in settings(cls):
        if s.required and flat.get(s.key) is None:
            _missing(ctx, s, config)
    return flat


def _from_flag(s: Setting, value: Any) -> dict[str, Any]:
    """A parsed flag's value as the field's (click has checked its type already)."""
    if s.meta.rest_into:
        values = tuple(value or ())
        return {s.key: values[0], s.meta.rest_into: values[1:]} if values else {}
    if s.kind is tuple:
        if value is None or value == ():
            return {} if s.required else {s.key: s.default if s.default is not None else ()}
        return {s.key: s.convert(value, s.flag)}
    if s.meta.none is not None and value == s.meta.none:
        return {s.key: None}
    return {s.key: value}


def _missing(ctx: click.Context | None, s: Setting, config: str | None) -> None:
    where = f" (not in {config} either)" if config else ""
    if ctx is None:
        raise LogitcacheError(f"missing option {s.flag}{where}")
    param = next(p for p in ctx.command.params if p.name == s.key)
    raise click.MissingParameter(ctx=ctx, param=param, message=where.strip(" ()") or None)


def recipe_yaml(config: Any, command: str) -> str:
    """The resolved settings as a YAML recipe, headed by the equivalent command line."""
    import yaml

    line = " ".join(["logitcache", command, *map(shlex.quote, to_argv(config))])
    flat = settings_of(config)
    for s in settings(type(config)):  # a repeatable flag's values as one list, as it reads them
        if s.meta.rest_into:
            rest = flat.pop(s.meta.rest_into)
            flat[s.key] = [flat[s.key], *rest] if rest else flat[s.key]
    body = yaml.safe_dump(flat, sort_keys=False, default_flow_style=False)
    return f"# {line}\n{body}"
