"""Command-line options made from config dataclasses: one source for flags, recipes and help.

In: a dataclass (``PrecomputeConfig``, ``TrainConfig``, ...) whose fields have a type, a
default and an attribute docstring, plus ``option(...)`` metadata where a field needs more
(another key, how None is spelled, what a resumed run may change; choices are a ``Literal``
type). Out: its ``Setting``s (one per leaf field, nested dataclasses flattened), click options
for them (``click_options``), a config's flat settings (``settings_of``) and command line
(``to_argv``), and a config built back from flat settings (``build``). Recipe files
(``logitcache.recipes``) use the same flat keys: a key is its flag without the dashes, ``_``
for ``-``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

import click

from logitcache.core.errors import LogitcacheError

__all__ = [
    "INT_LIMIT",
    "QUIET",
    "OptionMeta",
    "Resume",
    "Setting",
    "build",
    "check_choices",
    "click_options",
    "include",
    "option",
    "quoted",
    "resume_policy",
    "settings",
    "settings_of",
    "to_argv",
    "view",
]

Resume = typing.Literal["must-match", "may-change", "may-grow"]
"""What a resumed run may do with a setting (``OptionMeta.resume``)."""

INT_LIMIT = 2**53
"""The largest integer setting accepted (in magnitude): exact as a JSON number, and above any
real step, token or seed count (1e30 steps is a typo, not a plan)."""
_QUOTE_LIMIT = 80
"""Characters of an outside value a message quotes (a recipe's value can be a megabyte)."""


def quoted(value: Any, limit: int = _QUOTE_LIMIT) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (a long value ends in …).

    Containers are cut before they are formatted in full: ``repr`` of a list of a million
    items is never built."""
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:
        items = list(value.items() if isinstance(value, dict) else value)[:limit]
        value = dict(items) if isinstance(value, dict) else items
    text = repr(value) if not isinstance(value, (list, tuple, dict)) else _short_repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_repr(value: Any, depth: int = 0) -> str:
    """repr of a container, nested ones past depth 3 shown as ``...`` (bounded work)."""
    if depth > 3:
        return "..."
    if isinstance(value, dict):
        parts = [f"{k!r}: {_short_repr(v, depth + 1)}" for k, v in list(value.items())[:20]]
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short_repr(v, depth + 1) for v in list(value)[:20]) + "]"
    text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 1] + "…"


QUIET = click.option("--quiet", is_flag=True, default=False, help="No progress bars.")
"""The ``--quiet`` flag of every command that is not made from a config (demo, push, ...)."""


@dataclass(frozen=True)
class OptionMeta:
    """What a field's type, default and docstring cannot say about its flag."""

    key: str | None = None
    """Recipe key and flag name (``--`` + key with ``-`` for ``_``); default: the field name."""
    help: str | None = None
    """Help text, when the docstring (written for library users) does not suit a flag."""
    cli: bool = True
    """False: a recipe key only, no flag."""
    none: str | None = None
    """How None is spelled on the command line (e.g. ``auto``); it becomes a choice."""
    flag_default: Any = "<the field's>"
    """The flag's default when it differs from the field's (None: the command resolves it)."""
    rest_into: str | None = None
    """A repeatable flag: its first value is this field, the others go to the named field."""
    old_key: str | None = None
    """The key (and flag) this setting had before it was renamed: still accepted, with one
    line saying so, until the next release."""
    resume: Resume = "must-match"
    """Whether a resumed run may change it (configs that resume, e.g. ``TrainConfig``):
    must-match (refused when it differs), may-change, or may-grow (larger only; the command
    checks how much)."""
    added_with: str | None = None
    """A must-match setting added after runs that must still resume: left out of the resume
    fingerprint while the setting named here (often itself) is at its default, so those runs
    compare as they did before it existed."""
    fingerprint: str | None = None
    """How a must-match setting enters the resume fingerprint when not as its value: the name
    of a rule of the command that resumes (``TrainConfig``: ``train/resume_rules.py``'s
    ``RULES``, e.g. ``path``: compared by the file it names)."""


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field with a default and ``OptionMeta`` (see its fields for ``meta``)."""
    metadata = {"option": OptionMeta(**meta)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def include(*groups: type):
    """Class decorator, under ``@dataclass``: the fields of each dataclass in ``groups``, in
    order, become fields of the decorated class after its own.

    A group declares its fields once (type, default, ``option`` metadata, docstring: the
    help); the decorated class has them as its own, flat: its constructor, flags, recipe keys
    and ``asdict`` take them as if written in its body (``TrainConfig`` includes
    ``LossOptions``, ``TrainArgs``...), and ``view(group, config)`` gives a group back.
    """

    def decorate(cls: type) -> type:
        names = dict(inspect.get_annotations(cls))
        for group in groups:
            hints = typing.get_type_hints(group)
            for f in dataclasses.fields(group):
                if f.name in names:
                    raise TypeError(
                        f"include({group.__name__}): {cls.__name__} already has {f.name!r}"
                    )
                names[f.name] = hints[f.name]
                metadata = {**f.metadata, "declared_in": group}  # where its docstring is
                default = field(
                    default=f.default, default_factory=f.default_factory, metadata=metadata
                )
                setattr(cls, f.name, default)
        cls.__annotations__ = names
        return cls

    return decorate


def view(group: type, config: Any) -> Any:
    """The ``group`` (a dataclass that ``config``'s class includes) of ``config``'s values."""
    return group(**{f.name: getattr(config, f.name) for f in dataclasses.fields(group)})


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config as the command line and recipe files see it."""

    key: str
    path: tuple[str, ...]
    """Attribute path from the top config, e.g. ("corpus", "revision")."""
    kind: type
    """bool, int, float, str, tuple (of ``item``), or object (a key only: taken as is)."""
    item: type | None
    optional: bool
    default: Any
    """MISSING for a required field."""
    help: str
    meta: OptionMeta
    choices: tuple[str, ...] | None = None
    """The values of a ``Literal`` type (a ``click.Choice``)."""

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def old_flag(self) -> str | None:
        """The flag of ``meta.old_key`` (a renamed setting's old name)."""
        return None if self.meta.old_key is None else "--" + self.meta.old_key.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def cli_default(self) -> Any:
        if self.meta.flag_default != OptionMeta.flag_default:
            return self.meta.flag_default
        if self.default is None and self.meta.none is not None:
            return self.meta.none
        return None if self.default is MISSING else self.default

    def click_type(self) -> click.ParamType:
        if self.choices is not None:
            extra = (self.meta.none,) if self.meta.none is not None else ()
            return click.Choice([*extra, *self.choices])
        if self.kind is tuple:
            return click.STRING  # one value of a repeatable flag, or numbers as "3,1"
        return {bool: click.BOOL, int: _Number(int), float: _Number(float), str: click.STRING}[
            self.kind
        ]

    def convert(self, value: Any, where: str) -> Any:
        """``value`` from a flag or a recipe file, as the field's type; one-line errors."""
        if value is None or (self.meta.none is not None and value == self.meta.none):
            if self.optional or self.meta.none is not None:
                return None
            raise LogitcacheError(f"{where}: {self.key} must be set (it has no null value)")
        if self.kind is object:
            return value
        if self.kind is tuple:
            return self._convert_tuple(value, where)
        expected = _EXPECTED[self.kind] if self.choices is None else f"one of {self.choices}"
        wrong = (
            not isinstance(value, (str, int, float))  # a list or a mapping
            or (self.kind is bool and not isinstance(value, (bool, str)))
            or (self.kind is not bool and isinstance(value, bool))
            or (self.kind is int and isinstance(value, float) and not value.is_integer())
        )
        if wrong:
            raise LogitcacheError(f"{where}: {self.key}: expected {expected}, got {quoted(value)}")
        if self.kind in (int, float) and self.choices is None:
            try:
                return _number(self.kind, value)
            except ValueError as err:
                raise LogitcacheError(f"{where}: {self.key}: {err}") from None
        try:
            return self.click_type().convert(value, None, None)
        except click.BadParameter as err:
            raise LogitcacheError(f"{where}: {self.key}: {_cut(err.message)}") from None

    def _convert_tuple(self, value: Any, where: str) -> tuple:
        if self.item is str:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise LogitcacheError(f"{where}: {self.key}: expected a string or a list of them")
            return tuple(items)
        items = value.split(",") if isinstance(value, str) else value
        try:
            if not isinstance(items, (list, tuple)) or any(isinstance(v, bool) for v in items):
                raise ValueError
            return tuple(_number(self.item, v) for v in items)
        except (TypeError, ValueError) as err:
            text = _cut(value) if isinstance(value, str) else quoted(value)
            why = f" ({err})" if str(err) else ""
            raise LogitcacheError(
                f"{self.flag} {text}: expected numbers separated by commas{why}"
            ) from None


def check_choices(config: Any) -> None:
    """Refuse a value outside its ``Literal`` (a config made in Python; flags and recipe files
    are checked as they are read): call it from ``__post_init__``."""
    for s in settings(type(config)):
        if s.choices is None:
            continue
        value = _get(config, s.path)
        if value is None and (s.optional or s.meta.none is not None):
            continue
        if value not in s.choices:
            raise LogitcacheError(
                f"{s.flag} {quoted(value)}: expected one of {', '.join(s.choices)}"
            )


def resume_policy(cls: type) -> dict[str, OptionMeta]:
    """Each top-level field's ``OptionMeta`` (its ``resume``, ``added_with`` and
    ``fingerprint``), by name."""
    return {f.name: f.metadata.get("option", OptionMeta()) for f in dataclasses.fields(cls)}


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _cut(text: Any, limit: int = _QUOTE_LIMIT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(kind: type, value: Any) -> int | float:
    """``value`` (a number, or its text) as a finite float or an integer within INT_LIMIT;
    ValueError saying what is wrong, quoting at most 80 characters of it."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_EXPECTED[kind]}, got {quoted(value)}")
    try:
        number = float(value) if kind is float or isinstance(value, float) else int(value)
    except (TypeError, ValueError, OverflowError):
        if kind is int and isinstance(value, str):  # "1e3", "2.0": an integer written as a float
            try:
                number = float(value)
            except ValueError:
                number = None
        else:
            number = None
        if number is None:
            name = "integer" if kind is int else "float"
            raise ValueError(f"{quoted(value)} is not a valid {name}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {quoted(value)}")
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"expected an integer, got {quoted(value)}")
        if abs(number) > INT_LIMIT:
            raise ValueError(f"{quoted(value)} is out of range (at most {INT_LIMIT:,} in size)")
        return int(number)
    return number


class _Number(click.ParamType):
    """A flag's int or float, checked as a recipe's is (``_number``); a bad one is the
    CLI's one ``error:`` line naming the flag, like any other bad setting."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.name = "integer" if kind is int else "float"  # the metavar: INTEGER, FLOAT

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> Any:
        return _check_number(self.kind, value, param)


def _check_number(kind: type, value: Any, param: click.Parameter | None) -> int | float:
    try:
        return _number(kind, value)
    except ValueError as err:
        name = param.opts[0] if param is not None and param.opts else "value"
        raise LogitcacheError(f"{name}: {err}") from None


@functools.cache
def settings(cls: type) -> tuple[Setting, ...]:
    """Every leaf field of ``cls`` in field order, nested dataclasses flattened in place."""
    return tuple(_walk(cls, ()))


def _walk(cls: type, prefix: tuple[str, ...]):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = f"{cls.__name__}.{f.name}"
        meta = f.metadata.get("option", OptionMeta())
        docs = _docstrings(f.metadata.get("declared_in", cls))  # ``include``d: its group's
        try:
            kind, item, optional, choices = _kind(hints[f.name], where)
        except TypeError:
            if meta.cli:
                raise
            kind, item, optional, choices = object, None, True, None  # a key only, as is
        if dataclasses.is_dataclass(kind):
            yield from _walk(kind, (*prefix, f.name))
            continue
        text = meta.help or docs.get(f.name)
        if not text and meta.cli:
            raise TypeError(f"{where} needs a docstring: it is a flag's help")
        text = " ".join((text or "").replace("``", "").split())
        default = f.default
        if f.default_factory is not MISSING:
            default = f.default_factory()
        yield Setting(
            meta.key or f.name,
            (*prefix, f.name),
            kind,
            item,
            optional,
            default,
            text,
            meta,
            choices,
        )


def _kind(hint: Any, where: str) -> tuple[type, type | None, bool, tuple[str, ...] | None]:
    """(kind, item type of a tuple, optional, choices) of a field's type hint."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"{where}: only X | None unions can be options")
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if item not in (str, int, float):
            raise TypeError(f"{where}: tuples of str, int or float only")
        return tuple, item, optional, None
    if typing.get_origin(hint) is typing.Literal and all(
        isinstance(a, str) for a in typing.get_args(hint)
    ):
        return str, None, optional, typing.get_args(hint)
    if hint in (bool, int, float, str) or dataclasses.is_dataclass(hint):
        return hint, None, optional, None
    raise TypeError(
        f"{where}: no flag for type {hint!r}; give it another type or option(..., cli=False)"
    )


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: nxt.value.value
        for node, nxt in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)
    }


def click_options(cls: type):
    """Decorator adding one click option per setting of ``cls`` (in field order)."""

    def decorate(fn):
        for setting in reversed(settings(cls)):
            if setting.meta.cli:
                fn = _click_option(setting)(fn)
            if setting.meta.cli and setting.meta.old_key:  # the old name, hidden, no default
                kind = setting.click_type()
                fn = click.option(setting.old_flag, setting.meta.old_key, type=kind, hidden=True)(
                    fn
                )
        return fn

    return decorate


class _SettingOption(click.Option):
    """Shows [required] but lets a recipe file supply the value (checked after merging)."""

    def value_is_missing(self, value: Any) -> bool:
        return False


def _click_option(s: Setting):
    kw: dict[str, Any] = {"help": s.help, "cls": _SettingOption, "required": s.required}
    default = s.cli_default
    if s.kind is bool:
        return click.option(
            f"{s.flag}/--no-{s.flag[2:]}", default=bool(default), show_default=bool(default), **kw
        )
    if s.meta.rest_into or (s.kind is tuple and s.item is str):
        shown = bool(default) and not s.meta.rest_into
        return click.option(
            s.flag,
            multiple=True,
            default=default if shown else None,
            show_default=", ".join(default) if shown else False,
            **kw,
        )
    if s.kind is tuple:
        return click.option(s.flag, default=None, metavar="X,Y,...", **kw)
    return click.option(
        s.flag, type=s.click_type(), default=default, show_default=default is not None, **kw
    )


def settings_of(config: Any) -> dict[str, Any]:
    """The flat settings of ``config``: recipe keys to JSON-able values (tuples as lists)."""
    out = {}
    for s in settings(type(config)):
        value = _get(config, s.path)
        out[s.key] = list(value) if isinstance(value, tuple) else value
    return out


def to_argv(config: Any) -> list[str]:
    """The flags that make ``config`` (settings left at their default are left out)."""
    argv: list[str] = []
    for s in settings(type(config)):
        value = _get(config, s.path)
        if not s.meta.cli or (not s.required and value == s.default):
            continue
        if s.meta.rest_into:
            rest = _get(config, (*s.path[:-1], s.meta.rest_into))
            argv += [part for v in (value, *rest) for part in (s.flag, str(v))]
        elif s.kind is bool:
            argv.append(s.flag if value else f"--no-{s.flag[2:]}")
        elif value is None:
            argv += [s.flag, s.meta.none] if s.meta.none else []
        elif s.kind is tuple and s.item is str:
            argv += [part for v in value for part in (s.flag, v)]
        elif s.kind is tuple:
            argv += [s.flag, ",".join(f"{v:g}" for v in value)]
        else:
            argv += [s.flag, str(value)]
    return argv


def build(cls: type, flat: dict[str, Any]) -> Any:
    """``cls`` from flat settings (missing keys take the field defaults)."""
    nested: dict[str, Any] = {}
    for s in settings(cls):
        if s.key in flat:
            node = nested
            for name in s.path[:-1]:
                node = node.setdefault(name, {})
            node[s.path[-1]] = flat[s.key]
    return _construct(cls, nested)


def _construct(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        kwargs[name] = _construct(kind, value) if dataclasses.is_dataclass(kind) else value
    return cls(**kwargs)


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config
