"""One worker's share of the corpus: it tokenizes its blocks, then reads only its shards.

In: a ``CorpusSpec``, a tokenizer, the cache's ``TokenStore`` (``blocks.py``), this worker's
index and the worker count. Out: a ``Layout`` (where every sequence of the corpus starts,
from the block summaries alone) and the packed sequences of any range of sequence indices,
equal to those ``packing.iter_sequences`` gives at the same indices.

Two steps, with no message between workers but the files of the store:

1. Worker ``w`` of ``N`` reads the documents (cheap: no tokenizer) and tokenizes only the
   blocks ``b % N == w`` not yet published. With ``--max-tokens`` it stops where its own
   blocks say the budget ends.
2. Under torchrun the ranks meet (one barrier); then each walks the summaries in order. If
   a block is missing (a job-array task not run yet, or step 1 stopped short), one more
   ordered pass over the documents tokenizes what is missing: the cache is right whatever
   ran before, at the price of that pass.

A shard then reads only the blocks its sequences come from: packing restarts at a block
boundary and skips what earlier sequences hold (``pack_sequences(skip=...)``), so the bytes
are those of one process reading the whole corpus.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .blocks import Block, BlockSummary, TokenStore, iter_blocks
from .corpus import CorpusError, CorpusSpec
from .packing import CorpusStats, PackedSequence, pack_sequences

__all__ = ["Layout", "plan_share", "tokenize_share"]


def tokenize_share(
    store: TokenStore, spec: CorpusSpec, tokenizer: Any, worker: int, num_workers: int
) -> int:
    """Step 1: tokenize and publish this worker's blocks not yet published; returns how many.

    With ``max_tokens`` it stops at the first block that its own blocks' mean size puts
    past the budget (an estimate: step 2 makes any block it missed).
    """
    made = mine = mine_tokens = 0
    for index, docs, last in iter_blocks(spec):
        if spec.max_tokens is not None and mine and index * mine_tokens / mine >= spec.max_tokens:
            break
        if index % num_workers != worker:
            continue
        summary = store.summary(index)
        if summary is None:
            summary = store.tokenize(index, docs, last, tokenizer)
            made += 1
        mine, mine_tokens = mine + 1, mine_tokens + summary.budget_tokens(spec.pack)
    return made


def _walk(store: TokenStore, spec: CorpusSpec) -> list[BlockSummary] | None:
    """The summaries of the blocks the corpus's sequences come from, or None if one of
    them is not published."""
    blocks: list[BlockSummary] = []
    spent = 0
    while True:
        summary = store.summary(len(blocks))
        if summary is None:
            return None
        blocks.append(summary)
        spent += summary.budget_tokens(spec.pack)
        if summary.last or (spec.max_tokens is not None and spent >= spec.max_tokens):
            return blocks


def _complete(store: TokenStore, spec: CorpusSpec, tokenizer: Any) -> list[BlockSummary]:
    """``_walk``'s summaries, tokenizing the blocks missing from the store in one pass."""
    blocks: list[BlockSummary] = []
    spent = 0
    for index, docs, last in iter_blocks(spec):
        summary = store.summary(index) or store.tokenize(index, docs, last, tokenizer)
        blocks.append(summary)
        spent += summary.budget_tokens(spec.pack)
        if spec.max_tokens is not None and spent >= spec.max_tokens:
            break
    return blocks


def plan_share(
    store: TokenStore,
    spec: CorpusSpec,
    tokenizer: Any,
    worker: int,
    num_workers: int,
    meet: Callable[[], None] | None = None,
) -> Layout:
    """Steps 1 and 2 of the module docstring; ``meet``: the ranks' barrier under torchrun."""
    if spec.pack and tokenizer.eos_token_id is None:
        raise CorpusError(
            "tokenizer has no EOS token; packing needs one: set one or pass --no-pack"
        )
    tokenize_share(store, spec, tokenizer, worker, num_workers)
    if meet is not None:
        meet()
    blocks = _walk(store, spec) or _complete(store, spec, tokenizer)
    return Layout(store, spec, tokenizer.eos_token_id, blocks)


class Layout:
    """Where each sequence of the corpus comes from, by block (see the module docstring)."""

    def __init__(
        self, store: TokenStore, spec: CorpusSpec, eos_id: int | None, blocks: list[BlockSummary]
    ):
        self.store, self.spec, self.eos_id, self.blocks = store, spec, eos_id, blocks
        self._recent: dict[int, Block] = {}  # blocks read back, oldest first
        units = [b.units(spec.pack) for b in blocks]
        spent = [b.budget_tokens(spec.pack) for b in blocks]
        self.starts = [0, *itertools.accumulate(units)][:-1]
        """Units (stream tokens, or sequences when not packing) before each block."""
        self.spent = [0, *itertools.accumulate(spent)][:-1]
        """Tokens of the sequences before each block, which --max-tokens counts."""
        self.total = self._count(sum(units), sum(spent))
        if self.total == 0:
            raise CorpusError(
                f"corpus is empty: no sequence of >= 2 tokens from {', '.join(spec.data)} "
                f"({sum(b.documents for b in blocks)} documents read, "
                f"{sum(b.skipped_empty for b in blocks)} empty)"
            )

    def _count(self, units: int, spent: int) -> int:
        """Sequences in the corpus, from its blocks' units and tokens."""
        budget, seq_len = self.spec.max_tokens, self.spec.seq_len
        if self.spec.pack:
            stream = units if budget is None else min(units, budget)
            return stream // seq_len + (stream % seq_len >= 2)
        if budget is None or spent <= budget:
            return units
        # the budget ends inside the last block: count its sequences with what is left
        last = len(self.blocks) - 1
        return self.starts[last] + sum(1 for _ in self._from_block(last, 0))

    def stats(self, stats: CorpusStats) -> None:
        """Put the corpus's document counts into ``stats`` (its sequence counts are those of
        the sequences a worker reads)."""
        stats.documents = sum(b.documents for b in self.blocks)
        stats.skipped_empty = sum(b.skipped_empty for b in self.blocks)
        stats.read = 1.0

    def tokens(self, first: int, count: int) -> int | None:
        """Tokens of sequences [first, first + count) when packing (None otherwise)."""
        if not self.spec.pack:
            return None
        stream = self.starts[-1] + self.blocks[-1].stream_tokens
        if self.spec.max_tokens is not None:
            stream = min(stream, self.spec.max_tokens)
        seq_len = self.spec.seq_len
        return max(0, min((first + count) * seq_len, stream) - first * seq_len)

    def sequences(
        self, first: int, count: int, stats: CorpusStats | None = None
    ) -> Iterator[tuple[int, PackedSequence]]:
        """(index, sequence) for sequences [first, first + count), reading only the blocks
        they come from."""
        assert first >= 0 and first + count <= self.total, "sequences of the corpus"
        unit = first * self.spec.seq_len if self.spec.pack else first
        block = bisect.bisect_right(self.starts, unit) - 1
        packed = self._from_block(block, unit - self.starts[block], stats)
        return zip(range(first, first + count), itertools.islice(packed, count))

    def _from_block(
        self, block: int, skip: int, stats: CorpusStats | None = None
    ) -> Iterator[PackedSequence]:
        """The corpus's sequences from ``skip`` units into block ``block`` on.

        The block's documents wholly before ``skip`` are dropped unread (their units and
        budget tokens taken off), so a shard costs its own tokens, not its block's.
        """
        first = self._block(block)
        units = np.cumsum(first.per_document["stream_tokens" if self.spec.pack else "sequences"])
        spent = np.cumsum(
            first.per_document["stream_tokens" if self.spec.pack else "sequence_tokens"]
        )
        doc = int(np.searchsorted(units, skip, side="right"))  # first one not wholly skipped
        if doc:
            skip -= int(units[doc - 1])
        budget = self.spec.max_tokens
        if budget is not None:
            budget -= self.spent[block] + (int(spent[doc - 1]) if doc else 0)
        rest = (self._block(b).documents() for b in range(block + 1, len(self.blocks)))
        return pack_sequences(
            itertools.chain(first.documents(doc), itertools.chain.from_iterable(rest)),
            seq_len=self.spec.seq_len,
            eos_id=self.eos_id,
            pack=self.spec.pack,
            max_tokens=budget,
            stats=stats,
            skip=skip,
        )

    def _block(self, position: int) -> Block:
        """Block ``position`` of the layout, read back (the last two read are kept: a
        worker's consecutive shards mostly share theirs)."""
        if position not in self._recent:
            self._recent[position] = self.store.load(self.blocks[position])
            while len(self._recent) > 2:
                del self._recent[next(iter(self._recent))]
        return self._recent[position]
