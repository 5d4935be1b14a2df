"""Token blocks: the corpus tokenized once, a block at a time, kept beside the cache.

In: a ``CorpusSpec``'s documents, a tokenizer, and the cache's ``Location``. Out: under
``tokens/<key>/`` of the cache, per block ``b`` a payload ``block-<b>.bin`` and its summary
``block-<b>.json`` (published second: a summary names a complete payload), and the block's
documents read back as (ids, train mask) pairs for ``packing.pack_sequences``.

A block is a run of consecutive documents closed by their size alone (``BLOCK_CHARS``
characters or ``BLOCK_DOCUMENTS`` documents), so any worker finds block boundaries by
reading documents without tokenizing them. Each summary says what packing needs (its
stream tokens, its sequences when not packing): with the summaries of the blocks before
it, a worker knows where its shards begin without touching their tokens (``shares.py``).

The key in the directory name is derived from the cache's ``cache_id`` (corpus, tokenizer,
``seq_len``, ``pack``) and the block rule: a changed setting never reads another's blocks.
The store is the user's own corpus, but it is read like any file of a cache: the summary
with a bounded read and checked field by field, the payload with a read bounded by the size
the summary declares, then its SHA-256 and its counts checked against the summary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from logitcache.core.errors import LogitcacheError
from logitcache.storage import Location

from .corpus import CorpusError, CorpusSpec, Document, iter_documents
from .packing import tokenize_document

__all__ = [
    "BLOCK_CHARS",
    "BLOCK_DOCUMENTS",
    "TOKENS_DIR",
    "Block",
    "BlockSummary",
    "TokenStore",
    "iter_blocks",
    "remove_blocks",
]

BLOCK_CHARS = 1 << 20  # ~250k tokens of English (4 chars/token): ~1 MB of ids per block
BLOCK_DOCUMENTS = 1 << 14  # a block of one-line documents stays a few MB of Python objects
TOKENS_DIR = "tokens"
_KIND = "logitcache-token-block"
_VERSION = 1
_SUMMARY_BYTES = 4096  # a summary is ~300 bytes of JSON
# 4 bytes per id + 4 per document + 1/8 per mask bit: 2**28 tokens (a 1 GB text document in
# one block) is far past any real block (~1 MB), so only a damaged summary comes near it
_MAX_TOKENS = 1 << 28
_MAX_PAYLOAD = 4 * _MAX_TOKENS + 4 * BLOCK_DOCUMENTS + _MAX_TOKENS // 8
_COUNTS = ("tokenized", "tokens", "stream_tokens", "sequences", "sequence_tokens")


@dataclass(frozen=True)
class BlockSummary:
    """What packing needs to know of one block without its tokens."""

    index: int
    documents: int
    """Documents of the block, empty ones included."""
    skipped_empty: int
    """Documents with no tokens (not stored)."""
    tokenized: int
    """Documents stored: ``documents - skipped_empty``."""
    tokens: int
    """Token ids stored."""
    stream_tokens: int
    """Tokens of the packed stream (pack=True): the ids and one EOS after each document that
    does not end in one."""
    sequences: int
    """Sequences of the block when not packing: its documents of >= 2 tokens."""
    sequence_tokens: int
    """Tokens of those sequences (cut to seq_len, EOS appended where it fits)."""
    last: bool
    """The corpus ends with this block."""
    bytes: int
    """Size of the payload ``block-<index>.bin``."""
    sha256: str

    def units(self, pack: bool) -> int:
        """What a packed sequence index counts: stream tokens (pack) or sequences (not)."""
        return self.stream_tokens if pack else self.sequences

    def budget_tokens(self, pack: bool) -> int:
        """Tokens of the block's sequences, which ``--max-tokens`` counts."""
        return self.stream_tokens if pack else self.sequence_tokens


@dataclass(frozen=True)
class Block:
    """One block's tokenized documents, read back and checked."""

    summary: BlockSummary
    lengths: np.ndarray  # [D] uint32 tokens of each stored document
    ids: np.ndarray  # [T] uint32 every document's ids, in order
    mask: np.ndarray  # [T] bool train mask
    per_document: dict[str, np.ndarray]
    """Each document's part of the summary's counts (``stream_tokens``, ``sequences``,
    ``sequence_tokens``), [D] int64 each."""

    def documents(self, first: int = 0) -> Iterator[tuple[list[int], list[bool]]]:
        """(ids, train mask) of documents ``first`` on, as ``pack_sequences`` takes them."""
        ends = np.cumsum(self.lengths.astype(np.int64))
        for end, length in zip(ends[first:].tolist(), self.lengths[first:].tolist()):
            yield self.ids[end - length : end].tolist(), self.mask[end - length : end].tolist()


def _document_size(doc: Document) -> int:
    """A document's size by the block rule: characters (its ids when pre-tokenized)."""
    if doc.text is not None:
        return len(doc.text)
    if doc.messages is not None:
        return sum(len(m["content"]) for m in doc.messages)
    return len(doc.input_ids or ())


def iter_blocks(spec: CorpusSpec) -> Iterator[tuple[int, list[Document], bool]]:
    """(index, documents, last) of each block of the corpus in order; one empty last block
    for a corpus with no documents."""
    block: list[Document] = []
    index = size = 0
    for doc in iter_documents(spec):
        if block and (size >= BLOCK_CHARS or len(block) >= BLOCK_DOCUMENTS):
            yield index, block, False
            index, block, size = index + 1, [], 0
        block.append(doc)
        size += _document_size(doc)
    yield index, block, True


class TokenStore:
    """The token blocks of one cache (see the module docstring)."""

    def __init__(
        self, loc: Location, cache_id: str, *, seq_len: int, eos_id: int | None, vocab: int
    ):
        rule = f"{_VERSION}:{cache_id}:{BLOCK_CHARS}:{BLOCK_DOCUMENTS}"
        self.key = hashlib.sha256(rule.encode()).hexdigest()[:16]
        self.loc, self.dir = loc, f"{TOKENS_DIR}/{self.key}"
        self.seq_len, self.eos_id, self.vocab = seq_len, eos_id, vocab

    def _rel(self, index: int, suffix: str) -> str:
        return f"{self.dir}/block-{index:08d}{suffix}"

    # -- writing --------------------------------------------------------------------
    def tokenize(
        self, index: int, docs: list[Document], last: bool, tokenizer: Any
    ) -> BlockSummary:
        """Tokenize one block's documents and publish it (payload, then summary)."""
        pairs = [tokenize_document(doc, tokenizer) for doc in docs]
        kept = [p for p in pairs if p is not None]
        lengths = np.asarray([len(ids) for ids, _ in kept], dtype=np.uint32)  # [D]
        if int(lengths.sum(dtype=np.int64)) > _MAX_TOKENS:  # before any copy of the ids
            raise CorpusError(
                f"block {index} of the corpus ({docs[0].source} on) holds more than "
                f"{_MAX_TOKENS:,} tokens: split its documents"
            )
        total = int(lengths.sum(dtype=np.int64))
        ids = np.fromiter(
            itertools.chain.from_iterable(i for i, _ in kept), np.uint32, total
        )  # [T]
        mask = np.fromiter(itertools.chain.from_iterable(m for _, m in kept), bool, total)  # [T]
        payload = lengths.tobytes() + ids.tobytes() + np.packbits(mask).tobytes()
        summary = BlockSummary(
            index=index,
            documents=len(docs),
            skipped_empty=len(docs) - len(kept),
            **self._counts(lengths, ids),
            last=last,
            bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        self.loc.makedirs(self.dir)
        self.loc.publish_bytes(self._rel(index, ".bin"), payload)
        record = {"kind": _KIND, "version": _VERSION, "key": self.key, **asdict(summary)}
        self.loc.publish_bytes(self._rel(index, ".json"), json.dumps(record).encode())
        return summary

    def _per_document(self, lengths: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Per document [D] int64: its stream tokens (pack), whether it is a sequence and that
        sequence's tokens (not packing), from the document lengths [D] and ids [T]."""
        lengths = lengths.astype(np.int64)
        last_ids = ids[np.cumsum(lengths) - 1] if len(ids) else ids[:0]  # [D] last tokens
        eos = self.eos_id is not None
        no_eos = (last_ids != self.eos_id) if eos else np.ones(len(lengths), dtype=bool)
        long = lengths >= 2
        cut = np.minimum(lengths, self.seq_len)
        room = (cut < self.seq_len) & no_eos & eos  # an EOS appended when not packing
        return {
            "stream_tokens": lengths + no_eos,
            "sequences": long.astype(np.int64),
            "sequence_tokens": (cut + room) * long,
        }

    def _counts(self, lengths: np.ndarray, ids: np.ndarray) -> dict[str, int]:
        """A block's counts from its document lengths [D] and ids [T]: the summary's, and
        what a payload read back must give again."""
        sums = {k: int(v.sum()) for k, v in self._per_document(lengths, ids).items()}
        return {"tokenized": len(lengths), "tokens": int(lengths.sum(dtype=np.int64)), **sums}

    # -- reading --------------------------------------------------------------------
    def summary(self, index: int) -> BlockSummary | None:
        """Block ``index``'s summary, or None if it is not published (yet)."""
        rel = self._rel(index, ".json")
        try:
            data = self.loc.read_if_exists(rel, limit=_SUMMARY_BYTES)
        except LogitcacheError as err:
            raise self._damaged(index, str(err)) from None
        if data is None:
            return None
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise self._damaged(index, "its summary is not JSON") from None
        return self._checked(index, record)

    def _checked(self, index: int, record: Any) -> BlockSummary:
        """The summary in ``record`` once every field is of its type and range."""
        if not isinstance(record, dict) or (record.get("kind"), record.get("version")) != (
            _KIND,
            _VERSION,
        ):
            raise self._damaged(index, f"its summary is not a version {_VERSION} block summary")
        if record.get("key") != self.key or record.get("index") != index:
            raise self._damaged(index, "its summary names another store or block")
        fields = {name: record.get(name) for name in BlockSummary.__dataclass_fields__}
        counts = [v for k, v in fields.items() if k not in ("index", "last", "sha256")]
        if not all(type(v) is int and 0 <= v <= _MAX_PAYLOAD for v in counts):
            raise self._damaged(index, "a count in its summary is not a size")
        if type(fields["last"]) is not bool or not _is_sha256(fields["sha256"]):
            raise self._damaged(index, "its summary's last or sha256 field is malformed")
        summary = BlockSummary(**fields)
        declared = 4 * summary.tokenized + 4 * summary.tokens + -(-summary.tokens // 8)
        if summary.tokenized + summary.skipped_empty != summary.documents or (
            summary.bytes != declared
        ):
            raise self._damaged(index, "its summary's counts do not add up")
        return summary

    def load(self, summary: BlockSummary) -> Block:
        """The block's tokenized documents, checked against ``summary`` and the tokenizer's
        vocabulary."""
        index, d, t = summary.index, summary.tokenized, summary.tokens
        try:
            payload = self.loc.read_bytes(self._rel(index, ".bin"), limit=summary.bytes)
        except LogitcacheError as err:
            raise self._damaged(index, str(err)) from None
        if len(payload) != summary.bytes or hashlib.sha256(payload).hexdigest() != summary.sha256:
            raise self._damaged(index, "its payload does not match its summary's size and sha256")
        lengths = np.frombuffer(payload, dtype=np.uint32, count=d)  # [D]
        ids = np.frombuffer(payload, dtype=np.uint32, count=t, offset=4 * d)  # [T]
        bits = np.frombuffer(payload, dtype=np.uint8, offset=4 * (d + t))
        mask = np.unpackbits(bits, count=t).astype(bool)  # [T]
        if (lengths == 0).any() or int(lengths.sum(dtype=np.int64)) != t:
            raise self._damaged(index, "its document lengths do not add up to its tokens")
        if self._counts(lengths, ids) != {k: getattr(summary, k) for k in _COUNTS}:
            raise self._damaged(index, "its payload's counts differ from its summary's")
        if t and int(ids.max()) >= self.vocab:
            raise self._damaged(index, f"it holds token ids outside [0, {self.vocab})")
        return Block(summary, lengths, ids, mask, self._per_document(lengths, ids))

    def _damaged(self, index: int, why: str) -> CorpusError:
        return CorpusError(
            f"token block {index} at {self.loc.shown_of(self.dir)} is damaged ({why}); delete "
            f"{self.loc.shown_of(TOKENS_DIR)} and rerun: the blocks are made again"
        )


def remove_blocks(loc: Location) -> None:
    """Delete a cache's token blocks (once its shards hold every token)."""
    with suppress(OSError, LogitcacheError):  # another finisher may be removing them too
        loc.remove(TOKENS_DIR)


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )
