"""Many teacher processes: which worker this process is, which GPUs it uses, who merges.

In: the environment torchrun gives each process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``) and the precompute settings. Out: the worker
index and count, the device (or GPU slice for ``--device-map``) of this process, and, once
every rank is done, the complete manifest written by rank 0.

Workers never talk while they work: each owns shards ``j % N == worker`` and publishes its
own part manifest (``docs/format.md``); the corpus's tokens they share through the cache's
token blocks (``shares.py``), torchrun ranks meeting once when those are made. Under a job
array the last worker to finish (or ``logitcache merge``) writes ``manifest.json``; under
torchrun the ranks also meet at one barrier at the end, and rank 0 merges then, so the
command returns with the cache complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from logitcache.core.errors import LogitcacheError
from logitcache.storage import Location, Manifest, merge_parts, read_manifest

__all__ = [
    "device_map_memory",
    "distributed_worker",
    "launched_as_ranks",
    "merge_when_all_ranks_are_done",
    "rank_device",
    "ranks_group",
    "resolve_worker",
]

# Ranks finish within about one shard of each other (~1 min for 256 x 2048 tokens at 10k
# tokens/s), but a resumed run can leave them very uneven: the barrier waits long.
_RANKS_WAIT = timedelta(hours=24)
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def distributed_worker() -> tuple[int, int]:
    """(worker, num_workers) from torchrun's RANK / WORLD_SIZE, or (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def resolve_worker(
    num_workers: int | None, worker_index: int | None, tensor_parallel: int = 1
) -> tuple[int, int]:
    """(worker, num_workers) of this process: ``--num-workers N --worker-index I`` (a
    job-array task), else torchrun's RANK of WORLD_SIZE, else (0, 1).

    Under torchrun the ranks are the workers, or with ``--tensor-parallel T`` the groups of T
    consecutive ranks (worker RANK // T of WORLD_SIZE / T): flags that say otherwise are
    refused, since they would leave some shards to no one. A torchrun of one group is one
    task, which a job array's flags may place.
    """
    rank, world = distributed_worker()
    if world > 1:
        if world % tensor_parallel:
            raise LogitcacheError(
                f"--tensor-parallel {tensor_parallel} must divide torchrun's {world} processes"
            )
        rank, world = rank // tensor_parallel, world // tensor_parallel
    if world > 1:
        who = "ranks" if tensor_parallel == 1 else "tensor-parallel groups"
        if num_workers not in (None, world) or worker_index not in (None, rank):
            raise LogitcacheError(
                f"under torchrun the {world} {who} are the workers (this is {who[:-1]} "
                f"{rank}): drop --num-workers / --worker-index, or run a job array without "
                "torchrun"
            )
        return rank, world
    if num_workers is not None and num_workers > 1 and worker_index is None:
        raise LogitcacheError(
            f"--num-workers {num_workers} needs --worker-index I (0..{num_workers - 1}): the "
            "index of this task, e.g. $SLURM_ARRAY_TASK_ID"
        )
    return worker_index or 0, num_workers or 1


def launched_as_ranks(worker: int, num_workers: int, tensor_parallel: int = 1) -> bool:
    """Whether this process is rank ``worker`` of ``num_workers`` torchrun processes, or in
    tensor-parallel group ``worker`` of ``num_workers`` (rather than one task of a job
    array, which has no process group to meet in)."""
    rank, world = distributed_worker()
    return (
        num_workers > 1
        and torch.distributed.is_torchelastic_launched()
        and (rank // tensor_parallel, world // tensor_parallel) == (worker, num_workers)
    )


def _local() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) under torchrun, else (0, 1)."""
    if not torch.distributed.is_torchelastic_launched():
        return 0, 1
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """``--device`` of this process: under torchrun ``auto`` / ``cuda`` mean its own GPU,
    ``cuda:LOCAL_RANK``, so that 8 ranks on a node do not all run on GPU 0."""
    local, _ = _local()
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    if not torch.distributed.is_torchelastic_launched():
        return device
    if local >= torch.cuda.device_count():
        raise LogitcacheError(
            f"torchrun local rank {local} has no GPU of its own ({torch.cuda.device_count()} "
            "visible): use --nproc-per-node <= the number of GPUs"
        )
    return f"cuda:{local}"


def device_map_memory(device_map: str | None) -> dict[int, int] | None:
    """``max_memory`` for ``from_pretrained`` so that a ``--device-map`` teacher stays on the
    GPUs of this rank: under torchrun with P processes on a node of G GPUs, local rank r
    spreads its copy of the teacher over GPUs [r*G/P, (r+1)*G/P). None: no restriction.

    A 70B teacher in bfloat16 (140 GB) needs 2-3 H100s, so 8 GPUs run 2 or 4 copies.
    """
    if device_map not in _DEVICE_MAP_STRATEGIES or not torch.cuda.is_available():
        return None
    local, per_node = _local()
    if per_node == 1:
        return None
    gpus = torch.cuda.device_count()
    share = gpus // per_node
    if share == 0:
        raise LogitcacheError(
            f"--device-map {device_map} with {per_node} processes per node needs at least "
            f"{per_node} GPUs per node ({gpus} visible): lower --nproc-per-node"
        )
    own = range(local * share, (local + 1) * share)
    return {g: torch.cuda.mem_get_info(g)[0] for g in own}  # free bytes, as accelerate's default


@contextmanager
def ranks_group(launched: bool) -> Iterator[Callable[[], None] | None]:
    """Under torchrun (``launched``): the ranks' barrier, on a gloo group made here unless one
    exists (then it is destroyed on the way out); else None.

    The ranks meet twice: once their blocks of the corpus are tokenized (``shares.py``), and
    at the end (``merge_when_all_ranks_are_done``, which uses this group).
    """
    if not launched:
        yield None
        return
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=_RANKS_WAIT)
    try:
        yield dist.barrier
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def merge_when_all_ranks_are_done(url: str, manifest: Manifest | None) -> Manifest:
    """Every rank calls this after its own work: they meet at a barrier, rank 0 writes the
    complete ``manifest.json`` unless its own finish already did, and all return it.

    ``manifest``: what this rank's writer returned (complete if it happened to finish last).
    Needs torchrun's environment; a gloo group serves CPU and GPU runs alike (one barrier,
    no tensors).
    """
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=_RANKS_WAIT)
    try:
        dist.barrier()  # every rank has published its complete part manifest
        if dist.get_rank() == 0 and (manifest is None or not manifest.complete):
            manifest = merge_parts(url)
        dist.barrier()  # manifest.json is published before any rank reads or returns
        if manifest is None or not manifest.complete:
            manifest = read_manifest(Location(url))
    finally:
        if created:
            dist.destroy_process_group()
    return manifest
