"""Which run ``--out`` holds: the ownership check before a run writes there and the
checkpoint ``--resume`` continues from (what it compares: ``resume_rules.py``).

In: a ``TrainConfig`` (``out``, ``resume``, ``overwrite``, the settings it compares). Out:
``claim_out`` refuses an ``--out`` holding another run unless ``--resume`` (continue it) or
``--overwrite`` (remove what a run writes there, nothing else); ``resume`` loads the newest
complete checkpoint inside ``--out``, skipping damaged or missing ones with one line, and
refuses one whose settings differ (``resume_rules.settings_differ``).

A run directory is untrusted input (a teammate hands it over): nothing is read outside
``--out`` (links are resolved and checked), every file is read bounded, and a file in place
of a run's own (a FIFO, a link to ``/dev/zero``) is refused with one line naming it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import Reporter
from logitcache.core.untrusted import is_within, load_json_object, read_local, read_local_text

from .checkpoint import (
    DamagedCheckpoint,
    TrainingProgress,
    checkpoint_dirs,
    load_checkpoint,
    point_latest_at,
    read_latest,
    read_state,
)
from .config import TrainConfig
from .resume_rules import settings_differ

__all__ = ["RUN_OUTPUTS", "claim_out", "read_metrics", "resume", "write_run_file"]

# What a resume reads of the run's own files (train_config.json is ~3 KB; metrics.jsonl
# ~110 B a step, ~2M steps).
CONFIG_LIMIT = 1 << 20
METRICS_LIMIT = 256 << 20

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


def claim_out(config: TrainConfig, rank: int) -> None:
    """Rank 0, before anything is written: ``--out`` is empty, new, or this run's to
    continue (``--resume``) or replace (``--overwrite``)."""
    out = Path(config.out)
    if rank != 0 or not out.is_dir():
        return
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if config.resume:
        _check_run_files(out)
    elif found and config.overwrite:
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif found:
        raise LogitcacheError(
            f"--out {out} holds another run ({', '.join(found)}): add --resume to continue "
            "it, --overwrite to replace it, or choose another --out"
        )


def _check_run_files(out: Path) -> None:
    """Before ``--resume`` uses ``out``: each run file there lies inside ``out`` and is of its
    kind (a directory for ``checkpoints``, ``model``...), and train_config.json is a JSON
    object of at most ``CONFIG_LIMIT`` bytes. (metrics.jsonl is read by ``read_metrics``.)"""
    for name in RUN_OUTPUTS:
        path = out / name
        if not os.path.lexists(path) or name.startswith(".tmp-"):
            continue
        if not is_within(path, out):
            raise LogitcacheError(f"{path} is a link to outside {out}; refusing to resume there")
        if path.is_dir() != (name in _RUN_DIRS):
            raise LogitcacheError(f"{path} is not what a run writes there; refusing to resume")
    config = out / "train_config.json"
    if os.path.lexists(config):
        text = read_local_text(config, CONFIG_LIMIT, "run config")
        load_json_object(text, f"run config {config}")  # an object, or one line saying why


_RUN_DIRS = ("checkpoints", "model", "model-merged")


def read_metrics(path: Path) -> bytes:
    """metrics.jsonl's bytes: a regular file inside the run of at most ``METRICS_LIMIT``."""
    if not is_within(path, path.parent):
        raise LogitcacheError(f"metrics log {path} is a link to outside {path.parent}")
    return read_local(path, METRICS_LIMIT, "metrics log")


def write_run_file(path: Path, text: str) -> None:
    """Replace ``path`` (a run file in ``--out``) with ``text``: written beside it and renamed,
    so a link or FIFO left in its place is replaced, never written through."""
    tmp = path.parent / f".tmp-{path.name}"
    tmp.unlink(missing_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)


def resume(
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict[str, Any],
    total_steps: int,
    reporter: Reporter,
    state_classes: Sequence[type] = (),
    rank: int = 0,
) -> TrainingProgress:
    """The progress of the newest complete checkpoint in ``OUT/checkpoints``, loaded into
    ``model`` and ``optimizer``. Damaged or missing ones (what ``latest`` names, then each
    ``step-N`` newest first) are skipped with one line naming the file and why; none left
    beside some that exist is refused. Settings that differ, a checkpoint past ``--steps``
    or of the other format (``--fsdp``) are refused, one line each."""
    skipped = []
    named = read_latest(config.out)
    found = checkpoint_dirs(config.out)
    if named and named not in {p.name for p in found}:
        skipped.append(f"{named} (named by checkpoints/latest: missing)")
    for path in found:
        try:
            if not is_within(path, config.out):
                raise DamagedCheckpoint(f"{path} is a link to outside {config.out}")
            saved = read_state(path)
            _check_resumable(path, saved, config, fingerprint, total_steps)
            progress, _ = load_checkpoint(
                path, model, optimizer, state_classes=state_classes, saved=saved
            )
        except DamagedCheckpoint as err:
            skipped.append(f"{path.name} ({err})")
            continue
        if skipped:
            reporter.warn(f"--resume: skipped {'; '.join(skipped)}; resuming from {path.name}")
        if rank == 0:
            point_latest_at(config.out, path)
        reporter.log(f"resumed from {path} (step {progress.step})")
        return progress
    if found:
        raise LogitcacheError(
            f"--resume: no complete checkpoint in {Path(config.out) / 'checkpoints'}: "
            + "; ".join(skipped)
        )
    reporter.log(f"--resume: no checkpoint in {config.out}; starting from scratch")
    return TrainingProgress(schedule_steps=total_steps)


def _check_resumable(
    path: Path, saved: Any, config: TrainConfig, fingerprint: dict[str, Any], total_steps: int
) -> None:
    """A readable checkpoint that this run cannot continue: refused, not skipped."""
    changed = settings_differ(saved.config, fingerprint, config)
    if changed:
        raise LogitcacheError(
            f"cannot resume {path}: settings differ from the run that wrote it: "
            + "; ".join(changed)
        )
    if saved.sharded != config.fsdp:
        kinds = ("an --fsdp (dcp)", "without") if saved.sharded else ("a whole", "with")
        raise LogitcacheError(
            f"cannot resume {path / 'state.json'}: it says {kinds[0]} checkpoint and this run "
            f"is {kinds[1]} --fsdp; resume with the settings of the run that wrote it"
        )
    progress = saved.progress
    if progress.step > total_steps or progress.schedule_steps > total_steps:
        end = max(progress.step, progress.schedule_steps)
        raise LogitcacheError(
            f"cannot resume {path / 'state.json'}: the run is at step {progress.step} of "
            f"{end} and this run stops at step {total_steps}; give --steps {end} or more"
        )
