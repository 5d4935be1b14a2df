"""A teacher split over several GPUs: torchrun ranks in tensor-parallel groups.

In: torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` /
``MASTER_PORT``) and ``--tensor-parallel N``. Out: this rank's group (ranks ``[g*N, (g+1)*N)``
are group ``g``, which is worker ``g`` of ``WORLD_SIZE / N``, or, where torchrun started one
group, the worker that ``--num-workers`` / ``--worker-index`` name), the group as torch's default
process group for the teacher's load and forwards (transformers' ``tp_plan="auto"`` splits
the teacher over the default group, so each group gets one of its own), and the writer of
each rank: the group's first rank writes, the others run the same batches and write nothing.

The ranks of a group must call the teacher in lockstep (every split layer all-reduces or
gathers), so they must see the same work: each reads the corpus itself (the same sequences
in the same order), and the first rank hashes the teacher's weights and opens the cache for
them, handing them the spec and its view of the cache (which shards are done) before the
first forward.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from logitcache.core.errors import LogitcacheError
from logitcache.storage import CacheSpec, CacheWriter, Manifest
from logitcache.storage.writer import WorkerView

__all__ = [
    "TensorParallelGroup",
    "from_first_rank",
    "group_of",
    "group_writer",
    "tensor_parallel_group",
]

# How long a rank waits in a collective for the rest of its group: at most the first rank's
# weights hash before the first one (140 GB at ~1 GB/s: ~2.5 min for a 70B teacher), then
# the slowest rank's host work between two forwards (bounded by the writer's queue of 2
# shards); a rank that fails makes torchrun stop the others sooner.
_GROUP_WAIT = timedelta(minutes=30)


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's place among ``size`` ranks that share one copy of the teacher."""

    size: int
    """N: ranks per teacher copy."""
    rank: int
    """This rank's place in its group, 0..N-1 (0 writes)."""
    index: int
    """The group's number: the worker index of its shards."""
    count: int
    """Groups in the job: the worker count."""

    @property
    def writes(self) -> bool:
        return self.rank == 0


def group_of(size: int) -> TensorParallelGroup:
    """This rank's group under torchrun, checked against the launch; one-line errors."""
    if not torch.distributed.is_torchelastic_launched():
        raise LogitcacheError(
            f"--tensor-parallel {size} runs under torchrun, one process per GPU of the teacher: "
            f"torchrun --nproc-per-node {size} -m logitcache.cli precompute ..."
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % size or per_node % size:
        raise LogitcacheError(
            f"--tensor-parallel {size} needs whole groups on each node: torchrun started "
            f"{per_node} processes per node ({world} in all); use --nproc-per-node {size} or a "
            "multiple of it"
        )
    return TensorParallelGroup(size=size, rank=rank % size, index=rank // size, count=world // size)


@contextlib.contextmanager
def tensor_parallel_group(
    size: int, worker: int, num_workers: int
) -> Iterator[TensorParallelGroup | None]:
    """Within: this rank's group as torch's default process group (None when ``size`` is 1).

    ``worker`` / ``num_workers``: the config's, which must be the group's. The groups meet
    through torchrun's own store, each under its own key prefix; the group is destroyed on
    the way out, so the ranks can meet as one world afterwards (the merge).
    """
    if size == 1:
        yield None
        return
    group = group_of(size)
    if group.count == 1:  # one group under torchrun: a task that job-array flags may place
        group = replace(group, index=worker, count=num_workers)
    if (group.index, group.count) != (worker, num_workers):
        raise LogitcacheError(
            f"--tensor-parallel {size}: this rank is in group {group.index} of {group.count}, "
            f"the workers, but the settings say worker {worker} of {num_workers}"
        )
    dist = torch.distributed
    if dist.is_initialized():
        raise LogitcacheError(
            "--tensor-parallel needs torch.distributed uninitialized: the teacher pass makes "
            "its own groups (call it from a fresh torchrun process)"
        )
    store, _, _ = next(dist.rendezvous("env://", timeout=_GROUP_WAIT))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"logitcache-tensor-parallel-{group.index}", store),
        rank=group.rank,
        world_size=group.size,
        timeout=_GROUP_WAIT,
    )
    try:
        yield group
    finally:
        dist.destroy_process_group()


@dataclass
class _Written:
    bytes: int = 0


class _NoWriter(WorkerView):
    """The writer of a group's other ranks: the first rank's view of the cache, no output."""

    def __init__(self, manifest: Manifest, worker: int, num_workers: int) -> None:
        self.manifest, self.worker, self.num_workers = manifest, worker, num_workers

    def attach_tokenizer(self, tokenizer: Any) -> None:
        pass

    def write_shard(self, shard: int, records: Any) -> _Written:
        return _Written()

    def finish(self, n_sequences_total: int) -> None:
        return None


def from_first_rank(
    group: TensorParallelGroup | None,
    make: Callable[[], Any],
    share: Callable[[Any], Any] = lambda made: made,
) -> Any:
    """``make()`` on the group's first rank (every rank without a group), which sends
    ``share`` of it to the others; they return what it sent. An error of ``make`` is raised
    on every rank: the others get its message instead of waiting on forwards that never
    come. For the work one rank does for its group: the weights' hash, opening the cache."""
    if group is None:
        return make()
    dist = torch.distributed
    if not group.writes:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)  # pickled by our own rank 0: trusted
        value, error = box[0]
        if error is not None:
            raise LogitcacheError(error)
        return value
    try:
        made = make()
    except Exception as err:
        dist.broadcast_object_list([(None, str(err) or type(err).__name__)], src=0)
        raise
    dist.broadcast_object_list([(share(made), None)], src=0)
    return made


@contextlib.contextmanager
def group_writer(
    url: str, spec: CacheSpec, group: TensorParallelGroup | None, worker: int, num_workers: int
) -> Iterator[CacheWriter | _NoWriter]:
    """The ``CacheWriter`` of a rank that writes; for the others of its group, the writer's
    view of the cache at opening (or its error, raised on every rank alike)."""
    made = from_first_rank(
        group,
        lambda: CacheWriter(url, spec, worker=worker, num_workers=num_workers),
        share=lambda writer: writer.manifest,
    )
    if group is not None and not group.writes:
        yield _NoWriter(made, worker, num_workers)
        return
    with made:
        yield made
