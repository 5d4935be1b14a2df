"""Cache records for a student with another tokenizer: the teacher's targets moved onto the
student's vocabulary at the positions where both tokenizations meet.

In: the cache's tokenizer, the student's, a mapping method, and cache records
(``SequenceRecord``). Out: records with the keys of ``logitcache.train.dataset.example_of``,
in the student's ids and length, plus ``teacher_aligned`` [S] bool: True where the row holds
the teacher's distribution mapped onto student ids; a trained position without it is
trained on cross-entropy only.

Mapping a teacher id to a student id (``METHODS``):

- ``exact``: a teacher token whose bytes are exactly a student token carries its mass to
  that token (special tokens by their text, EOS to EOS); every other id's mass joins the
  tail (the ``--tail`` policy then decides: ``bucket`` keeps it as one "rest" category,
  ``renorm`` drops it). Unbiased for sampled caches on the mapped ids.
- ``prefix``: as ``exact``, and every other teacher token carries its mass to the
  student's longest token that is a prefix of its bytes (the first step of that
  continuation for the student); only tokens no student token starts (bytes the student
  cannot spell) join the tail.
- ``chain``: as ``exact``, and where the student's true next token spans several teacher
  tokens (Llama-3's ``:\n`` for SmolLM2's ``:`` then ``\n``), that token gets the chained
  probability of the true continuation, p(``:``) x p(``\n`` | ``:``): the teacher's
  probability of each of its tokens in the span, each read from the teacher's row of that
  token (all stored in the cache; for a sampled cache the product of independent
  estimates, so still unbiased). The chained mass is taken off the student token the first
  teacher token maps to (``:``, or the tail), which keeps p(``:``)(1 - p(``\n`` | ``:``)):
  ``:`` followed by something else. Where a factor is not stored (a top-k miss, a token no
  draw hit) the chain is 0 and the row stays as ``exact`` makes it. Only the true
  continuation is chained (the cache holds no row after the teacher's other tokens), and
  only where the student's token ends where a teacher token ends (a student token ending
  inside a teacher token keeps the ``exact`` row).

Several teacher ids mapping to one student id add up; the mass of a row (support plus
tail) is conserved exactly. Alignment itself is ``logitcache.train.alignment``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from logitcache.core.errors import LogitcacheError
from logitcache.storage import SequenceRecord

from .alignment import Alignment, StudentTokenizer, align_row, special_map
from .collator import IGNORE_INDEX
from .token_bytes import MAX_TOKENS, TokenBytes, token_bytes

__all__ = ["METHODS", "CrossStats", "CrossTokenizer", "map_ids"]

METHODS = ("exact", "prefix", "chain")


@dataclass
class CrossStats:
    """Counts over the records converted so far (in this process)."""

    rows: int = 0
    student_tokens: int = 0
    teacher_tokens: int = 0
    trained: int = 0  # trained student positions
    aligned: int = 0  # of them, with a teacher distribution
    teacher_mass: float = 0.0  # teacher mass (support + tail) at aligned trained positions
    support_mass: float = 0.0  # of it, on the stored ids (top-k's or the draws; no tail)
    exact_mass: float = 0.0  # of it, carried by teacher ids that are a student token exactly
    mapped_mass: float = 0.0  # of it, carried to a student id by any rule (the rest: tail)
    longer: int = 0  # aligned trained positions whose student token spans several teacher's
    chained: int = 0  # of them, given a chained probability (``chain``; > 0)
    chained_mass: float = 0.0  # teacher mass moved onto those student tokens by the chain
    text_bytes: int = 0
    cut_bytes: int = 0  # text bytes no kept student token covers

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["aligned_share"] = self.aligned / max(self.trained, 1)
        out["exact_mass_share"] = self.exact_mass / max(self.teacher_mass, 1e-30)
        out["mapped_mass_share"] = self.mapped_mass / max(self.teacher_mass, 1e-30)
        out["exact_support_share"] = self.exact_mass / max(self.support_mass, 1e-30)
        out["mapped_support_share"] = self.mapped_mass / max(self.support_mass, 1e-30)
        out["longer_share"] = self.longer / max(self.aligned, 1)
        out["chained_share"] = self.chained / max(self.longer, 1)
        out["bytes_per_student_token"] = self.text_bytes / max(self.student_tokens, 1)
        out["bytes_per_teacher_token"] = self.text_bytes / max(self.teacher_tokens, 1)
        return out


@dataclass
class Chains:
    """The ``chain`` method's moves in one row: at ``rows`` (indices into the aligned trained
    student rows), ``mass`` moves from student id ``source`` (-1: the tail) to ``to``."""

    longer: int  # aligned trained rows whose student token is longer than the teacher's
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    to: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    mass: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _padded(table: TokenBytes, rows: int | None) -> TokenBytes:
    """``table`` with empty, non-special entries up to ``rows`` ids."""
    extra = (rows or 0) - len(table)
    if extra <= 0:
        return table
    if len(table) + extra > MAX_TOKENS:
        raise LogitcacheError(
            f"the cache's vocabulary has {rows:,} rows, more than {MAX_TOKENS:,} (not a text "
            "model's)"
        )
    special = np.concatenate([table.special, np.zeros(extra, dtype=bool)])
    pieces = table.pieces + (b"",) * extra
    return TokenBytes(pieces, special, table.name, table.content, table.eos_id, table.byte_pieces)


def map_ids(
    teacher: TokenBytes, student: TokenBytes, method: str, specials: dict[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """([Vt] int64 student id of each teacher id, -1: the tail; [Vt] bool mapped exactly)."""
    if method not in METHODS:
        raise ValueError(f"cross-tokenizer method {method!r}: expected one of {', '.join(METHODS)}")
    by_bytes = student.by_bytes()
    # Every proper prefix of a student token: the walk along a teacher token stops at the
    # first byte no student token continues with, so it costs at most the student's longest
    # token in lookups whatever the (outside) teacher vocabulary holds.
    starts = {p[:n] for p in by_bytes for n in range(1, len(p))} if method == "prefix" else set()
    out = np.full(len(teacher), -1, dtype=np.int64)
    exact = np.zeros(len(teacher), dtype=bool)
    for t, piece in enumerate(teacher.pieces):
        if not piece:
            mapped = specials.get(t)
            if mapped is not None:
                out[t], exact[t] = mapped, True
            continue
        s = by_bytes.get(piece)
        if s is not None:
            out[t], exact[t] = s, True
        elif method == "prefix":
            out[t] = _longest_prefix(piece, by_bytes, starts)
    return out, exact


def _longest_prefix(piece: bytes, by_bytes: dict[bytes, int], starts: set[bytes]) -> int:
    """The student id of the longest token that is a proper prefix of ``piece``, or -1."""
    best = -1
    for size in range(1, len(piece)):
        head = piece[:size]
        best = by_bytes.get(head, best)
        if head not in starts:
            break
    return best


class CrossTokenizer:
    """Converts cache records into records of a student with another tokenizer.

    ``teacher_tokenizer``: the cache's (``logitcache.storage.tokenizer.stored_tokenizer``).
    ``student_tokenizer``: the student's. ``method``: ``exact``, ``prefix`` or ``chain`` (module
    docstring). ``max_tokens``: student tokens kept per row (longer rows are cut there).
    ``teacher_rows``: the cache's vocabulary size where it exceeds its tokenizer's (Qwen2.5:
    152,064 logit rows for 151,665 tokens): ids past the tokenizer have no bytes, and their
    mass joins the tail.
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        method: str = "exact",
        max_tokens: int,
        teacher_rows: int | None = None,
    ) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.method, self.max_tokens = method, max_tokens
        teacher = token_bytes(teacher_tokenizer, "the cache's tokenizer")
        self.teacher = _padded(teacher, teacher_rows)
        table = token_bytes(student_tokenizer, "the student's tokenizer")
        self.student = StudentTokenizer(student_tokenizer, table)
        self.specials = special_map(self.teacher, table)
        self.id_map, self.exact = map_ids(self.teacher, table, method, self.specials)  # [Vt]
        self.stats = CrossStats()

    @property
    def student_bytes(self) -> TokenBytes:
        return self.student.table

    def align(self, r: SequenceRecord) -> Alignment:
        """The student's tokenization of the cache row ``r`` and where it meets the teacher's."""
        return align_row(
            r.input_ids,
            r.loss_mask.astype(bool),
            np.asarray(r.doc_starts, dtype=np.int64),
            self.teacher,
            self.student,
            self.specials,
            self.max_tokens,
        )

    def example(
        self,
        r: SequenceRecord,
        teacher_view: dict[str, torch.Tensor],
        *,
        vocab_limit: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The student's record of ``r``; ``teacher_view``: ``example_of(r)`` (teacher ids)."""
        a = self.align(r)
        n = len(a.input_ids)
        at = np.flatnonzero((a.teacher_row >= 0) & a.trained)  # [A] student rows with a target
        rows = a.teacher_row[at]  # [A] their teacher rows
        t_ids = teacher_view["teacher_ids"].numpy()[rows]  # [A, K]
        t_probs = teacher_view["teacher_probs"].numpy()[rows]
        t_valid = teacher_view["teacher_valid"].numpy()[rows]
        t_tail = teacher_view["teacher_tail"].numpy()[rows]  # [A]
        chain = self._chains(a, r, teacher_view, at, vocab_limit)
        ids, probs, valid, tail = self._mapped(
            t_ids, t_probs, t_valid, t_tail, n, at, vocab_limit, chain
        )
        aligned = np.zeros(n, dtype=bool)
        aligned[at] = True
        self._count(a, r, at, t_ids, t_probs, t_valid, t_tail, chain)
        labels = np.where(a.trained, a.input_ids, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(a.input_ids),  # [S] int64
            "labels": torch.from_numpy(labels),  # [S] int64
            "teacher_ids": torch.from_numpy(ids),  # [S, K'] int64 student ids
            "teacher_probs": torch.from_numpy(probs),  # [S, K'] float32
            "teacher_valid": torch.from_numpy(valid),  # [S, K'] bool
            "teacher_tail": torch.from_numpy(tail),  # [S] float32
            "teacher_aligned": torch.from_numpy(aligned),  # [S] bool
            "index": teacher_view["index"],
            "source": teacher_view["source"],
        }

    def _chains(self, a, r, teacher_view, at, vocab_limit) -> Chains:
        """The ``chain`` method's moves at the student rows ``at`` (module docstring)."""
        t_row = a.teacher_row
        first = t_row[at]  # [A] the teacher row aligned with each student row
        nxt = np.append(t_row, -1)[at + 1]  # [A] ... with the next student row, -1: none
        t_true = np.asarray(r.input_ids, dtype=np.int64)  # [T] the teacher's true tokens
        t_len = self.teacher.lengths[t_true]  # [T]
        s_true = a.input_ids[at]  # [A] the student's true tokens
        s_len = self.student_bytes.lengths[s_true]
        longer = s_len > t_len[first]
        if self.method != "chain" or not longer.any():
            return Chains(int(longer.sum()))
        span = nxt - first  # [A] teacher tokens the student's token spans, where whole
        t_end = np.cumsum(t_len)
        whole = (nxt >= 0) & (span >= 2)
        whole &= t_end[np.maximum(nxt - 1, 0)] - (t_end[first] - t_len[first]) == s_len
        if vocab_limit is not None:
            whole &= s_true < vocab_limit
        pick = np.flatnonzero(longer & whole)  # [C] indices into ``at``
        if not len(pick):
            return Chains(int(longer.sum()))
        ids = teacher_view["teacher_ids"].numpy()
        hit = (ids == t_true[:, None]) & teacher_view["teacher_valid"].numpy()
        p_true = np.where(hit, teacher_view["teacher_probs"].numpy(), 0).sum(1)  # [T]
        mass = np.ones(len(pick))
        for j in range(int(span[pick].max())):  # spans are a few tokens (Llama-3: <= 3)
            inside = j < span[pick]
            mass *= np.where(inside, p_true[np.where(inside, first[pick] + j, 0)], 1.0)
        src = self.id_map[t_true[first[pick]]]  # the student id the first token maps to
        if vocab_limit is not None:
            src = np.where(src >= vocab_limit, -1, src)
        keep = mass > 0
        return Chains(int(longer.sum()), pick[keep], src[keep], s_true[pick][keep], mass[keep])

    def _mapped(self, t_ids, t_probs, t_valid, t_tail, n, at, vocab_limit, chain: Chains):
        """[n, K'] student-space support of rows ``at`` (others empty) and [n] tails."""
        sid = self.id_map[t_ids]  # [A, K]
        if vocab_limit is not None:
            sid = np.where(sid >= vocab_limit, -1, sid)
        ok = t_valid & (sid >= 0)
        tail = np.zeros(n, dtype=np.float32)
        tail[at] = t_tail + np.where(t_valid & ~ok, t_probs, 0).sum(1)
        row, col = np.nonzero(ok)
        width = max(int(sid.max()) + 1 if sid.size else 1, int(chain.to.max(initial=0)) + 1)
        keys = row.astype(np.int64) * width + sid[row, col]  # row-major: sorted by row
        weights = t_probs[row, col].astype(np.float64)
        from_tail = chain.source < 0
        sources = chain.rows[~from_tail] * width + chain.source[~from_tail]  # keys losing mass
        if len(chain.rows):  # the chained mass: onto the true token, off the first's map
            np.subtract.at(tail, at[chain.rows[from_tail]], chain.mass[from_tail])
            np.maximum(tail, 0, out=tail)
            keys = np.concatenate([keys, chain.rows * width + chain.to, sources])
            weights = np.concatenate([weights, chain.mass, -chain.mass[~from_tail]])
        unique, inverse = np.unique(keys, return_inverse=True)
        mass = np.bincount(inverse, weights=weights, minlength=len(unique))
        if len(sources):  # a source whose whole mass moved (p(\n | :) = 1) leaves no entry
            emptied = (mass <= 1e-12) & np.isin(unique, sources)
            unique, mass = unique[~emptied], np.maximum(mass[~emptied], 0)
        u_row = unique // width
        first = np.searchsorted(u_row, u_row, side="left")
        u_col = np.arange(len(unique)) - first
        k = int(u_col.max()) + 1 if len(unique) else 1
        ids = np.zeros((n, k), dtype=np.int64)
        probs = np.zeros((n, k), dtype=np.float32)
        valid = np.zeros((n, k), dtype=bool)
        ids[at[u_row], u_col] = unique % width
        probs[at[u_row], u_col] = mass
        valid[at[u_row], u_col] = True
        return ids, probs, valid, tail

    def _count(self, a, r, at, t_ids, t_probs, t_valid, t_tail, chain: Chains) -> None:
        s = self.stats
        s.rows += 1
        s.longer += chain.longer
        s.chained += len(chain.rows)
        s.chained_mass += float(chain.mass.sum())
        s.student_tokens += len(a.input_ids)
        s.teacher_tokens += r.n_tokens
        s.trained += int(a.trained.sum())
        s.aligned += len(at)
        support = float(np.where(t_valid, t_probs, 0).sum())
        s.support_mass += support
        s.teacher_mass += support + float(t_tail.sum())
        s.exact_mass += float(np.where(t_valid & self.exact[t_ids], t_probs, 0).sum())
        s.mapped_mass += float(np.where(t_valid & (self.id_map[t_ids] >= 0), t_probs, 0).sum())
        s.text_bytes += a.n_bytes
        s.cut_bytes += a.cut_bytes
