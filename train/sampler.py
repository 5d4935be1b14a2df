"""``logitcache train``'s epoch order for a map-style ``CacheDataset``, as a ``Sampler``.

In: a ``CacheDataset`` (training split), a seed, the shuffle window and mixing weights.
Out: dataset positions, one epoch at a time (``set_epoch``), in the block-shuffled order of
``CacheStream``: the first ``b`` positions are what ``logitcache train`` trains on at step
1 with micro-batches of ``b``, and a remote cache is read a few shards at a time. Trainers
that shard batches by process (Accelerate's ``BatchSamplerShard``: process r takes batches
r, r + W, ...) then give each rank the same sequences as the stream of that rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .dataset import CacheDataset
from .stream import CacheStream

__all__ = ["CacheSampler"]


class CacheSampler(Sampler[int]):
    """Positions of ``dataset`` in the stream's epoch order for ``seed`` (see the module)."""

    def __init__(
        self,
        dataset: CacheDataset,
        *,
        seed: int = 0,
        block_shards: int = 4,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.dataset = dataset
        self._stream = CacheStream(
            dataset, batch_size=1, seed=seed, block_shards=block_shards, weights=weights
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def positions(self, epoch: int) -> np.ndarray:
        """[n] int64 dataset positions of one epoch, in training order."""
        source, index = self._stream.order(epoch)
        return self.dataset.positions(source, index)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions(self.epoch).tolist())
