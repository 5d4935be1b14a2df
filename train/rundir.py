"""Which run ``--out`` holds: the ownership check before a run writes there, and how the
paths a run was given enter the fingerprint ``--resume`` compares.

In: a ``TrainConfig`` (``out``, ``resume``, ``overwrite`` and its path settings). Out:
``claim_out`` refuses an ``--out`` holding another run unless ``--resume`` (continue it) or
``--overwrite`` (remove what a run writes there, nothing else); ``path_settings`` gives the
fingerprint's values of the path settings, resolved so that ``student.json`` and
``/abs/student.json`` are one run; ``settings_differ`` lists what a resumed run changed,
also accepting the paths as typed by checkpoints written before paths were resolved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from logitcache.errors import LogitcacheError

from .checkpoint import latest_checkpoint
from .config import TrainConfig

__all__ = ["PATH_SETTINGS", "RUN_OUTPUTS", "claim_out", "path_settings", "settings_differ"]

# What a training run writes in --out: all that --overwrite removes, and all that makes a
# directory "another run's".
RUN_OUTPUTS = (
    "train_config.json",
    "metrics.jsonl",
    "checkpoints",
    "model",
    "model-merged",
    ".tmp-model",
    ".tmp-model-merged",
)

# Settings naming a local path (or a URL / hub id, kept as typed) that a resumed run must share.
PATH_SETTINGS = ("student", "student_config", "tokenizer", "online_teacher", "eval_cache")


def claim_out(config: TrainConfig, rank: int) -> None:
    """Rank 0, before anything is written: ``--out`` is empty, new, or this run's to
    continue (``--resume``) or replace (``--overwrite``)."""
    out = Path(config.out)
    if rank != 0 or not out.is_dir():
        return
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if config.resume:
        _check_resumable(out)
    elif found and config.overwrite:
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif found:
        raise LogitcacheError(
            f"--out {out} holds another run ({', '.join(found)}): add --resume to continue "
            "it, --overwrite to replace it, or choose another --out"
        )


def _check_resumable(out: Path) -> None:
    """A ``latest`` pointer naming a checkpoint that is gone, beside others, is refused:
    starting from scratch there would silently throw them away. (No pointer at all is a
    run killed before its first pointer write: it starts afresh, as the run it continues.)"""
    root, pointer = out / "checkpoints", out / "checkpoints" / "latest"
    steps = sorted(p.name for p in root.glob("step-*") if (p / "state.json").is_file())
    if not pointer.is_file() or latest_checkpoint(str(out)) is not None or not steps:
        return
    named = pointer.read_text().strip()
    raise LogitcacheError(
        f"--resume: {pointer} names {named}, which is missing, beside {', '.join(steps)}: "
        f"write the name of the checkpoint to continue from into {pointer}"
    )


def path_settings(config: TrainConfig) -> dict[str, str | None]:
    """The fingerprint's values of ``PATH_SETTINGS``: an existing local path resolved
    (absolute, normalized), the student config by its content (``sha256:...``); URLs, hub
    ids and None as given."""
    return {key: _canonical(key, getattr(config, key)) for key in PATH_SETTINGS}


def _canonical(key: str, value: str | None) -> str | None:
    if value is None or "://" in value or not os.path.exists(value):
        return value
    if key == "student_config" and os.path.isfile(value):
        return "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return str(Path(value).resolve())


def settings_differ(
    saved: dict[str, Any], current: dict[str, Any], config: TrainConfig
) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, one phrase per setting.

    A checkpoint written before paths were resolved holds them as typed; such a value still
    matches when it is this run's typed value or names the same file."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key), current.get(key)
        if before == now or (key in PATH_SETTINGS and _same_path(before, getattr(config, key))):
            continue
        if key == "student_config" and str(before).startswith("sha256:") and now != before:
            changed.append(f"student_config ({config.student_config} is not the file the run "
                           "started with: its content differs)")  # fmt: skip
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
