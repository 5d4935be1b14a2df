"""From teacher logits to the sparse distributions a cache stores, on the teacher's device.

In: ``Logits`` of one sequence: its ``[T, D]`` last hidden states and the teacher's output
head, or its ``[T, V]`` logits themselves (any float dtype). Out (host numpy): per position
the stored ids, their log-probs, counts (sampled mode) and the uncovered mass.

The logits exist a chunk of positions at a time: each chunk's rows go through the head and a
float32 log-softmax over the full vocabulary, and only the sparse result crosses to the host,
so memory does not grow with the batch (SmolLM2-135M, V=49,152, on CPU: 341-row chunks,
~3 x 64 MB alive at once). A per-position quantity of the full distribution (an entropy, say)
belongs in the same chunk loops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Logits", "SparseTargets", "sample_generator", "sampled_targets", "topk_targets"]

# float32 elements of one chunk's logits. On CUDA (and MPS) a multinomial call's draws depend
# on its shape, so the rows per call stay what they were before chunking (512 MB a chunk)
# and a cache's draws never change. The CPU generator draws row after row, so any chunk
# gives the same numbers (tests/precompute/test_memory.py) and CPU takes ~64 MB chunks.
_ROW_BUDGET = 1 << 27
_CPU_ROW_BUDGET = 1 << 24
# The head runs on whole blocks of this many positions of the padded sequence, as it ran on
# whole padded batches (widths are multiples of 64) before chunking: a CPU matmul rounds a
# row differently when it has under 16 rows (float32) or an odd number of them (bfloat16).
_HEAD_BLOCK = 64


@dataclass(frozen=True)
class Logits:
    """The logits ``head(states)`` [P, V] of a sequence's first P positions, made a chunk of
    rows at a time."""

    states: torch.Tensor  # [W, D], W >= P: last hidden states (D = hidden size) or logits (V)
    n_rows: int  # P
    vocab: int
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # [n, D] -> [n, V]; None: D = V

    def chunk_rows(self) -> int:
        """Rows per chunk: a function of V and the device only, never of the batch."""
        if self.states.device.type != "cpu":
            return max(1, _ROW_BUDGET // max(self.vocab, 1))
        rows = _CPU_ROW_BUDGET // max(self.vocab, 1)
        return max(_HEAD_BLOCK, rows - rows % _HEAD_BLOCK)  # V=49,152: 320 rows, 63 MB

    def log_probs(self) -> Iterator[torch.Tensor]:
        """Float32 log-softmax [n, V] of consecutive chunks of rows; a consumer that drops
        each chunk before the next (``del``) holds one chunk's logits at a time."""
        rows = self.chunk_rows()
        for start in range(0, self.n_rows, rows):
            yield self._log_softmax(start, min(start + rows, self.n_rows))

    def _log_softmax(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) -> [n, V] float32; the head's logits die on return."""
        if self.head is None:
            logits = self.states[start:stop]
        else:
            lo = start - start % _HEAD_BLOCK
            hi = min(stop + (-stop) % _HEAD_BLOCK, self.states.shape[0])
            logits = self.head(self.states[lo:hi])[start - lo : stop - lo]  # teacher dtype
        return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class SparseTargets:
    ids: np.ndarray  # [E] uint32, per position sorted by log-prob (desc), ties by id
    logprobs: np.ndarray  # [E] float32
    n_entries: np.ndarray  # [P] int32
    tail_mass: np.ndarray  # [P] float32, computed in float32 before any quantization
    counts: np.ndarray | None = None  # [E] uint8 (sampled)


@torch.no_grad()
def topk_targets(logits: Logits, k: int) -> SparseTargets:
    """Top-k ids and log-probs (temperature 1) of each position, with the missing mass."""
    ids, lps, tails = [], [], []
    for lp in logits.log_probs():  # [n, V] float32
        top_lp, top_ids = torch.topk(lp, k, dim=-1, sorted=True)  # [n, k]
        del lp
        tail = (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)  # [n] float32
        ids.append(top_ids.to(torch.int32).cpu())
        lps.append(top_lp.cpu())
        tails.append(tail.cpu())
    out_ids = torch.cat(ids).numpy()
    out_lp = torch.cat(lps).numpy()
    out_ids, out_lp = _sort_ties_by_id(out_ids, out_lp)
    return SparseTargets(
        ids=out_ids.reshape(-1).astype(np.uint32),
        logprobs=out_lp.reshape(-1),
        n_entries=np.full(logits.n_rows, k, dtype=np.int32),
        tail_mass=torch.cat(tails).numpy(),
    )


def _sort_ties_by_id(ids: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the order within equal log-probs canonical (torch.topk leaves it open)."""
    if lp.shape[1] < 2 or not (lp[:, 1:] == lp[:, :-1]).any():
        return ids, lp
    order = np.lexsort((ids, -lp), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(lp, order, -1)


def sample_generator(seed: int, sequence_index: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, sequence index) alone: draws never depend on batching."""
    digest = hashlib.sha256(f"logitcache-sample:{seed}:{sequence_index}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return gen


@torch.no_grad()
def sampled_targets(logits: Logits, n_samples: int, generator: torch.Generator):
    """Distinct ids among N draws per position, with counts and log-probs."""
    n_rows, vocab = logits.n_rows, logits.vocab
    draws, draw_lps, tails = [], [], []
    for lp in logits.log_probs():  # [n, V] float32
        d = torch.multinomial(lp.exp(), n_samples, replacement=True, generator=generator)
        d, _ = torch.sort(d, dim=-1)  # [n, N]
        d_lp = torch.gather(lp, 1, d)  # [n, N] float32
        del lp
        first = torch.ones_like(d, dtype=torch.bool)
        first[:, 1:] = d[:, 1:] != d[:, :-1]
        covered = torch.where(first, d_lp.exp(), torch.zeros_like(d_lp)).sum(-1)
        tails.append((1.0 - covered).clamp_min(0.0).cpu())
        draws.append(d.to(torch.int32).cpu())
        draw_lps.append(d_lp.cpu())
    d = torch.cat(draws).numpy()  # [P, N] sorted per row
    d_lp = torch.cat(draw_lps).numpy()
    pos = np.repeat(np.arange(n_rows, dtype=np.int64), n_samples)
    keys = pos * vocab + d.reshape(-1)
    uniq, first_at, counts = np.unique(keys, return_index=True, return_counts=True)
    u_pos, u_ids = np.divmod(uniq, vocab)
    u_lp = d_lp.reshape(-1)[first_at]
    order = np.lexsort((u_ids, -u_lp, u_pos))  # by position, then log-prob desc, then id
    return SparseTargets(
        ids=u_ids[order].astype(np.uint32),
        logprobs=u_lp[order].astype(np.float32),
        n_entries=np.bincount(u_pos, minlength=n_rows).astype(np.int32),
        tail_mass=torch.cat(tails).numpy(),
        counts=counts[order].astype(np.uint8),
    )
