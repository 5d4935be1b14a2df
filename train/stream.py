"""A cache streamed in ``logitcache train``'s order: micro-batches of one rank, exact resume.

In: a ``CacheDataset`` (its training split), the micro-batch size, seed, rank, world size
and gradient accumulation, and a position. Out: collated micro-batches (``DistillCollator``
dicts) forever, epoch after epoch, in the block-shuffled order of ``logitcache.train.order``.

An optimizer step takes the next ``batch_size * world_size * grad_accum`` sequences of the
epoch; micro-batch a of rank r is their rows [s*mb, (s+1)*mb) with s = a * world_size + r,
so a step never straddles two epochs (the last one is short; a rank with nothing left gets
one all-padding row) and any split of one global batch between ranks and accumulation trains
on the same sequences. A position is ``StreamState``: the epoch, the sequences of it that
all ranks have consumed, and the micro-batch of this rank within the step.

``state_dict()`` / ``load_state_dict()`` follow torchdata's ``StatefulDataLoader``: the
iterator of each DataLoader worker saves its own next position (worker w of W yields
micro-batches w, w + W, ...), so a restored loader with the same workers continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .collator import DistillCollator
from .order import StreamState, epoch_order, heldout_mask, mixture_order


class StreamSource(Protocol):
    """What a stream reads of its dataset: a ``CacheDataset`` (dataset.py makes streams with
    ``CacheDataset.stream``; naming the protocol here keeps the import one way)."""

    urls: list[str]
    split: str
    eval_fraction: float
    sizes: list[int]

    def readers(self) -> Sequence[Any]: ...

    def read(self, source: int, index: int) -> dict[str, torch.Tensor]: ...

    def __len__(self) -> int: ...


__all__ = ["CacheStream"]


class CacheStream(IterableDataset):
    """Micro-batches of rank ``rank`` of ``world_size`` from ``dataset``'s training split.

    ``weights``: mixing weights of the dataset's caches (any positive scale; default their
    sizes). ``block_shards``: the shuffle window, in shards. ``epochs``: stop after this
    many (default: never). ``start``: a step boundary to start at (``StreamState``).
    Use ``DataLoader(stream, batch_size=None, num_workers=W)``, or torchdata's
    ``StatefulDataLoader`` the same way to checkpoint mid-epoch.
    """

    def __init__(
        self,
        dataset: StreamSource,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        block_shards: int = 4,
        epochs: int | None = None,
        weights: Sequence[float] | None = None,
        collator: Callable[[list], Any] | None = None,
        start: StreamState | None = None,
    ) -> None:
        if dataset.split == "eval" or len(dataset) != sum(_split_sizes(dataset)):
            raise ValueError("a CacheStream streams a whole training split (split='train')")
        if weights is not None and len(weights) != len(dataset.urls):
            raise ValueError(f"{len(weights)} mixing weights for {len(dataset.urls)} caches")
        checks = [
            (batch_size, "batch_size"),
            (world_size, "world_size"),
            (grad_accum, "grad_accum"),
            (block_shards, "block_shards"),
        ]
        for value, name in checks:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.dataset = dataset
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.grad_accum, self.block_shards, self.epochs = grad_accum, block_shards, epochs
        self.weights = None if weights is None else [float(w) for w in weights]
        self.collator = collator or DistillCollator()
        self.start = StreamState() if start is None else StreamState(**start.state_dict())
        self._live: _StreamIterator | None = None  # the last iterator made in this process

    @property
    def step_size(self) -> int:
        """Sequences of one optimizer step over all ranks and accumulation."""
        return self.batch_size * self.world_size * self.grad_accum

    def epoch_size(self) -> int:
        """Sequences of one epoch of the stream (of the mixture, with several caches)."""
        return len(self.dataset)

    def _own_order(self, c: int, epoch: int) -> np.ndarray:
        """[n_c] cache c's training sequences in its own epoch order."""
        shards = [(s.first_sequence, s.n_sequences) for s in self.dataset.readers()[c].shards]
        fraction = self.dataset.eval_fraction if self.dataset.split == "train" else 0.0
        return epoch_order(
            shards,
            seed=self.seed + 7919 * c,  # cache 0 keeps the single-cache order of this seed
            epoch=epoch,
            block_shards=self.block_shards,
            exclude=lambda idx: heldout_mask(idx, fraction),
        )

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """([n] source, [n] sequence index) of one epoch of the stream, in training order."""
        sizes = self.dataset.sizes
        if any(n == 0 for n in sizes):
            empty = self.dataset.urls[sizes.index(0)]
            raise ValueError(f"no training sequences in {empty}: it is empty or all held out")
        orders = [lambda e, c=c: self._own_order(c, e) for c in range(len(sizes))]
        return mixture_order(orders, sizes, self.weights or sizes, seed=self.seed, epoch=epoch)

    def after_steps(self, state: StreamState, steps: int = 1) -> StreamState:
        """The position ``steps`` optimizer steps after the step boundary ``state``."""
        out = StreamState(**state.state_dict())
        for _ in range(steps * self.grad_accum):
            out = self._advance(out)
        return out

    def _advance(self, s: StreamState) -> StreamState:
        """One micro-batch of this rank later."""
        n = self.epoch_size()
        epoch, consumed = (s.epoch + 1, 0) if s.consumed >= n else (s.epoch, s.consumed)
        if s.micro + 1 < self.grad_accum:
            return StreamState(epoch, consumed, s.micro + 1)
        return StreamState(epoch, min(consumed + self.step_size, n), 0)

    def __iter__(self) -> _StreamIterator:
        self._live = _StreamIterator(self)
        return self._live

    def state_dict(self) -> dict[str, int]:
        """The position of the iterator last made in this process (else the start)."""
        live = self._live
        return live.state_dict() if live is not None else self.start.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Start the next iteration at ``state`` (as saved by ``state_dict``)."""
        self.start = StreamState()
        self.start.load_state_dict(state)
        self._live = None


def _split_sizes(dataset: StreamSource) -> list[int]:
    fraction = dataset.eval_fraction if dataset.split == "train" else 0.0
    return [int((~heldout_mask(r.sequence_indices(), fraction)).sum()) for r in dataset.readers()]


class _StreamIterator(Iterator[dict[str, torch.Tensor]]):
    """One pass of a ``CacheStream`` in one process (a DataLoader worker, or the main one)."""

    def __init__(self, stream: CacheStream) -> None:
        self.stream = stream
        info = get_worker_info()
        worker, self.stride = (info.id, info.num_workers) if info else (0, 1)
        self.next = StreamState(**stream.start.state_dict())
        for _ in range(worker):  # worker w yields micro-batches w, w + W, ...
            self.next = stream._advance(self.next)
        self._epoch: int | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None

    def state_dict(self) -> dict[str, int]:
        return {**self.next.state_dict(), "stride": self.stride}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("stride", self.stride)) != self.stride:
            raise ValueError(
                f"this stream state was saved with {state['stride']} DataLoader workers; "
                f"resume it with the same number (now {self.stride})"
            )
        self.next.load_state_dict(state)

    def __iter__(self) -> _StreamIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        st = self.stream
        s = self.next
        if s.consumed >= st.epoch_size():
            s = StreamState(s.epoch + 1, 0, s.micro)
        if st.epochs is not None and s.epoch >= st.epochs:
            raise StopIteration
        source, order = self._epoch_order(s.epoch)
        end = min(s.consumed + st.step_size, len(order))
        slot = s.micro * st.world_size + st.rank
        lo = min(s.consumed + slot * st.batch_size, end)
        hi = min(s.consumed + (slot + 1) * st.batch_size, end)
        readers = st.dataset
        batch = st.collator([readers.read(int(source[j]), int(order[j])) for j in range(lo, hi)])
        for _ in range(self.stride):
            self.next = st._advance(self.next)
        return batch

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch != epoch:
            self._epoch, self._order = epoch, self.stream.order(epoch)
            source, order = self._order
            ahead = slice(self.next.consumed if self.next.epoch == epoch else 0, None)
            for c, reader in enumerate(self.stream.dataset.readers()):
                # remote caches: fetch this epoch's shards ahead, in order of use
                reader.prefetch_sequences(order[ahead][source[ahead] == c])
        assert self._order is not None
        return self._order
