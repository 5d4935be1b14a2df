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
  DCP's own record classes, and its non-tensor values with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from logitcache.errors import LogitcacheError
from logitcache.storage import Location

__all__ = [
    "TrainingProgress",
    "is_out_of_space",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "save_sharded_checkpoint",
]


@dataclass
class TrainingProgress:
    """Resume state: the optimizer step and the data stream position."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed,
                "tokens": self.tokens}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "epoch", "consumed", "tokens"):
            setattr(self, key, int(state[key]))


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
        return save_sharded_checkpoint(out, model, optimizer, progress, config_fingerprint,
                                       keep, rank=rank)  # fmt: skip
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
    # A process killed mid-save leaves its partial checkpoint (as large as a whole one) or
    # pointer under a .tmp- name; only this writer (rank 0) ever stages there.
    for stale in root.glob(".tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def latest_checkpoint(out: str) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    state_classes: Sequence[type] = (),
) -> tuple[TrainingProgress, dict[str, Any]]:
    """Restores model, optimizer and RNG states; returns (progress, saved config).

    Either format loads into a sharded or a whole model (a ``dcp`` checkpoint is resharded
    to this run's ranks; every rank must call this for it). ``state_classes``: tensor
    subclasses the optimizer's state may hold (torchao's 8-bit moments), admitted by the
    ``weights_only`` loads. A damaged or foreign file (a pickle where optimizer.pt should
    be, say) is refused with its name; nothing in it is executed.
    """
    progress = TrainingProgress()
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
        progress.load_state_dict(state["progress"])
        with torch.serialization.safe_globals(list(state_classes)):
            if state.get("format") == "dcp":
                file = path / ".metadata"
                _load_sharded(path, model, optimizer)
                file = path / "rng.pt"
                blob = torch.load(file, map_location="cpu", weights_only=True)
            else:
                file = path / "model.safetensors"
                load_model(model, str(file))
                file = path / "optimizer.pt"
                blob = torch.load(file, map_location="cpu", weights_only=True)
                optimizer.load_state_dict(blob["optimizer"])
        _set_rng_state(blob["rng"])
        return progress, state["config"]
    except Exception as err:  # torch, safetensors and json raise assorted types
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        if isinstance(err, pickle.UnpicklingError):  # torch's text suggests the unsafe load
            reason = "it holds objects other than tensors, refused unread (weights_only)"
        raise LogitcacheError(
            f"cannot resume from {file}: {type(err).__name__}: {reason}; the checkpoint is "
            f"damaged or not one of ours (delete {path} to resume from an earlier one)"
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
            state = {"format": "dcp", "progress": progress.state_dict(),
                     "config": config_fingerprint}  # fmt: skip
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

    with open(path / ".metadata", "rb") as fh:  # a foreign one is refused here, unread
        _MetadataUnpickler(fh).load()
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
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])  # fmt: skip


# What DCP's pickled .metadata may name: its own records and torch's sizes and dtypes.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", None),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in _METADATA_CLASSES or (module, None) in _METADATA_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata record")


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's reader, its pickled ``.metadata`` read by ``_MetadataUnpickler``."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(Path(self.path) / ".metadata", "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
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

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                            loaded)  # fmt: skip
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()
