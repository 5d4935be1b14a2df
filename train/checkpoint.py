"""Checkpoints: written atomically, loaded without unpickling anything.

In: the student, optimizer, step, stream position and RNG states. Out: a directory
``checkpoints/step-NNNNNNN/`` (``model.safetensors``, ``optimizer.pt`` loaded with
``weights_only=True``, ``state.json``) and a ``latest`` pointer written after it. A crash
or a full disk mid-save leaves only a ``.tmp-`` directory; the previous checkpoint stays valid.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
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
) -> Path:
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
            previous = latest_checkpoint(out)
            kept = (
                f"the previous checkpoint ({previous.name}) is intact"
                if previous
                else ("no earlier checkpoint exists")
            )
            raise LogitcacheError(
                f"out of disk while checkpointing step {progress.step} to {out}: {kept}; "
                "free space and rerun with --resume"
            ) from None
        raise
    _prune(Path(loc.path("checkpoints")), keep)
    return Path(loc.path(f"checkpoints/{name}"))


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
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainingProgress, dict[str, Any]]:
    """Restores model, optimizer and RNG states; returns (progress, saved config).

    A damaged or foreign file (a pickle where optimizer.pt should be, say) is refused with
    its name; nothing in it is executed (safetensors, ``weights_only=True``).
    """
    progress = TrainingProgress()
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
        progress.load_state_dict(state["progress"])
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
