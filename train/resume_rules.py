"""What a resumed run must share with the run it continues, made from each setting's declaration.

In: a ``TrainConfig``, the ids of its caches and the number of processes. Out: the resume
fingerprint (``resume_fingerprint``: saved in every checkpoint and in ``train_config.json``)
and what differs between a saved one and this run's (``settings_differ``: one phrase per
setting). Each ``TrainConfig`` field declares its part, ``option(...)`` on the field:

- ``resume="may-change"`` or ``"may-grow"``: left out (the resume checks a may-grow's growth);
- ``added_with="x"``: left out while ``x`` is at its default, so runs from before it resume;
- ``fingerprint="rule"``: enters as ``RULES[rule]`` says (another key, a value computed from
  the run, a path compared by what it names); without one, as its value.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.core.options import resume_policy
from logitcache.core.untrusted import redact_values

from .config import TrainConfig, resume_settings

__all__ = ["PATH_SETTINGS", "RULES", "Rule", "resume_fingerprint", "settings_differ"]


@dataclass(frozen=True)
class Run:
    """What the fingerprint takes from the run besides its settings."""

    cache_ids: list[str]
    """The ``cache_id`` of each training cache, the main one first."""
    world_size: int


@dataclass(frozen=True)
class Rule:
    """How a setting enters the fingerprint when not as its value."""

    value: Callable[[Any, TrainConfig, Run], Any]
    """(the setting's value, the config, the run) -> the fingerprint's value; ``None`` with a
    ``key``: no entry."""
    key: str | None = None
    """The fingerprint's key, for a value that is no longer the setting's (several settings
    may share one); None: the setting's own key, in its place."""
    path: bool = False
    """A path: a checkpoint written before paths were resolved holds it as typed, and still
    matches this run's typed value, or another spelling of the same file."""


def _resolved(value: str | None) -> str | None:
    """An existing local path, absolute and normalized; URLs, hub ids and None as given."""
    if value is None or "://" in value or not os.path.exists(value):
        return value
    return str(Path(value).resolve())


def _by_content(value: str | None) -> str | None:
    """A local file by its content (``sha256:...``), so a copy of it is the same setting."""
    if value is not None and "://" not in value and os.path.isfile(value):
        return "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return _resolved(value)


RULES: dict[str, Rule] = {
    # caches by identity, not by path or URL
    "cache_id": Rule(lambda _, c, run: run.cache_ids[0], key="cache_id"),
    "mix_cache_ids": Rule(lambda _, c, run: run.cache_ids[1:] or None, key="mix_cache_ids"),
    # the sequences of one optimizer step, however they are split into processes and
    # micro-batches
    "global_batch": Rule(
        lambda _, c, run: c.batch_size * c.grad_accum * run.world_size, key="global_batch"
    ),
    "path": Rule(lambda value, c, run: _resolved(value), path=True),
    "file": Rule(lambda value, c, run: _by_content(value), path=True),
}
"""The fingerprint rules a ``TrainConfig`` field may name (``option(fingerprint=...)``)."""

_POLICY = resume_policy(TrainConfig)
PATH_SETTINGS = tuple(
    name for name, meta in _POLICY.items() if meta.fingerprint and RULES[meta.fingerprint].path
)
"""Settings naming a local path (or a URL / hub id, kept as typed) that a resumed run must
share, compared by the file they name."""


def resume_fingerprint(
    config: TrainConfig, cache_ids: list[str], world_size: int, loss_module: str | None = None
) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: each must-match setting
    (``resume_settings``) as its declared rule makes it, then ``loss_module`` (the ``repr``
    of a loss other than ``DistillationLoss``), then the rules' own keys. Credentials in a
    URL are left out (it is saved); a resumed run computes the same redacted values."""
    run = Run(cache_ids, world_size)
    own: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    for name, value in resume_settings(config).items():
        rule = RULES.get(_POLICY[name].fingerprint or "")
        if rule is None:
            own[name] = value
        elif rule.key is None:
            own[name] = rule.value(value, config, run)
        elif rule.key not in derived:
            found = rule.value(value, config, run)
            derived |= {} if found is None else {rule.key: found}
    extra = {} if loss_module is None else {"loss_module": loss_module}
    return redact_values({**own, **extra, **derived})


def settings_differ(
    saved: dict[str, Any], current: dict[str, Any], config: TrainConfig
) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, one phrase per setting.

    A path setting (``Rule.path``) that a checkpoint written before paths were resolved holds
    as typed still matches when it is this run's typed value or names the same file."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key), current.get(key)
        if before == now or (key in PATH_SETTINGS and _same_path(before, getattr(config, key))):
            continue
        if key in PATH_SETTINGS and str(before).startswith("sha256:"):  # a file by content
            changed.append(
                f"{key} ({getattr(config, key)} is not the file the run started with: its "
                "content differs)"
            )
            continue
        changed.append(f"{key} ({before!r} -> {now!r})")
    return changed


def _same_path(saved: Any, typed: str | None) -> bool:
    """A legacy (as typed) path of a checkpoint against this run's typed value."""
    if not isinstance(saved, str) or typed is None or saved.startswith("sha256:"):
        return False
    if saved == typed:
        return True
    return os.path.exists(saved) and os.path.exists(typed) and os.path.samefile(saved, typed)
