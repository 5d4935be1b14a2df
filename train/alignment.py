"""One cache row retokenized by a student with another tokenizer, and aligned with it.

In: a row's teacher ids [T] (with its ``loss_mask`` [T] and ``doc_starts``), the
``TokenBytes`` of the cache's tokenizer and of the student's, and the student's tokenizer.
Out: ``Alignment``: the student's ids [S] for the same text, which of them are trained,
and for each student token the teacher row (token index) that predicts the same
continuation, where there is one.

How (docs/api.md, "Students with another tokenizer"):

- The row is cut into pieces: runs of text tokens within one document, and each
  zero-byte token (special: EOS, chat markers) alone. A text piece's bytes are the teacher
  tokens' bytes joined; the student tokenizes each piece on its own, so no student token
  crosses a document boundary or a special token. A special token becomes the student's
  token of the same text (``<|im_start|>``), the teacher's EOS the student's EOS, or
  nothing when the student has no such token.
- Bytes that are not UTF-8 (a character cut by the row's edge) are not tokenized: no
  student token covers them.
- Student token s and teacher token t are aligned when they start at the same byte of the
  same piece (both tokenizations end a token there), s > 0 and t > 0: the teacher's
  distribution of token t and the student's prediction of token s condition on the same
  bytes and predict the continuation from the same byte.
- A student token is trained when every teacher token its bytes overlap is trained (chat
  masks carry over by bytes: a student token straddling an assistant turn's edge is not
  trained); a special one when the teacher's special token is.
- A student whose tokenizer starts a text with BOS by default (Llama, Gemma) gets its BOS
  first in every row (never trained, aligned with nothing).
- The student row is cut to ``max_tokens`` (the rest of the row's text is lost).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.errors import LogitcacheError

from .token_bytes import TokenBytes

__all__ = ["Alignment", "StudentTokenizer", "align_row", "special_map"]

_NOT_UTF8 = re.compile("[\udc80-\udcff]+")  # surrogateescape's stand-ins for invalid bytes
_PIECE = 1 << 32  # key = piece * _PIECE + byte offset in the piece


@dataclass
class Alignment:
    """A cache row as the student sees it (see the module docstring)."""

    input_ids: np.ndarray  # [S] int64 student ids
    trained: np.ndarray  # [S] bool, the student token is a training target
    teacher_row: np.ndarray  # [S] int64 teacher token index predicting the same bytes, -1 if none
    n_bytes: int  # bytes of text in the row
    cut_bytes: int  # of them, lost to the cut at max_tokens (or not UTF-8)


class StudentTokenizer:
    """The student's tokenizer as alignment uses it: text -> ids and byte end offsets."""

    def __init__(self, tokenizer: Any, table: TokenBytes) -> None:
        self.tokenizer, self.table = tokenizer, table
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.fallbacks = 0  # pieces whose token bytes did not spell the text (offsets used)
        self.bos = _default_bos(tokenizer)

    def encode(self, text: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
        """([n] int64 ids, [n] int64 byte ends in ``raw``) of ``text`` (``raw`` its UTF-8)."""
        if self.backend is not None:
            enc = self.backend.encode(text, add_special_tokens=False)
            ids = enc.ids
        else:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
        if ids and not 0 <= min(ids) <= max(ids) < len(self.table):
            raise LogitcacheError(
                f"the student's tokenizer gave token id {max(ids)} outside its "
                f"{len(self.table)} tokens"
            )
        spelled = b"".join(map(self.table.pieces.__getitem__, ids))
        ids = np.asarray(ids, dtype=np.int64)
        lengths = self.table.lengths[ids]
        if spelled == raw:
            return ids, np.cumsum(lengths)
        if spelled[:1] == b" " and spelled[1:] == raw:
            return ids, np.cumsum(lengths) - 1  # SentencePiece's space before the text
        self.fallbacks += 1  # a normalizing tokenizer: its character offsets, in bytes
        offsets = enc.offsets if self.backend is not None else enc["offset_mapping"]
        char_end = np.cumsum([0, *(len(c.encode("utf-8", "surrogatepass")) for c in text)])
        ends = np.asarray([char_end[min(e, len(text))] for _, e in offsets], dtype=np.int64)
        return ids, np.maximum.accumulate(ends) if len(ends) else ends


def _default_bos(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts before a text by default (Llama, Gemma), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return None
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # a tokenizer that cannot encode: alignment will say so
        return None
    return bos if ids and ids[0] == bos else None


def special_map(teacher: TokenBytes, student: TokenBytes) -> dict[int, int]:
    """Teacher special id -> the student's id of the same text (EOS -> EOS)."""
    by_content = student.id_of_content()
    out = {t: by_content[text] for t, text in teacher.content.items() if text in by_content}
    if teacher.eos_id is not None and student.eos_id is not None:
        out.setdefault(teacher.eos_id, student.eos_id)
    return out


def align_row(
    ids: np.ndarray,
    loss_mask: np.ndarray,
    doc_starts: np.ndarray,
    teacher: TokenBytes,
    student: StudentTokenizer,
    specials: dict[int, int],
    max_tokens: int,
) -> Alignment:
    """Align one cache row (``ids`` [T], ``loss_mask`` [T] bool, ``doc_starts`` [D]); see the
    module docstring. ``specials``: ``special_map(teacher, student.table)``."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    lengths = teacher.lengths[ids]  # [T] bytes of each teacher token
    empty = lengths == 0  # special tokens (and holes): pieces of their own
    cut = np.zeros(n, dtype=bool)
    cut[np.asarray(doc_starts, dtype=np.int64)[(doc_starts >= 0) & (doc_starts < n)]] = True
    cut[1:] |= empty[1:] | empty[:-1]
    cut[0] = True
    piece = np.cumsum(cut) - 1  # [T] piece of each teacher token
    first = np.flatnonzero(cut)  # [P] first token of each piece
    starts = np.cumsum(lengths) - lengths  # [T] byte start in the row
    t_key = piece * _PIECE + (starts - starts[first][piece])  # [T] where each token starts
    byte_mask = np.repeat(loss_mask.astype(bool), lengths)  # [bytes] trained bytes
    untrained = np.concatenate([[0], np.cumsum(~byte_mask)])  # prefix counts
    out_ids, out_keys, out_trained = [], [], []
    text_bytes = int(lengths.sum())
    unreachable = []  # teacher tokens right after a special token the student lacks
    for p, lo in enumerate(first):
        hi = first[p + 1] if p + 1 < len(first) else n
        if empty[lo]:
            mapped = specials.get(int(ids[lo]))
            if mapped is None:
                unreachable.append(hi)
                continue
            out_ids.append(np.array([mapped]))
            out_keys.append(np.array([p * _PIECE]))
            out_trained.append(np.array([bool(loss_mask[lo])]))
            continue
        raw = b"".join(map(teacher.pieces.__getitem__, ids[lo:hi].tolist()))
        row_start = int(starts[lo])
        for run_start, text, run_raw in _utf8_runs(raw):
            sids, ends = student.encode(text, run_raw)
            begins = np.concatenate([[0], ends[:-1]])
            a, b = row_start + run_start + begins, row_start + run_start + ends
            trained = (untrained[b] - untrained[a] == 0) & (b > a)
            out_ids.append(sids)
            out_keys.append(p * _PIECE + run_start + begins)
            out_trained.append(trained)
    starts_bos = bool(out_ids) and out_ids[0][0] == student.bos  # the teacher's own BOS
    if student.bos is not None and not starts_bos:  # as the student's tokenizer writes text
        out_ids.insert(0, np.array([student.bos]))
        out_keys.insert(0, np.array([-2]))  # never a teacher key
        out_trained.insert(0, np.array([False]))
    if not out_ids:  # nothing the student can spell: one untrained token keeps batches valid
        out_ids.append(np.array([student.table.eos_id or 0]))
        out_keys.append(np.array([-2]))
        out_trained.append(np.array([False]))
    s_ids = np.concatenate(out_ids)
    s_keys = np.concatenate(out_keys)
    s_trained = np.concatenate(out_trained)
    kept = min(len(s_ids), max_tokens)
    covered = int(student.table.lengths[s_ids[:kept]].sum())
    s_ids, s_keys, s_trained = s_ids[:kept], s_keys[:kept], s_trained[:kept].copy()
    s_trained[0] = False  # nothing in the row predicts its first token
    teacher_row = np.full(kept, -1, dtype=np.int64)
    t_ok = np.ones(n, dtype=bool)
    t_ok[0] = False
    t_ok[[u for u in unreachable if u < n]] = False
    _, s_at, t_at = np.intersect1d(s_keys, np.where(t_ok, t_key, -1), return_indices=True)
    teacher_row[s_at] = t_at
    teacher_row[0:1] = -1
    return Alignment(
        s_ids.astype(np.int64),
        s_trained.astype(bool),
        teacher_row,
        text_bytes,
        max(0, text_bytes - covered),
    )


def _utf8_runs(raw: bytes) -> list[tuple[int, str, bytes]]:
    """(byte offset, text, its bytes) of each maximal UTF-8 run of ``raw``."""
    try:
        return [(0, raw.decode("utf-8"), raw)]
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", "surrogateescape")
    runs, at, pos = [], 0, 0  # at: byte offset, pos: character index
    for m in _NOT_UTF8.finditer(text):
        if m.start() > pos:
            chunk = text[pos : m.start()]
            size = len(chunk.encode("utf-8"))
            runs.append((at, chunk, raw[at : at + size]))
            at += size
        at += m.end() - m.start()  # one stand-in character per invalid byte
        pos = m.end()
    if pos < len(text):
        runs.append((at, text[pos:], raw[at:]))
    return runs
