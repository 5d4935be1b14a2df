"""Tokenizing and packing documents into the teacher's sequences.

In: `Document`s (`corpus.iter_documents`) and a tokenizer. Out: `PackedSequence`s — token
ids, a per-token loss mask and document starts — in a fixed order, so parallel workers that
each iterate the whole stream and keep every n-th sequence see the same sequences.

The stages are public so each can be tested and reused alone: `tokenize_document`
(document -> ids + train mask) and `pack_sequences` (token streams -> fixed-length
sequences); `iter_sequences` chains them after `iter_documents`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .corpus import CorpusError, CorpusSpec, Document, iter_documents

__all__ = [
    "CorpusStats",
    "PackedSequence",
    "iter_sequences",
    "pack_sequences",
    "tokenize_document",
]


@dataclass
class PackedSequence:
    """One sequence for the teacher; T == seq_len except possibly the last (or no-pack)."""

    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool; token t is a training target; [0] is always False
    doc_starts: np.ndarray  # [D] int32 positions where a document begins in this sequence


@dataclass
class CorpusStats:
    """Counters filled in while a corpus is iterated, for the run's summary line."""

    documents: int = 0
    """Documents read from the corpus, skipped ones included."""
    skipped_empty: int = 0
    """Documents with no tokens (empty or whitespace-only text, empty chat or ids)."""
    skipped_short: int = 0
    """Documents under 2 tokens, skipped when not packing."""
    truncated: int = 0
    """Documents cut at seq_len when not packing."""
    tokens: int = 0
    """Tokens emitted in sequences."""
    sequences: int = 0
    """Sequences emitted."""
    read: float | None = None
    """Share of the corpus read so far (``Document.read`` of the last document), if known."""

    def tokens_to_come(self, max_tokens: int | None = None) -> int | None:
        """Tokens still to come from the corpus, extrapolated from the share read so far and
        the tokens it gave, capped by ``max_tokens``; None where neither is known."""
        total = round(self.tokens / self.read) if self.read else None
        if max_tokens is not None:
            total = max_tokens if total is None else min(total, max_tokens)
        return None if total is None else max(0, total - self.tokens)


# ---------------------------------------------------------------------------------------
# Tokenization


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict], source: str, *, generation: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # jinja errors, missing template: all mean this chat is unusable
        raise CorpusError(f"chat template failed on {source}: {e}") from e
    return _encode(tokenizer, text)


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _tokenize_chat(
    messages: list[dict], tokenizer: Any, source: str
) -> tuple[list[int], list[bool]]:
    """Mark assistant tokens by rendering prefixes, which works with any template.

    For assistant message i the span starts after messages[:i] rendered with the
    generation prompt (so the role header is not a target) and ends after messages[:i+1]
    (so the end-of-turn marker is). Both renders must be token prefixes of the whole chat.
    """
    ids = _render(tokenizer, messages, source, generation=False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        end = _render(tokenizer, messages[: i + 1], source, generation=False)
        if not _is_prefix(end, ids):
            raise CorpusError(
                f"chat template is not prefix-stable on {source}: messages[:{i + 1}] do not "
                "render as a prefix of the whole chat, so assistant tokens cannot be located"
            )
        start = 0
        if i > 0:  # transformers refuses to render an empty chat; then the header is kept
            with_prompt = _render(tokenizer, messages[:i], source, generation=True)
            without = _render(tokenizer, messages[:i], source, generation=False)
            if _is_prefix(with_prompt, end):
                start = len(with_prompt)
            elif _is_prefix(without, end):
                start = len(without)
            else:
                raise CorpusError(
                    f"chat template is not prefix-stable on {source}: messages[:{i}] do not "
                    f"render as a prefix of messages[:{i + 1}]"
                )
        mask[start : len(end)] = [True] * (len(end) - start)
    return ids, mask


def tokenize_document(doc: Document, tokenizer: Any) -> tuple[list[int], list[bool]] | None:
    """Token ids and a per-token train mask (True: a training target); None if empty.

    Text: no special tokens added, all True. Chat: rendered with the tokenizer's chat
    template, True only on assistant content and the end-of-turn marker after it.
    input_ids: used as is, all True, checked to lie in [0, len(tokenizer)).
    """
    if doc.text is not None:
        if not doc.text.strip():
            return None
        ids = _encode(tokenizer, doc.text)
        return (ids, [True] * len(ids)) if ids else None
    if doc.messages is not None:
        if not doc.messages:
            return None
        ids, mask = _tokenize_chat(doc.messages, tokenizer, doc.source)
        return (ids, mask) if ids else None
    ids = list(doc.input_ids)  # type: ignore[arg-type]  # Document guarantees one is set
    if not ids:
        return None
    vocab = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise CorpusError(
            f"input_ids in {doc.source} hold {bad}, outside the tokenizer's vocabulary "
            f"[0, {vocab}); was it tokenized with another tokenizer?"
        )
    return ids, [True] * len(ids)


# ---------------------------------------------------------------------------------------
# Packing


def _sequence(ids: list[int], mask: list[bool], starts: list[int]) -> PackedSequence:
    loss_mask = np.asarray(mask, dtype=bool)
    loss_mask[0] = False  # nothing in this sequence predicts its first token
    return PackedSequence(
        input_ids=np.asarray(ids, dtype=np.int32),
        loss_mask=loss_mask,
        doc_starts=np.asarray(starts, dtype=np.int32),
    )


def pack_sequences(
    tokenized_docs: Iterable[tuple[list[int], list[bool]]],
    *,
    seq_len: int,
    eos_id: int | None,
    pack: bool,
    max_tokens: int | None = None,
    stats: CorpusStats | None = None,
    skip: int = 0,
) -> Iterator[PackedSequence]:
    """Cut tokenized documents into sequences; see the module docstring for the order.

    pack=True: each document is followed by EOS (unless it already ends in one; the EOS
    is a target iff the document's last token is), the stream is cut into consecutive
    seq_len chunks, and a final partial chunk of >= 2 tokens is kept.
    pack=False: one document per sequence, cut to seq_len, EOS appended if it fits and
    eos_id is set, no padding; documents under 2 tokens are skipped.
    max_tokens: the sequence that reaches the budget is cut so exactly max_tokens tokens
    are emitted (a 1-token remainder is dropped instead, as no sequence is that short).
    skip: where these documents are a later part of a corpus (``max_tokens`` is then the
    budget left where they begin), what of them earlier sequences hold: stream tokens
    (pack=True: the first sequence starts ``skip`` tokens into their EOS-separated stream)
    or whole sequences (pack=False). A worker starts its shards so (``shares.py``).
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise CorpusError(f"max_tokens must be >= 1 or unset, got {max_tokens}")
    if pack and eos_id is None:
        raise CorpusError(
            "tokenizer has no EOS token; packing needs one: set one or pass --no-pack"
        )
    stats = stats if stats is not None else CorpusStats()
    if pack:
        return _pack(tokenized_docs, seq_len, eos_id, max_tokens, stats, skip)
    return _no_pack(tokenized_docs, seq_len, eos_id, max_tokens, stats, skip)


def _emit(stats: CorpusStats, seq: PackedSequence) -> PackedSequence:
    stats.tokens += len(seq.input_ids)
    stats.sequences += 1
    return seq


def _pack(
    docs: Iterable[tuple[list[int], list[bool]]],
    seq_len: int,
    eos_id: int,
    max_tokens: int | None,
    stats: CorpusStats,
    skip: int = 0,
) -> Iterator[PackedSequence]:
    budget = max_tokens
    buf_ids: list[int] = []
    buf_mask: list[bool] = []
    starts: list[int] = []  # document starts, as positions in buf_ids
    pos = 0  # buf_ids[:pos] is already emitted

    def chunk(n: int) -> PackedSequence:
        return _sequence(
            buf_ids[pos : pos + n],
            buf_mask[pos : pos + n],
            [s - pos for s in starts if pos <= s < pos + n],
        )

    for ids, mask in docs:
        assert len(ids) == len(mask) and ids, "tokenized documents are non-empty and aligned"
        # Drop the emitted prefix once per document, not once per chunk: a 1M-token
        # document then costs one copy, not 500 (at seq_len 2048).
        buf_ids, buf_mask = buf_ids[pos:], buf_mask[pos:]
        starts = [s - pos for s in starts if s >= pos]
        pos = 0
        starts.append(len(buf_ids))
        buf_ids.extend(ids)
        buf_mask.extend(mask)
        if ids[-1] != eos_id:
            buf_ids.append(eos_id)
            buf_mask.append(mask[-1])
        if skip:  # earlier sequences hold these tokens: as if emitted
            dropped = min(skip, len(buf_ids) - pos)
            pos, skip = pos + dropped, skip - dropped
            if budget is not None:
                budget -= dropped
        while True:
            if budget is not None and budget < 2:  # no sequence is shorter than 2 tokens
                return
            n = seq_len if budget is None else min(seq_len, budget)
            if len(buf_ids) - pos < n:
                break
            yield _emit(stats, chunk(n))
            pos += n
            if budget is not None:
                budget -= n
    if len(buf_ids) - pos >= 2:  # shorter than seq_len and than the budget
        yield _emit(stats, chunk(len(buf_ids) - pos))


def _no_pack(
    docs: Iterable[tuple[list[int], list[bool]]],
    seq_len: int,
    eos_id: int | None,
    max_tokens: int | None,
    stats: CorpusStats,
    skip: int = 0,
) -> Iterator[PackedSequence]:
    budget = max_tokens
    for ids, mask in docs:
        assert len(ids) == len(mask), "tokenized documents are aligned"
        if len(ids) < 2:
            stats.skipped_short += 1
            continue
        if len(ids) > seq_len:
            stats.truncated += 1
        ids, mask = list(ids[:seq_len]), list(mask[:seq_len])
        if eos_id is not None and len(ids) < seq_len and ids[-1] != eos_id:
            ids.append(eos_id)
            mask.append(mask[-1])
        if budget is not None:
            ids, mask = ids[:budget], mask[:budget]
            if len(ids) < 2:
                return
            budget -= len(ids)
        if skip:  # an earlier sequence
            skip -= 1
        else:
            yield _emit(stats, _sequence(ids, mask, [0]))
        if budget == 0:
            return


# ---------------------------------------------------------------------------------------
# The whole chain


def iter_sequences(
    spec: CorpusSpec, tokenizer: Any, stats: CorpusStats | None = None
) -> Iterator[PackedSequence]:
    """Documents -> tokens -> sequences for `spec`; the same inputs give the same order.

    `stats`, if given, is updated as the iterator advances. Raises CorpusError("corpus is
    empty: ...") at the end if no sequence resulted.
    """
    stats = stats if stats is not None else CorpusStats()
    documents = iter_documents(spec)

    def tokenized() -> Iterator[tuple[list[int], list[bool]]]:
        for doc in documents:
            stats.documents += 1
            stats.read = doc.read
            out = tokenize_document(doc, tokenizer)
            if out is None:
                stats.skipped_empty += 1
            else:
                yield out

    sequences = pack_sequences(
        tokenized(),
        seq_len=spec.seq_len,
        eos_id=tokenizer.eos_token_id,
        pack=spec.pack,
        max_tokens=spec.max_tokens,
        stats=stats,
    )

    def generate() -> Iterator[PackedSequence]:
        emitted = 0
        for seq in sequences:
            emitted += 1
            yield seq
        if emitted == 0:
            raise CorpusError(
                f"corpus is empty: no sequence of >= 2 tokens from {', '.join(spec.data)} "
                f"({stats.documents} documents read, {stats.skipped_empty} empty, "
                f"{stats.skipped_short} too short)"
            )

    return generate()
