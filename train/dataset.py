"""A cache as a PyTorch dataset: one record (a dict of tensors) per cached sequence.

In: one or more caches (paths or URLs), the split (``train``, ``eval`` or ``all``) and how
teacher targets are read. Out: ``CacheDataset``, map-style (``len``, ``ds[i]``), so any
sampler, ``DistributedSampler`` or trainer shards it; ``ds.stream(...)`` is the streaming
form with exact resume (``logitcache.train.stream``).

A record (``EXAMPLE_KEYS``; all per-token tensors are indexed by the token they are about,
like ``labels`` in Hugging Face: the student predicts token t at position t - 1):

- ``input_ids`` [T] int64; ``labels`` [T] int64, the token where it is trained, else -100
  (always -100 at t = 0, which nothing predicts);
- ``teacher_ids`` [T, K] int64, ``teacher_probs`` [T, K] float32 (the teacher's
  temperature-1 probability of each id: stored log-probs exponentiated, or draw counts / N
  for a sampled cache), ``teacher_valid`` [T, K] bool (False on padding entries) and
  ``teacher_tail`` [T] float32 (teacher mass outside the ids; 0 for counts): the teacher's
  distribution of token t. Row 0 is empty;
- ``index`` int64 (the sequence's global index in its cache) and ``source`` int64 (which
  cache of the list it came from);
- with a student of another tokenizer (``cross_tokenizer``), the record is the student's:
  its ids, its length S (at most ``student_seq_len``), the teacher's targets mapped onto its
  vocabulary (``logitcache.train.crosstok``), and ``teacher_aligned`` [S] bool, False where
  a trained position has no teacher target (cross-entropy only).

Records are read one at a time: a remote cache answers ``ds[i]`` with a ranged read of one
sequence (``CacheReader.read``), and no shard is downloaded whole unless a stream schedules it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from logitcache.errors import LogitcacheError
from logitcache.identity import FULL_FINGERPRINT, same_tokenizer
from logitcache.storage import CacheReader, CacheSpec, SequenceRecord
from logitcache.untrusted import redact

from .collator import IGNORE_INDEX
from .data import heldout_mask

__all__ = [
    "EXAMPLE_KEYS",
    "SPLITS",
    "TARGETS",
    "CacheDataset",
    "example_of",
    "tokenizer_mismatch",
]

EXAMPLE_KEYS = (
    "input_ids",
    "labels",
    "teacher_ids",
    "teacher_probs",
    "teacher_valid",
    "teacher_tail",
    "index",
    "source",
)
SPLITS = ("train", "eval", "all")
TARGETS = ("auto", "counts", "probs")


class CacheDataset(Dataset):
    """The sequences of one cache, or of several caches one after another, as records.

    ``url``: a cache path or URL, or a list of them (they must share a tokenizer).
    ``split``: ``train`` (what ``logitcache train`` trains on), ``eval`` (the held-out
    ``eval_fraction`` of the sequences, chosen by a stable hash of their index) or ``all``.
    ``vocab_limit``: the student's vocabulary rows; teacher ids at or above it are moved
    into the tail (default: keep all). ``target``: ``auto`` (stored log-probs, else counts
    / N), ``counts`` or ``probs``. ``max_sequences``: keep only the first N of the split.
    ``reader_options``: keyword arguments of every ``CacheReader`` (``local_cache``, ...).

    A student with another tokenizer than the cache's: ``cross_tokenizer`` (``exact`` or
    ``prefix``: how teacher ids that are no student token are mapped, see
    ``logitcache.train.crosstok``), ``student_tokenizer`` (its transformers tokenizer) and
    ``student_seq_len`` (student tokens kept per row; default the cache's sequence length).
    The cache's tokenizer is read from the cache (``teacher_tokenizer`` overrides it).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        split: str = "train",
        eval_fraction: float = 0.02,
        vocab_limit: int | None = None,
        target: str = "auto",
        max_sequences: int | None = None,
        verify: bool = True,
        reader_options: dict[str, Any] | None = None,
        cross_tokenizer: str | None = None,
        student_tokenizer: Any = None,
        student_seq_len: int | None = None,
        teacher_tokenizer: Any = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
        self.urls = (
            [str(url)]
            if isinstance(url, str) or not isinstance(url, Sequence)
            else [str(u) for u in url]
        )
        if not self.urls:
            raise ValueError("CacheDataset needs at least one cache")
        self.split, self.eval_fraction = split, eval_fraction
        self.vocab_limit, self.target = vocab_limit, target
        self.reader_options = {"verify": verify, **(reader_options or {})}
        self._readers: list[CacheReader] | None = None
        self._check_tokenizers()
        parts = [self._split_of(r.sequence_indices()) for r in self.readers()]
        if max_sequences is not None:
            parts = _first(parts, max_sequences)
        self.sizes = [len(p) for p in parts]
        """Sequences of each cache in this split."""
        self._source = np.concatenate(
            [np.full(len(p), c, dtype=np.int64) for c, p in enumerate(parts)]
        )
        self._index = np.concatenate(parts).astype(np.int64)  # [n] global index in its cache
        self._byte_lengths: np.ndarray | None = None
        self._of: Any = None  # the tokenizer _byte_lengths was read from
        self.cross = None
        """The ``CrossTokenizer`` converting records for a student of another tokenizer."""
        if cross_tokenizer is not None:
            self.cross = self._cross(
                cross_tokenizer, student_tokenizer, student_seq_len, teacher_tokenizer
            )
        elif student_tokenizer is not None or student_seq_len is not None:
            raise ValueError("student_tokenizer and student_seq_len need cross_tokenizer")

    def byte_lengths(self, tokenizer: Any = None) -> np.ndarray | None:
        """[V] int64 bytes of each id of the records' labels (0: special tokens), for bits
        per byte: the student's tokenizer with ``cross_tokenizer``, else ``tokenizer`` (the
        cache's, or one that extends it), else the one stored in the cache; None when the
        cache stores none (written before format 1.1) and none is given."""
        if self._byte_lengths is None or (tokenizer is not None and tokenizer is not self._of):
            self._of = tokenizer
            from .token_bytes import token_bytes

            if self.cross is not None:
                table = self.cross.student_bytes
            else:
                try:
                    if tokenizer is None:
                        from .student import cache_tokenizer

                        tokenizer, _ = cache_tokenizer(self.readers()[0].loc, self.spec, None)
                    table = token_bytes(tokenizer, "the cache's tokenizer")
                except LogitcacheError:  # no tokenizer (an old cache): no bits per byte
                    return None
            rows = max(len(table), self.spec.vocab_size)
            self._byte_lengths = np.zeros(rows, dtype=np.int64)
            self._byte_lengths[: len(table)] = table.lengths
        return self._byte_lengths

    def _cross(self, method: str, student: Any, seq_len: int | None, teacher: Any):
        from .crosstok import CrossTokenizer

        if student is None:
            raise ValueError("cross_tokenizer needs student_tokenizer (the student's tokenizer)")
        if teacher is None:
            from .student import cache_tokenizer

            teacher, _ = cache_tokenizer(self.readers()[0].loc, self.spec, None)
        max_tokens = seq_len if seq_len is not None else self.spec.seq_len
        rows = self.spec.vocab_size
        return CrossTokenizer(
            teacher, student, method=method, max_tokens=max_tokens, teacher_rows=rows
        )

    # -- readers (reopened lazily after pickling into a DataLoader worker) -----------------
    def readers(self) -> list[CacheReader]:
        if self._readers is None:
            self._readers = [CacheReader(u, **self.reader_options) for u in self.urls]
        return self._readers

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": None}

    @property
    def spec(self) -> CacheSpec:
        """The first cache's spec (tokenizer, vocabulary size, sequence length, mode)."""
        return self.readers()[0].spec

    def _check_tokenizers(self) -> None:
        mismatch = tokenizer_mismatch(self.readers())
        if mismatch is not None:
            r, mine, theirs = mismatch
            raise ValueError(
                f"cache {r.loc.shown} was made with another tokenizer than {redact(self.urls[0])} "
                f"(fingerprint {theirs[:16]} vs {mine[:16]}); mixed caches "
                "must share one tokenizer"
            )

    def _split_of(self, indices: np.ndarray) -> np.ndarray:
        if self.split == "all":
            return indices
        held = heldout_mask(indices, self.eval_fraction)
        return indices[held] if self.split == "eval" else indices[~held]

    # -- map-style access ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def locate(self, i: int) -> tuple[int, int]:
        """(cache position in the list, global sequence index) of item ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a CacheDataset of {len(self)} sequences")
        return int(self._source[i]), int(self._index[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        source, index = self.locate(i)
        return self.read(source, index)

    def read(self, source: int, index: int) -> dict[str, torch.Tensor]:
        """The record of sequence ``index`` of cache ``source`` (any split)."""
        record = self.readers()[source].read(index)
        if self.cross is not None:
            view = example_of(record, source=source, target=self.target)
            return self.cross.example(record, view, vocab_limit=self.vocab_limit)
        return example_of(record, source=source, vocab_limit=self.vocab_limit, target=self.target)

    def positions(self, source: np.ndarray, index: np.ndarray) -> np.ndarray:
        """[n] int64 dataset positions of (cache, global sequence index) pairs."""
        starts = np.concatenate([[0], np.cumsum(self.sizes)])
        pos = np.empty(len(index), dtype=np.int64)
        for c in range(len(self.sizes)):
            mine = self._index[starts[c] : starts[c + 1]]  # sorted: a split keeps index order
            sel = np.asarray(source) == c
            at = np.searchsorted(mine, np.asarray(index)[sel])
            if np.any(at >= len(mine)) or np.any(
                mine[np.minimum(at, len(mine) - 1)] != np.asarray(index)[sel]
            ):
                raise IndexError(f"a sequence of cache {c} is not in this dataset's split")
            pos[sel] = starts[c] + at
        return pos

    def mixture_weights(self, weights: Sequence[float]) -> torch.Tensor:
        """[n] float64 per-item weights for ``WeightedRandomSampler``: cache c is drawn
        with probability ``weights[c] / sum(weights)`` (a map-style mixture)."""
        if len(weights) != len(self.urls) or min(weights) <= 0:
            raise ValueError(f"expected {len(self.urls)} positive weights, got {list(weights)}")
        per_item = np.asarray(weights, dtype=np.float64) / np.maximum(self.sizes, 1)
        return torch.from_numpy(per_item[self._source])

    def stream(self, batch_size: int, **options: Any):
        """The streaming form: collated micro-batches of ``batch_size`` sequences in the
        exact-resume, block-shuffled order; see ``logitcache.train.stream.CacheStream`` for
        ``options`` (keywords)."""
        from .stream import CacheStream

        return CacheStream(self, batch_size=batch_size, **options)


def tokenizer_mismatch(readers: Sequence[CacheReader]) -> tuple[CacheReader, str, str] | None:
    """The first cache made with another tokenizer than ``readers[0]``'s, as (that reader,
    the first's fingerprint, its fingerprint); None when all share one
    (``logitcache.identity.same_tokenizer``)."""
    first = readers[0].spec.tokenizer
    for r in readers[1:]:
        if not same_tokenizer(first, r.spec.tokenizer):
            return r, _fingerprint(first), _fingerprint(r.spec.tokenizer)
    return None


def _fingerprint(record: Any) -> str:
    return str(record.get(FULL_FINGERPRINT) or record.get("fingerprint"))


def _first(parts: list[np.ndarray], n: int) -> list[np.ndarray]:
    out = []
    for p in parts:
        out.append(p[: max(0, n)])
        n -= len(out[-1])
    return out


def example_of(
    r: SequenceRecord, *, source: int = 0, vocab_limit: int | None = None, target: str = "auto"
) -> dict[str, torch.Tensor]:
    """One cached sequence as a record (see the module docstring for the keys)."""
    n_tok, n_pos = r.n_tokens, r.n_positions
    use_counts = target == "counts" or (target == "auto" and r.logprobs is None)
    if use_counts and r.counts is None:
        raise ValueError("target 'counts' needs a sampled cache")
    if target == "probs" and r.logprobs is None:
        raise ValueError("target 'probs' needs stored log-probs (top-k, or --sampled-logprobs)")
    k = int(r.n_entries.max()) if n_pos else 1
    row = np.repeat(np.arange(n_pos), r.n_entries)  # [E] position of each stored entry
    if use_counts:  # counts/N even when log-probs are stored too
        draws = r.counts.astype(np.float32)
        values = draws / np.bincount(row, weights=draws, minlength=n_pos)[row]
    else:
        values = np.exp(r.logprobs)
    col = np.arange(r.offsets[-1]) - np.repeat(r.offsets[:-1], r.n_entries)
    ids = np.zeros((n_tok, k), dtype=np.int64)  # row t: the teacher's view of token t
    probs = np.zeros((n_tok, k), dtype=np.float32)
    valid = np.zeros((n_tok, k), dtype=bool)
    tail = np.zeros(n_tok, dtype=np.float32)
    ids[row + 1, col] = r.ids
    probs[row + 1, col] = values
    valid[row + 1, col] = True
    if not use_counts:
        tail[1:] = r.tail_mass
    if vocab_limit is not None:  # teacher rows the student lacks: their mass joins the tail
        foreign = valid & (ids >= vocab_limit)
        if foreign.any():
            tail = tail + np.where(foreign, probs, 0).sum(1, dtype=np.float32)
            valid &= ~foreign
            probs = np.where(foreign, 0, probs).astype(np.float32)
            ids = np.where(foreign, 0, ids)
    input_ids = r.input_ids.astype(np.int64)
    trained = r.loss_mask.astype(bool).copy()
    trained[0] = False
    labels = np.where(trained, input_ids, IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),  # [T] int64
        "labels": torch.from_numpy(labels),  # [T] int64
        "teacher_ids": torch.from_numpy(ids),  # [T, K] int64
        "teacher_probs": torch.from_numpy(probs),  # [T, K] float32
        "teacher_valid": torch.from_numpy(valid),  # [T, K] bool
        "teacher_tail": torch.from_numpy(tail.astype(np.float32)),  # [T] float32
        "index": torch.tensor(r.index, dtype=torch.int64),
        "source": torch.tensor(source, dtype=torch.int64),
    }
