"""Checkpoints: written atomically, loaded without unpickling anything.

In: the student, optimizer, step, stream position and RNG states. Out: a directory
``checkpoints/step-NNNNNNN/`` and a ``latest`` pointer written after it. A crash or a full
disk mid-save leaves only a ``.tmp-`` directory; the previous checkpoint stays valid.

Two formats, told apart by ``state.json``'s ``format``:
- whole (DDP and single-process runs; written by rank 0): ``model.safetensors``,
  ``optimizer.pt`` (loaded with ``weights_only=True``), ``state.json``;
- ``dcp`` (``--fsdp``; written by every rank, torch.distributed.checkpoint): each rank's
  shards of the model and optimizer state (``__R_0.distcp``) and the global ``.metadata``,
  plus rank 0's ``rng.pt`` and ``state.json``. DCP reshards on load, so it resumes on any
  number of ranks, sharded or not. Its metadata is read by an unpickler that admits only
  the exact classes DCP's records hold, and its non-tensor values with ``weights_only=True``.

A checkpoint is untrusted input (a teammate hands a run directory over): every file is
read bounded (``logitcache.core.untrusted``), must be a regular file inside its step directory,
and ``state.json`` is checked field by field (``read_state``) before anything uses it. A
damaged checkpoint raises ``DamagedCheckpoint``, naming the file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from logitcache.core.errors import LogitcacheError
from logitcache.core.untrusted import is_within, load_json, read_local, read_local_text
from logitcache.storage import Location

__all__ = [
    "DamagedCheckpoint",
    "SavedState",
    "TrainingProgress",
    "checkpoint_dirs",
    "is_out_of_space",
    "latest_checkpoint",
    "load_checkpoint",
    "point_latest_at",
    "read_latest",
    "read_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
]

# Bounds of what a resume reads whole. Written sizes: state.json ~2 KB, latest 12 bytes, a
# .metadata ~0.7 KB per tensor shard (a 1.5B student's AdamW state over 8 ranks: ~3 MB).
STATE_LIMIT = 1 << 20
POINTER_LIMIT = 64
METADATA_LIMIT = 64 << 20
_STEP_NAME = re.compile(r"step-([0-9]{7,12})")  # what save_checkpoint names a checkpoint


class DamagedCheckpoint(LogitcacheError):
    """A checkpoint that cannot be resumed from (missing, damaged or foreign files); the
    message names the file. ``--resume`` skips it for an earlier one."""


@dataclass
class TrainingProgress:
    """Resume state: the optimizer step and the data stream position."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    tokens: int = 0
    schedule_steps: int = 0
    """The length of the learning-rate schedule: the run's total steps when it started (a
    resumed run that trains longer keeps it); 0 in checkpoints written before it existed."""

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "tokens": self.tokens,
            "schedule_steps": self.schedule_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "epoch", "consumed", "tokens"):
            setattr(self, key, int(state[key]))
        self.schedule_steps = int(state.get("schedule_steps", 0))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: TrainingProgress,
    config_fingerprint: dict[str, Any],
    keep: int,
    *,
    sharded: bool = False,
    rank: int = 0,
) -> Path | None:
    """The whole format, written by rank 0 (other ranks return None); with ``sharded``
    the ``dcp`` format, written by every rank together (``save_sharded_checkpoint``)."""
    if sharded:
        return save_sharded_checkpoint(
            out, model, optimizer, progress, config_fingerprint, keep, rank=rank
        )
    if rank != 0:
        return None
    loc = Location(out)
    name = f"step-{progress.step:07d}"
    try:
        with loc.staged(f"checkpoints/{name}") as tmp:
            Path(tmp).mkdir()
            save_model(model, f"{tmp}/model.safetensors")
            torch.save(
                {"optimizer": optimizer.state_dict(), "rng": _rng_state()}, f"{tmp}/optimizer.pt"
            )
            state = {"progress": progress.state_dict(), "config": config_fingerprint}
            Path(f"{tmp}/state.json").write_text(json.dumps(state, indent=1))
        loc.publish_bytes("checkpoints/latest", name.encode())
    except Exception as err:
        if is_out_of_space(err):
            raise _out_of_space(out, progress.step) from None
        raise
    _prune(Path(loc.path("checkpoints")), keep)
    return Path(loc.path(f"checkpoints/{name}"))


def _out_of_space(out: str, step: int) -> LogitcacheError:
    previous = latest_checkpoint(out)
    kept = (
        f"the previous checkpoint ({previous.name}) is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    return LogitcacheError(
        f"out of disk while checkpointing step {step} to {out}: {kept}; "
        "free space and rerun with --resume"
    )


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_out_of_space(err: BaseException) -> bool:
    """Whether a failed write ran out of disk: an OSError, or the same failure as safetensors
    ("... (os error 28)") and torch.save (its zip writer's failed write, errno lost) report it."""
    if isinstance(err, OSError):
        return err.errno in _NO_SPACE
    text = str(err)
    if any(f"(os error {code})" in text for code in _NO_SPACE):
        return True
    return isinstance(err, RuntimeError) and (
        "inline_container" in text or "PytorchStreamWriter" in text
    )


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    _remove_staged(root)


def _remove_staged(root: Path) -> None:
    # A process killed mid-save leaves its partial checkpoint (as large as a whole one) or
    # pointer under a .tmp- name; only this writer (rank 0) ever stages there.
    for stale in root.glob(".tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def point_latest_at(out: str, path: Path) -> None:
    """Rank 0, resuming from ``path``: ``latest`` names it, and what crashed writes staged
    is removed (the resumed run may have no step left to save, which would do both)."""
    if read_latest(out) != path.name:
        Location(out).publish_bytes("checkpoints/latest", path.name.encode())
    _remove_staged(path.parent)


def latest_checkpoint(out: str) -> Path | None:
    """The checkpoint ``latest`` names, when it is a step directory inside ``out`` holding a
    ``state.json``; None otherwise (no pointer, or one ``read_latest`` refuses)."""
    try:
        name = read_latest(out)
    except LogitcacheError:
        return None
    path = Path(out) / "checkpoints" / name if name else None
    if path is None or not is_within(path, out) or not (path / "state.json").is_file():
        return None
    return path


def read_latest(out: str) -> str | None:
    """The step name ``OUT/checkpoints/latest`` holds (None: no pointer). Anything but a
    small regular file naming a step (``step-NNNNNNN``) is refused: the pointer is never
    followed as a path."""
    pointer = Path(out) / "checkpoints" / "latest"
    if not os.path.lexists(pointer):
        return None
    if not is_within(pointer, out):
        raise LogitcacheError(f"{pointer} is a link to outside {out}; refusing to read it")
    name = read_local_text(pointer, POINTER_LIMIT, "checkpoint pointer").strip()
    if not _STEP_NAME.fullmatch(name):
        raise LogitcacheError(
            f"{pointer} holds {name[:40]!r}, not a checkpoint name (step-NNNNNNN); delete it "
            "to resume from the newest complete checkpoint"
        )
    return name


def checkpoint_dirs(out: str) -> list[Path]:
    """The ``step-N`` entries of ``OUT/checkpoints``, newest first (unchecked: see
    ``read_state``); ``checkpoints`` itself must be a directory inside ``out``."""
    root = Path(out) / "checkpoints"
    if not os.path.lexists(root):
        return []
    if not root.is_dir() or not is_within(root, out):
        raise LogitcacheError(f"{root} is not a directory inside {out}; refusing to read it")
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


@dataclass(frozen=True)
class SavedState:
    """A checkpoint's ``state.json``, checked: where the run was and what it was."""

    progress: TrainingProgress
    config: dict[str, Any]
    """The fingerprint of the settings the run was started with."""
    sharded: bool
    """The ``dcp`` format (``--fsdp``); else the whole one."""


_MAX_COUNT = 1 << 62  # sequences, tokens: far beyond any run, far below overflow


def read_state(path: Path) -> SavedState:
    """``path/state.json`` read bounded and checked field by field: an object holding
    ``progress`` (integers in range; ``step`` at least 1 and the one the directory is named
    after), ``config`` (an object) and ``format`` (absent or ``dcp``). Raises
    ``DamagedCheckpoint`` naming the file and the field. (Whether this run can continue from
    that step is the caller's to say: ``rundir.resume``.)"""
    file = path / "state.json"
    text = _read_inside(path, "state.json", STATE_LIMIT)
    state = load_json(text, str(file), error=DamagedCheckpoint)
    if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
        raise DamagedCheckpoint(f"{file} holds no 'progress' object")
    if not isinstance(state.get("config"), dict):
        raise DamagedCheckpoint(f"{file} holds no 'config' object")
    if state.get("format", "whole") not in ("whole", "dcp"):
        raise DamagedCheckpoint(f"{file}: 'format' = {_short(state['format'])} is not 'dcp'")
    saved = state["progress"]
    schedule = _field(file, saved, "schedule_steps", 0, _MAX_COUNT, default=0)
    step = _field(file, saved, "step", 1, _MAX_COUNT)
    named = _STEP_NAME.fullmatch(path.name)
    if named and int(named.group(1)) != step:
        raise DamagedCheckpoint(f"{file}: 'step' = {step} in a directory named {path.name}")
    progress = TrainingProgress(
        step=step,
        epoch=_field(file, saved, "epoch", 0, _MAX_COUNT),
        consumed=_field(file, saved, "consumed", 0, _MAX_COUNT),
        tokens=_field(file, saved, "tokens", 0, _MAX_COUNT),
        schedule_steps=schedule,
    )
    return SavedState(progress, state["config"], state.get("format") == "dcp")


def _field(file: Path, saved: dict, key: str, low: int, high: int, default: int | None = None):
    value = saved.get(key, default)
    if type(value) is not int or not low <= value <= high:
        bounds = f">= {low}" if high == _MAX_COUNT else f"from {low} to {high}"
        raise DamagedCheckpoint(
            f"{file}: 'progress.{key}' = {_short(value)} must be an integer {bounds}"
        )
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _read_inside(path: Path, name: str, limit: int) -> bytes:
    """A file of the checkpoint, read whole (at most ``limit`` bytes): a regular file whose
    links stay inside the checkpoint directory."""
    file = _inside(path, name)
    try:
        return read_local(file, limit, "checkpoint file")
    except LogitcacheError as err:
        raise DamagedCheckpoint(str(err)) from None


def _inside(path: Path, name: str) -> Path:
    """``path/name`` when it is a regular file inside ``path`` (links resolved); a FIFO or a
    link to ``/dev/zero`` or elsewhere raises ``DamagedCheckpoint`` unread."""
    file = path / name
    if not os.path.lexists(file):
        raise DamagedCheckpoint(f"{file} is missing")
    if not is_within(file, path):
        raise DamagedCheckpoint(f"{file} is a link to outside its checkpoint; refusing it")
    try:
        regular = stat.S_ISREG(os.stat(file).st_mode)
    except OSError as err:
        raise DamagedCheckpoint(f"cannot read {file}: {err.strerror}") from None
    if not regular:
        raise DamagedCheckpoint(f"{file} is not a regular file; refusing to read it")
    return file


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    state_classes: Sequence[type] = (),
    saved: SavedState | None = None,
) -> tuple[TrainingProgress, dict[str, Any]]:
    """Restores model, optimizer and RNG states; returns (progress, saved config).

    Either format loads into a sharded or a whole model (a ``dcp`` checkpoint is resharded
    to this run's ranks; every rank must call this for it). ``saved``: the checkpoint's
    ``read_state`` (read here if not given). ``state_classes``: tensor subclasses the
    optimizer's state may hold (torchao's 8-bit moments), admitted by the ``weights_only``
    loads. A damaged or foreign file (a pickle where optimizer.pt should be, say) raises
    ``DamagedCheckpoint`` with its name; nothing in it is executed.
    """
    saved = saved or read_state(path)
    file = path / "state.json"
    try:
        with torch.serialization.safe_globals(list(state_classes)):
            if saved.sharded:
                file = path / ".metadata"
                _load_sharded(path, model, optimizer)
                file = _inside(path, "rng.pt")
                blob = torch.load(file, map_location="cpu", weights_only=True)
            else:
                file = _inside(path, "model.safetensors")
                load_model(model, str(file))
                file = _inside(path, "optimizer.pt")
                blob = torch.load(file, map_location="cpu", weights_only=True)
                optimizer.load_state_dict(blob["optimizer"])
        _set_rng_state(blob["rng"])
        return saved.progress, saved.config
    except DamagedCheckpoint:
        raise
    except Exception as err:  # torch, safetensors and json raise assorted types
        reason = _first_line(err)
        if isinstance(err, pickle.UnpicklingError):  # torch's text suggests the unsafe load
            reason = "it holds objects other than tensors, refused unread (weights_only)"
        raise DamagedCheckpoint(
            f"cannot resume from {file}: {type(err).__name__}: {reason}; the checkpoint is "
            "damaged or not one of ours"
        ) from None


# -- the sharded (torch.distributed.checkpoint) format ----------------------------------------
def save_sharded_checkpoint(
    out: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: TrainingProgress,
    config_fingerprint: dict[str, Any],
    keep: int,
    *,
    rank: int,
) -> Path:
    """Every rank writes its shards with DCP into ``checkpoints/.tmp-step-N``; rank 0 adds
    ``rng.pt`` and ``state.json`` and publishes it (rename, then ``latest``). Collective."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out) / "checkpoints"
    name = f"step-{progress.step:07d}"
    tmp = root / f".tmp-{name}-dcp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
        if rank == 0:
            torch.save({"rng": _rng_state()}, tmp / "rng.pt")
            state = {
                "format": "dcp",
                "progress": progress.state_dict(),
                "config": config_fingerprint,
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            _publish_dir(tmp, root / name)
            Location(out).publish_bytes("checkpoints/latest", name.encode())
    except Exception as err:
        if is_out_of_space(err) or "No space left on device" in str(err):
            raise _out_of_space(out, progress.step) from None
        raise
    if rank == 0:
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return root / name


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _publish_dir(tmp: Path, final: Path) -> None:
    """fsync every file, then rename the directory into place (a crash leaves ``tmp``)."""
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _read_metadata(path)  # a foreign one is refused here, before DCP starts
    # The optimizer's state is created here (a step at lr 0) so that DCP has tensors of
    # this run's sharding to read the saved moments into.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner())
    except CheckpointException as err:  # a BaseException holding each rank's failure
        failure = next(iter(err.failures.values()), err)
        failure = failure[0] if isinstance(failure, tuple) else failure
        raise RuntimeError(f"{type(failure).__name__}: {failure}") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


# What DCP's pickled .metadata holds (found by recording the globals of real ones, whole
# and FSDP-sharded): its record classes, the file index, torch's sizes, layouts and dtypes.
# Exact (module, name) pairs: pickle resolves a dotted name ("os.system" through a module's
# imports), so nothing is admitted module-wide and no name with a dot.
_METADATA_CLASSES = frozenset(
    [
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
    ]
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and name in _dtypes()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata record")


def _dtypes() -> frozenset[str]:
    """The names of torch's dtypes (``float32``, ``bfloat16``...), none dotted."""
    return frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))


def _read_metadata(path: Path):
    """``path/.metadata`` read bounded by ``_MetadataUnpickler``, and its file index checked:
    each entry a slice of a regular file inside ``path`` (DCP opens what it names)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    file = path / ".metadata"
    data = _read_inside(path, ".metadata", METADATA_LIMIT)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # pickle raises assorted types for damaged bytes
        reason = f"{type(err).__name__}: {_first_line(err)}"
        if isinstance(err, pickle.UnpicklingError):
            reason += ", refused unread"
        raise DamagedCheckpoint(f"cannot resume from {file}: {reason}") from None
    index = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(index, dict):
        raise DamagedCheckpoint(f"{file} is not a checkpoint's metadata")
    sizes: dict[str, int] = {}
    for info in index.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or "/" in name:
            raise DamagedCheckpoint(f"{file} names a data file outside its checkpoint")
        if name not in sizes:
            sizes[name] = _inside(path, name).stat().st_size
        offset, length = info.offset, info.length
        ints = type(offset) is int and type(length) is int
        if not ints or offset < 0 or length < 0 or offset + length > sizes[name]:
            raise DamagedCheckpoint(f"{file} names bytes past the end of {path / name}")
        if info.transform_descriptors:
            raise DamagedCheckpoint(
                f"{file} asks for transforms ({_short(info.transform_descriptors)})"
            )
    return metadata


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's reader, its ``.metadata`` read by ``_read_metadata``."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """DCP's planner, non-tensor values (learning rates, betas) read ``weights_only``."""

        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(
                    self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded
                )
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()
