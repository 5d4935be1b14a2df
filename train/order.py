"""The order of a cache's sequences: held-out split, epoch order, mixtures, stream position.

In: a cache's shard layout (first sequence, count per shard), a seed and an epoch. Out:
index arrays (which sequences, in which order) and ``StreamState``, the position in the
stream; ``logitcache.train.stream`` turns them into micro-batches.

The order of an epoch is a pure function of (cache, seed, epoch): shards are shuffled, then
sequences are shuffled within blocks of ``block_shards`` consecutive shards (a bounded
window, so a remote reader keeps only a few shards local). The position in the stream is one
number, the sequences of the epoch already consumed by all ranks together; any world size
can resume from it (mosaicml/streaming's idea).

Several caches mix by weight (``mixture_order``): an epoch of the mixture is as long as all
their training sequences together, and each draw picks a cache by a seeded weighted choice,
then takes that cache's next sequence in its own epoch order. A cache whose weight exceeds
its share of the sequences is repeated (a fresh permutation each time round), a smaller one
is sampled down. With one cache the mixture is exactly that cache's epoch order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from logitcache.storage import CacheReader

__all__ = [
    "StreamState",
    "count_split",
    "epoch_order",
    "heldout_mask",
    "mixture_order",
]

_SPLIT_SALT = 0x5EED_0F_CAC4E


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_mask(indices: np.ndarray, fraction: float) -> np.ndarray:
    """[n] bool: the sequences of the held-out split, by a stable hash of their index.

    The same index is held out by every student of the cache, whatever the seed.
    """
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    h = _splitmix64(np.asarray(indices, dtype=np.uint64) ^ np.uint64(_SPLIT_SALT))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def epoch_order(
    shards: list[tuple[int, int]], *, seed: int, epoch: int, block_shards: int, exclude=None
) -> np.ndarray:
    """[n] int64 global sequence indices of one epoch, in training order.

    ``shards``: (first_sequence, n_sequences) per shard. ``exclude``: a function from an
    index array to a bool mask of sequences to leave out (the held-out split).
    """
    rng = np.random.default_rng([seed, epoch, 0x10C17])
    perm = rng.permutation(len(shards))
    out = []
    for start in range(0, len(perm), block_shards):
        block = [shards[j] for j in perm[start : start + block_shards]]
        idx = np.concatenate([np.arange(f, f + n, dtype=np.int64) for f, n in block])
        out.append(idx[rng.permutation(len(idx))])
    order = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if exclude is not None:
        order = order[~exclude(order)]
    return order


def mixture_order(
    orders: Sequence[Callable[[int], np.ndarray]],
    sizes: Sequence[int],
    weights: Sequence[float],
    *,
    seed: int,
    epoch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """([n] int64 source, [n] int64 sequence index) of one epoch of a weighted mixture.

    ``orders[c](e)``: cache c's own epoch order for its epoch e (``epoch_order``);
    ``sizes[c]``: its training sequences; ``weights``: mixing weights (any positive scale).
    Pure in (seed, epoch): the draws of earlier epochs are recounted, not remembered, so a
    resumed run needs only the stream position.
    """
    n = int(sum(sizes))
    if len(orders) == 1:  # one cache: its own order, no draws
        return np.zeros(n, dtype=np.int64), orders[0](epoch)
    p = np.asarray(weights, dtype=np.float64) / float(sum(weights))

    def draws(e: int) -> np.ndarray:  # [n] the cache of every draw of mixture epoch e
        return np.random.default_rng([seed, e, 0x313A]).choice(len(sizes), size=n, p=p)

    taken = np.zeros(len(sizes), dtype=np.int64)  # draws of each cache before this epoch
    for e in range(epoch):
        taken += np.bincount(draws(e), minlength=len(sizes))
    source = draws(epoch)
    index = np.empty(n, dtype=np.int64)
    for c, size in enumerate(sizes):
        at = np.flatnonzero(source == c)
        k = taken[c] + np.arange(len(at))  # the k-th draw of cache c since the start
        for own_epoch in np.unique(k // size):
            sel = k // size == own_epoch
            index[at[sel]] = orders[c](int(own_epoch))[k[sel] % size]
    return source, index


@dataclass
class StreamState:
    """Where the stream stands: saved in every checkpoint."""

    epoch: int = 0
    consumed: int = 0
    """Sequences of this epoch already consumed, by all ranks together (at step starts)."""
    micro: int = 0
    """Micro-batch of this rank within the step (0 at a step boundary)."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "micro": self.micro}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.micro = int(state.get("micro", 0))


def count_split(reader: CacheReader, fraction: float) -> tuple[int, int]:
    """(training sequences, held-out sequences)."""
    idx = reader.sequence_indices()
    held = int(heldout_mask(idx, fraction).sum())
    return len(idx) - held, held
