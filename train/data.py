"""Streaming a cache into training batches: order, split, resume position and collation.

In: one cache (``CacheReader``), a seed and the stream position. Out: micro-batches of
tensors (``Batch``): the student's input ids and, for every trained position, the teacher's
sparse target (``TeacherTargets``).

The order of an epoch is a pure function of (cache, seed, epoch): shards are shuffled, then
sequences are shuffled within blocks of ``block_shards`` consecutive shards (a bounded
window, so a remote reader keeps only a few shards local). The position in the stream is one
number, the sequences of the epoch already consumed by all ranks together; any world size
can resume from it (mosaicml/streaming's idea). An optimizer step takes the next
``mb * world_size * grad_accum`` sequences; micro-batch a of rank r is their rows
[s*mb, (s+1)*mb) with s = a * world_size + r. So a step never straddles two epochs (the last
one is short, some of its micro-batches empty), and any split of the same global batch
between ranks and accumulation trains on the same sequences at every step. DataLoader
worker w takes every ``num_workers``-th micro-batch of its rank, and the DataLoader's
round-robin puts them back in order.

Several caches mix by weight (``mixture_order``): an epoch of the mixture is as long as all
their training sequences together, and each draw picks a cache by a seeded weighted choice,
then takes that cache's next sequence in its own epoch order. A cache whose weight exceeds
its share of the sequences is repeated (a fresh permutation each time round), a smaller one
is sampled down. With one cache the mixture is exactly that cache's epoch order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from logitcache.storage import CacheReader, SequenceRecord

from .losses import TeacherTargets

__all__ = [
    "Batch",
    "CacheStream",
    "StreamState",
    "collate",
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
    """Sequences of this epoch already consumed, by all ranks together."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


@dataclass
class Batch:
    """One micro-batch for one rank."""

    input_ids: torch.Tensor  # [B, L] int64, right-padded with 0
    attention_mask: torch.Tensor  # [B, L] int64
    rows: torch.Tensor  # [N] int64 flat index b*L + p of each trained position p
    targets: TeacherTargets  # N rows: the teacher's distribution of token p + 1
    indices: list[int]  # global sequence indices, in batch order
    epoch: int
    consumed_after: int
    """Stream position once the optimizer step this micro-batch belongs to is consumed."""
    sources: list[int] = field(default_factory=list)
    """Which cache (position in the stream's list) each sequence came from."""

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(
    records: list[SequenceRecord], *, vocab_limit: int, target: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TeacherTargets]:
    """Records -> (input_ids [B, L], attention_mask [B, L], rows [N], targets).

    ``target``: ``auto`` (log-probs when stored, else counts/N), ``counts`` or ``probs``.
    Entries with ids >= ``vocab_limit`` (teacher rows the student lacks) move into the tail.
    """
    width = max(r.n_tokens for r in records)
    input_ids = np.zeros((len(records), width), dtype=np.int64)
    attention = np.zeros((len(records), width), dtype=np.int64)
    parts: list[dict[str, np.ndarray]] = []
    for b, r in enumerate(records):
        input_ids[b, : r.n_tokens] = r.input_ids
        attention[b, : r.n_tokens] = 1
        parts.append(_rows_of(r, b, width, target))
    k = max((p["ids"].shape[1] for p in parts), default=1)
    cat = {
        key: np.concatenate([_pad_cols(p[key], k) if p[key].ndim == 2 else p[key] for p in parts])
        for key in parts[0]
    }
    ids, probs, valid, tail = cat["ids"], cat["probs"], cat["valid"], cat["tail"]
    foreign = valid & (ids >= vocab_limit)
    if foreign.any():
        tail = tail + np.where(foreign, probs, 0).sum(1)
        valid &= ~foreign
        probs = np.where(foreign, 0, probs)
        ids = np.where(foreign, 0, ids)
    targets = TeacherTargets(
        ids=torch.from_numpy(ids.astype(np.int64)),
        probs=torch.from_numpy(probs.astype(np.float32)),
        valid=torch.from_numpy(valid),
        tail=torch.from_numpy(tail.astype(np.float32)),
        labels=torch.from_numpy(input_ids.reshape(-1)[cat["rows"] + 1]),
    )
    return (
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        torch.from_numpy(cat["rows"]),
        targets,
    )


def _pad_cols(a: np.ndarray, k: int) -> np.ndarray:
    if a.shape[1] == k:
        return a
    pad = np.zeros((a.shape[0], k - a.shape[1]), dtype=a.dtype)
    return np.concatenate([a, pad], axis=1)


def _rows_of(r: SequenceRecord, b: int, width: int, target: str) -> dict[str, np.ndarray]:
    """The trained positions of one record as padded [n, K] arrays."""
    positions = np.flatnonzero(r.loss_mask[1:])  # p whose target token p+1 is trained
    n_pos = r.n_positions
    k = int(r.n_entries.max()) if n_pos else 1
    use_counts = target == "counts" or (target == "auto" and r.logprobs is None)
    if use_counts and r.counts is None:
        raise ValueError("target 'counts' needs a sampled cache")
    if target == "probs" and r.logprobs is None:
        raise ValueError("target 'probs' needs stored log-probs (top-k, or --sampled-logprobs)")
    offsets = r.offsets
    row = np.repeat(np.arange(n_pos), r.n_entries)
    if use_counts:  # counts/N even when log-probs are stored too (target_probs prefers those)
        draws = r.counts.astype(np.float32)
        values = draws / np.bincount(row, weights=draws, minlength=n_pos)[row]
    else:
        values = np.exp(r.logprobs)
    col = np.arange(offsets[-1]) - np.repeat(offsets[:-1], r.n_entries)
    ids = np.zeros((n_pos, k), dtype=np.int64)
    probs = np.zeros((n_pos, k), dtype=np.float32)
    valid = np.zeros((n_pos, k), dtype=bool)
    ids[row, col] = r.ids
    probs[row, col] = values
    valid[row, col] = True
    tail = np.zeros(n_pos, dtype=np.float32) if use_counts else r.tail_mass
    return {
        "ids": ids[positions],
        "probs": probs[positions],
        "valid": valid[positions],
        "tail": tail[positions],
        "rows": (b * width + positions).astype(np.int64),
    }


class CacheStream(IterableDataset):
    """Micro-batches of one rank, from a stream position on, forever (epoch after epoch).

    ``url``: one cache, or a list of caches mixed by ``weights`` (default: by their sizes).
    Use with ``DataLoader(stream, batch_size=None, num_workers=W)``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        micro_batch: int,
        seed: int,
        start: StreamState,
        rank: int = 0,
        world_size: int = 1,
        block_shards: int = 4,
        eval_fraction: float = 0.0,
        vocab_limit: int,
        target: str = "auto",
        verify: bool = True,
        epochs: int | None = None,
        grad_accum: int = 1,
        weights: Sequence[float] | None = None,
        reader_options: dict | None = None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if weights is not None and len(weights) != len(self.urls):
            raise ValueError(f"{len(weights)} mixing weights for {len(self.urls)} caches")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.micro_batch, self.seed = micro_batch, seed
        self.start = StreamState(start.epoch, start.consumed)
        self.rank, self.world_size = rank, world_size
        self.block_shards, self.eval_fraction = block_shards, eval_fraction
        self.vocab_limit, self.target, self.verify = vocab_limit, target, verify
        self.epochs, self.grad_accum = epochs, grad_accum
        self.reader_options = {"verify": verify, **(reader_options or {})}
        self._readers: list[CacheReader] | None = None

    @property
    def url(self) -> str:
        return self.urls[0]

    def readers(self) -> list[CacheReader]:
        if self._readers is None:
            self._readers = [CacheReader(u, **self.reader_options) for u in self.urls]
        return self._readers

    def reader(self) -> CacheReader:
        return self.readers()[0]

    def _own_order(self, c: int, epoch: int) -> np.ndarray:
        """[n_c] cache c's training sequences in its own epoch order."""
        shards = [(s.first_sequence, s.n_sequences) for s in self.readers()[c].shards]
        return epoch_order(
            shards,
            seed=self.seed + 7919 * c,  # cache 0 keeps the single-cache order of this seed
            epoch=epoch,
            block_shards=self.block_shards,
            exclude=lambda idx: heldout_mask(idx, self.eval_fraction),
        )

    def sizes(self) -> list[int]:
        """Training sequences of each cache (the held-out split left out)."""
        return [count_split(r, self.eval_fraction)[0] for r in self.readers()]

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """([n] source, [n] sequence index) of one epoch of the stream, in training order."""
        sizes = self.sizes()
        if any(n == 0 for n in sizes):
            empty = self.urls[sizes.index(0)]
            raise ValueError(f"no training sequences in {empty}: it is empty or all held out")
        orders = [lambda e, c=c: self._own_order(c, e) for c in range(len(self.urls))]
        weights = self.weights or sizes
        return mixture_order(orders, sizes, weights, seed=self.seed, epoch=epoch)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        readers = self.readers()
        state = StreamState(self.start.epoch, self.start.consumed)
        mb, world = self.micro_batch, self.world_size
        step_size = mb * world * self.grad_accum
        counter = 0  # micro-batches of this rank since the start, for worker striding
        while self.epochs is None or state.epoch < self.epochs:
            source, order = self.order(state.epoch)
            for c, reader in enumerate(readers):  # remote caches: fetch shards ahead, in order
                ahead = slice(state.consumed, None)
                reader.prefetch_sequences(order[ahead][source[ahead] == c])
            for start in range(state.consumed, len(order), step_size):
                end = min(start + step_size, len(order))
                for a in range(self.grad_accum):
                    slot = a * world + self.rank
                    take = counter % n_workers == worker
                    counter += 1
                    if not take:
                        continue
                    lo, hi = min(start + slot * mb, end), min(start + (slot + 1) * mb, end)
                    picks = [(int(source[j]), int(order[j])) for j in range(lo, hi)]
                    records = [readers[c].read(i) for c, i in picks]
                    yield self._batch(records, [c for c, _ in picks], state.epoch, end)
            state = StreamState(state.epoch + 1, 0)

    def _batch(
        self, records: list[SequenceRecord], sources: list[int], epoch: int, consumed_after: int
    ) -> Batch:
        if not records:  # a rank past the end of a short final batch: an empty micro-batch
            empty = torch.zeros((1, 2), dtype=torch.int64)
            no_rows = torch.zeros(0, dtype=torch.int64)
            targets = TeacherTargets(
                ids=torch.zeros((0, 1), dtype=torch.int64),
                probs=torch.zeros((0, 1)),
                valid=torch.zeros((0, 1), dtype=torch.bool),
                tail=torch.zeros(0),
                labels=no_rows,
            )
            return Batch(empty, torch.zeros_like(empty), no_rows, targets, [], epoch,
                         consumed_after)  # fmt: skip
        ids, mask, rows, targets = collate(
            records, vocab_limit=self.vocab_limit, target=self.target
        )
        indices = [r.index for r in records]
        return Batch(ids, mask, rows, targets, indices, epoch, consumed_after, sources)


def eval_batches(
    reader: CacheReader,
    *,
    fraction: float,
    micro_batch: int,
    vocab_limit: int,
    max_sequences: int | None = None,
    target: str = "auto",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, TeacherTargets]]:
    """The held-out split in index order, as collated micro-batches."""
    idx = reader.sequence_indices()
    held = idx[heldout_mask(idx, fraction)]
    if max_sequences is not None:
        held = held[:max_sequences]
    for start in range(0, len(held), micro_batch):
        records = [reader.read(int(i)) for i in held[start : start + micro_batch]]
        yield collate(records, vocab_limit=vocab_limit, target=target)


def count_split(reader: CacheReader, fraction: float) -> tuple[int, int]:
    """(training sequences, held-out sequences)."""
    idx = reader.sequence_indices()
    held = int(heldout_mask(idx, fraction).sum())
    return len(idx) - held, held
