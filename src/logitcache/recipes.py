"""Recipe files: a command's settings as YAML or JSON, under its command-line flags.

In: a ``--config`` file, a mapping of recipe keys (a flag's name without the dashes, ``_``
for ``-``; see ``logitcache.core.options``) to values, and the command's parsed flags. Out: flat
settings where a flag given on the command line wins over the file, and the file over the
defaults (``resolve``); the text of a resolved recipe (``recipe_yaml``), which read back
with ``--config`` makes the same run.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import click
from click.core import ParameterSource

from logitcache.core.errors import LogitcacheError
from logitcache.core.options import Setting, quoted, settings, settings_of, to_argv
from logitcache.core.settings_file import MAX_DEPTH, MAX_NODES, RECIPE_LIMIT, Refused, load_yaml
from logitcache.core.untrusted import read_local_text, redact

Reader = Callable[[str], dict[str, Any]]

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "NAME_PREFIX",
    "RECIPE_LIMIT",
    "copy_shipped",
    "flag_for",
    "is_recipe_file",
    "load_recipe",
    "load_yaml",
    "parse_recipe_file",
    "recipe_options",
    "recipe_yaml",
    "resolve",
    "shipped",
    "shipped_text",
    "suggest_key",
]

NAME_PREFIX = "name:"
"""``--config name:student-small-gpu``: a recipe shipped with the package."""

# What users bring from Hugging Face ``TrainingArguments`` (and a few other trainers), and
# the key here that does the same; a note where there is no exact equal.
HF_NAMES: dict[str, tuple[str, str]] = {
    "learning_rate": ("lr", ""),
    "num_train_epochs": ("epochs", ""),
    "num_epochs": ("epochs", ""),
    "per_device_train_batch_size": ("batch_size", ""),
    "train_batch_size": ("batch_size", ""),
    "gradient_accumulation_steps": ("grad_accum", ""),
    "warmup_ratio": ("warmup_steps", " (a number of steps)"),
    "max_steps": ("steps", ""),
    "lr_scheduler_type": ("schedule", " (cosine, wsd or constant)"),
    "logging_steps": ("eval_every", " (every step's loss is logged to metrics.jsonl anyway)"),
    "save_steps": ("save_every", ""),
    "eval_steps": ("eval_every", ""),
    "output_dir": ("out", ""),
    "bf16": ("precision", " (precision: bf16)"),
    "fp16": ("precision", " (bf16 or fp32; there is no fp16 training)"),
    "tf32": ("precision", ""),
    "max_grad_norm": ("grad_clip", ""),
    "save_total_limit": ("keep_checkpoints", ""),
    "dataloader_num_workers": ("loader_workers", ""),
    "optim": ("optimizer", ""),
    "resume_from_checkpoint": ("resume", ""),
    "model_name_or_path": ("student", ""),
    "max_seq_length": ("seq_len", ""),
    "max_length": ("seq_len", ""),
    "dataset_name": ("data", ""),
    "dataset_config_name": ("data_config", ""),
    "dataset_text_field": ("text_field", ""),
    "lora_rank": ("lora_r", ""),
    "target_modules": ("lora_targets", ""),
    "use_peft": ("lora_r", " (a rank > 0 turns LoRA on)"),
    "torch_dtype": ("dtype", ""),
    "kd_temperature": ("temperature", ""),
}


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
    renamed = {s.meta.old_key: s.key for s in by_key.values() if s.meta.old_key}
    path = redact(path)  # what messages name
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignore:
            continue
        if key in renamed:
            key = _renamed_key(path, key, renamed[key], data)
        if key not in by_key:
            raise LogitcacheError(f"{path}: unknown key {quoted(key)}{suggest_key(key, by_key)}")
        setting = by_key[key]
        if setting.meta.rest_into and isinstance(value, list):  # as the repeated flag
            if not value:
                raise LogitcacheError(f"{path}: {key}: expected at least one value")
            out[setting.meta.rest_into] = by_key[setting.meta.rest_into].convert(value[1:], path)
            value = value[0]
        out[key] = setting.convert(value, path)
    return out


def _renamed_key(path: str, old: str, new: str, data: dict[str, Any]) -> str:
    """A recipe's key by its old name: the new one, and a line saying so."""
    if new in data:
        raise LogitcacheError(f"{path}: give {new} or {old} (its old name), not both")
    click.echo(f"{path}: {old} is now {new}; the old name goes in the next release", err=True)
    return new


def is_recipe_file(path: str) -> bool:
    """Whether ``--config path`` names a recipe file (not a cache or a run)."""
    return path.startswith(NAME_PREFIX) or path.endswith((".yaml", ".yml", ".json"))


def parse_recipe_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML file (JSON when the name ends in .json), or in the shipped
    recipe ``name:NAME``; one-line errors naming the file (see the module docstring)."""
    shown = f"--config {redact(path)}"
    if path.startswith(NAME_PREFIX):
        text = shipped_text(path[len(NAME_PREFIX) :])
    else:
        text = read_local_text(os.path.expanduser(path), RECIPE_LIMIT, what="--config")
    try:
        data = json.loads(text) if path.endswith(".json") else load_yaml(text)
    except Refused as err:
        raise LogitcacheError(f"{shown}: {err}") from None
    except RecursionError:
        raise LogitcacheError(f"{shown}: nested too deeply to be a recipe") from None
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LogitcacheError(f"{shown}: cannot parse: {first[:120]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise LogitcacheError(f"{shown}: expected a mapping of settings (key: value)")
    return data


def suggest_key(key: str, valid: Iterable[str]) -> str:
    """``; did you mean 'lr'?`` for an unknown key: the key a Hugging Face
    ``TrainingArguments`` name stands for, else the closest spelling."""
    valid = list(valid)
    ours, note = HF_NAMES.get(key.lower().replace("-", "_"), (None, ""))
    if ours in valid:
        return f"; did you mean {ours!r}{note}?"
    close = difflib.get_close_matches(key[:100], valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; keys are the flags of the command's --help, with _ for -"


def flag_for(flag: str, flags: Iterable[str]) -> str | None:
    """Our flag for a Hugging Face ``TrainingArguments`` name given as a flag
    (``--learning-rate`` -> ``--lr``), if ``flags`` has it."""
    ours, _ = HF_NAMES.get(flag.lstrip("-").replace("-", "_").lower(), (None, ""))
    return next((f for f in flags if ours and f == "--" + ours.replace("_", "-")), None)


# -- the recipes shipped with the package ----------------------------------------------
def _shipped_dir() -> Any:
    return resources.files("logitcache") / "recipe_files"


def shipped() -> dict[str, str]:
    """The shipped recipes: name -> what its first comment line says it is for."""
    out = {}
    for entry in sorted(_shipped_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text(encoding="utf-8").splitlines()[0]
            out[entry.name[: -len(".yaml")]] = first.lstrip("# ").strip()
    return out


def shipped_text(name: str) -> str:
    """The text of the shipped recipe ``name``; an unknown name is a one-line error."""
    names = shipped()
    if name.removesuffix(".yaml") not in names:
        raise LogitcacheError(
            f"no shipped recipe named {quoted(name)}; `logitcache recipes` lists them: "
            f"{', '.join(names)}"
        )
    return (_shipped_dir() / f"{name.removesuffix('.yaml')}.yaml").read_text(encoding="utf-8")


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
        value = params[s.key]
        if s.meta.old_key and params.get(s.meta.old_key) is not None:
            given, value = True, _renamed_flag(s, ctx, params[s.meta.old_key])
        if given or s.key not in from_file:
            flat.update(_from_flag(s, value))
        else:
            flat[s.key] = from_file[s.key]
    for s in settings(cls):
        if s.required and flat.get(s.key) is None:
            _missing(ctx, s, config)
        _check_not_redacted(s, flat.get(s.key), config)
    return flat


def _renamed_flag(s: Setting, ctx: click.Context | None, value: Any) -> Any:
    """A flag given by its old name: its value, and a line saying so."""
    if ctx is not None and ctx.get_parameter_source(s.key) == ParameterSource.COMMANDLINE:
        raise LogitcacheError(f"give {s.flag} or {s.old_flag} (its old name), not both")
    command = f" for {ctx.info_name}" if ctx is not None else ""
    line = f"{s.old_flag} is now {s.flag}{command}; the old name goes in the next release"
    click.echo(line, err=True)
    return value


def _check_not_redacted(s: Setting, value: Any, config: str | None) -> None:
    """A saved run (train_config.json) keeps URLs without their credentials: such a value
    is an error asking for the URL again, not a request sent with user ``***``."""
    for text in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(text, str) and "***" in text and redact(text) == text:
            where = f" (from {redact(config)})" if config else ""
            raise LogitcacheError(
                f"{s.flag} {text}{where} was saved with its credentials replaced by ***; "
                f"give {s.flag} again with the full URL"
            )


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


def copy_shipped(names: Iterable[str], directory: str | os.PathLike) -> list[str]:
    """Write the shipped recipes ``names`` as ``directory/NAME.yaml`` (made if missing);
    returns the paths written. An existing file is a one-line error, never overwritten."""
    from pathlib import Path

    texts = {name: shipped_text(name) for name in names}
    target = Path(directory).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        path = target / f"{name.removesuffix('.yaml')}.yaml"
        try:
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(text)
        except FileExistsError:
            raise LogitcacheError(f"{path} already exists; not overwriting it") from None
        written.append(str(path))
    return written
