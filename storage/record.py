"""One cached sequence in memory, and the checks of its content both formats share.

In: a ``SequenceRecord`` (numpy arrays) and the cache spec. Out: nothing, or a ``CacheError``
naming what is wrong (``check_record``). Each format's encoding of records to container rows
lives in ``storage/formats/`` (``v1.py``: ``RecordCodec``, ``v2.py``: ``GroupCodec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import CacheError

if TYPE_CHECKING:
    from .spec import CacheSpec

__all__ = ["SequenceRecord", "check_record"]


@dataclass
class SequenceRecord:
    """A sequence and the teacher's sparse next-token distribution at each position.

    Position p (0 <= p < T - 1) holds the teacher's prediction of token p + 1. Entries of
    all positions are flattened in position order; ``n_entries[p]`` says how many belong
    to position p (k for every position in topk mode).
    """

    index: int
    input_ids: np.ndarray  # [T] uint32
    loss_mask: np.ndarray  # [T] bool, True where token t is a training target
    doc_starts: np.ndarray  # [D] uint32, positions where a document begins
    ids: np.ndarray  # [E] uint32, support ids (order within a position: docs/format.md)
    n_entries: np.ndarray  # [T-1] int32 entries per position
    tail_mass: np.ndarray | None  # [T-1] float32 mass not covered (None: format 2, sampled)
    logprobs: np.ndarray | None = None  # [E] float32 log-softmax at T=1 (topk; sampled optional)
    counts: np.ndarray | None = None  # [E] uint8 draws of each id (sampled mode)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_positions(self) -> int:
        return self.n_tokens - 1

    @property
    def offsets(self) -> np.ndarray:
        """[T] int64: entries of position p are ids[offsets[p]:offsets[p + 1]]."""
        return np.concatenate([[0], np.cumsum(self.n_entries, dtype=np.int64)])

    def target_probs(self) -> np.ndarray:
        """[E] float32 teacher probabilities of the stored entries (counts/N if no log-probs)."""
        if self.logprobs is not None:
            return np.exp(self.logprobs)
        assert self.counts is not None
        per_position = np.add.reduceat(self.counts.astype(np.float32), self.offsets[:-1])
        return self.counts / np.repeat(per_position, self.n_entries)


def check_record(
    spec: CacheSpec,
    r: SequenceRecord,
    fields: tuple[str, ...],
    where: str | None = None,
    encoding: bool = False,
) -> None:
    """Raise CacheError unless ``r`` is a valid record of ``spec`` with ``fields`` present
    (``encoding``: also refuse log-probs a float codec would store silently)."""
    where = where or f"sequence {r.index}"
    t = r.n_tokens
    if not 2 <= t <= spec.seq_len:
        raise CacheError(f"{where}: length {t} outside [2, seq_len={spec.seq_len}]")
    tail_ok = r.tail_mass is None or r.tail_mass.shape == (t - 1,)
    if r.loss_mask.shape != (t,) or not tail_ok:
        raise CacheError(f"{where}: loss_mask/tail_mass shapes disagree with {t} tokens")
    if r.n_entries.shape != (t - 1,):
        found = r.n_entries.shape[0]
        raise CacheError(f"{where}: n_entries has {found} positions, not {t - 1}")
    if spec.mode == "topk" and (r.n_entries != spec.k).any():
        # topk shards do not store n_entries: the reader assumes k at every position
        raise CacheError(f"{where}: topk records need k={spec.k} entries at every position")
    absent = [name for name in fields if getattr(r, name, None) is None]
    if absent:
        raise CacheError(f"{where}: fields {absent} are required by this cache but missing")
    n = int(r.n_entries.sum())
    if r.ids.shape != (n,):
        raise CacheError(f"{where}: {r.ids.shape[0]} ids stored for {n} entries")
    for name in ("logprobs", "counts"):
        value = getattr(r, name)
        if value is not None and value.shape != (n,):
            raise CacheError(f"{where}: {name} has {value.shape[0]} values for {n} entries")
    for name, values in (("ids", r.ids), ("input_ids", r.input_ids)):
        if values.size and int(values.max()) >= spec.vocab_size:
            raise CacheError(
                f"{where}: {name} contains id {int(values.max())} >= vocab_size {spec.vocab_size}"
            )
    if spec.mode == "sampled":
        if r.counts is None or (r.n_entries < 1).any():
            raise CacheError(f"{where}: sampled records need counts, >= 1 entry per position")
        sums = np.add.reduceat(r.counts.astype(np.int64), r.offsets[:-1]) if n else []
        if n and (np.asarray(sums) != spec.samples).any():
            raise CacheError(f"{where}: counts do not add up to samples={spec.samples}")
    lp = r.logprobs if encoding and "logprobs" in fields else None
    if lp is not None and (np.isnan(lp).any() or (lp > 0).any()):
        # the float codecs would store these silently; the lossy codec refuses them too
        raise CacheError(f"{where}: log-probabilities must be <= 0 and not NaN")
