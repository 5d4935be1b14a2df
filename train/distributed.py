"""Where the trainer runs: device, rank and world size, and the data-parallel wrapping.

In: the ``--device`` setting and torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``). Out: ``Env`` (rank, world size, device), the process group (gloo on CPU,
nccl on GPU), the student wrapped for DDP, and the checks that every rank agrees.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from logitcache.core.errors import LogitcacheError

__all__ = [
    "Env",
    "autocast_for",
    "barrier",
    "check_ranks_resume_together",
    "setup_distributed",
    "wrap_ddp",
]


@dataclass
class Env:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> Env:
    """The device (``auto``: CUDA if there is one) and, under torchrun, the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_name)
        except RuntimeError:
            raise LogitcacheError(
                f"--device {device_name}: not a device name (auto, cpu, cuda, cuda:N, mps)"
            ) from None
    if world > 1:
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Env(rank, world, device)
    return Env(0, 1, device)


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def autocast_for(precision: str, env: Env):
    """bfloat16 autocast for ``bf16``, and for ``auto`` on CUDA; else a no-op context."""
    if precision == "bf16" or (precision == "auto" and env.device.type == "cuda"):
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_ranks_resume_together(step: int, env: Env, out: str) -> None:
    """Every rank must resume from the same checkpoint: an --out that only rank 0's node
    sees would start the other nodes at step 0, and the ranks' collectives would stop
    matching. Cheap: one all-reduce of two integers."""
    if not env.distributed:
        return
    steps = torch.tensor([step, -step], dtype=torch.int64, device=env.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    high, low = int(steps[0].item()), -int(steps[1].item())
    if high != low:
        raise LogitcacheError(
            f"--resume: the ranks found different checkpoints in {out} (steps {low} to {high}); "
            "--out must be one directory that every node sees (a shared filesystem)"
        )


def wrap_ddp(module: torch.nn.Module, env: Env) -> torch.nn.Module:
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
