"""From teacher logits to the sparse distributions a cache stores, on the teacher's device.

In: ``Logits`` of one sequence: its ``[T, D]`` last hidden states and the teacher's output
head, or its ``[T, V]`` logits themselves (any float dtype). Out (host numpy): per position
the stored ids, their log-probs, counts (sampled mode) and the uncovered mass.

The logits exist a chunk of positions at a time: each chunk's rows go through the head and a
float32 log-softmax over the full vocabulary, and only the sparse result crosses to the host,
so memory does not grow with the batch (SmolLM2-135M, V=49,152, on CPU: 341-row chunks,
~3 x 64 MB alive at once). A per-position quantity of the full distribution (an entropy, say)
belongs in the same chunk loops. Every per-position step (the draws, their sort, dedup and
counts, the canonical order of equal log-probs) runs on the device too (``DeviceTargets``):
the host only copies the result, so it keeps up with a GPU's forward (docs/benchmarks.md,
"The host side of the teacher pass").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "DeviceTargets",
    "Logits",
    "SparseTargets",
    "distinct_draws",
    "sample_generator",
    "sampled_on_device",
    "sampled_targets",
    "topk_on_device",
    "topk_targets",
]

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


@dataclass
class DeviceTargets:
    """A sequence's ``SparseTargets`` as tensors on the teacher's device, a list entry per
    chunk of positions: every per-position step (sort, dedup, counts, canonical order) is
    done there; ``to_host`` only copies and concatenates."""

    ids: list[torch.Tensor] = field(default_factory=list)  # [E_c] int32
    logprobs: list[torch.Tensor] = field(default_factory=list)  # [E_c] float32
    n_entries: list[torch.Tensor] = field(default_factory=list)  # [n_c] int32
    tail_mass: list[torch.Tensor] = field(default_factory=list)  # [n_c] float32
    counts: list[torch.Tensor] | None = None  # [E_c] uint8 (sampled)

    def to_host(self) -> SparseTargets:
        """One concatenation on the device and one copy to the host per field (each copy
        waits for the device: five waits per sequence, not five per chunk)."""

        def host(parts: list[torch.Tensor]) -> np.ndarray:
            return torch.cat(parts).cpu().numpy()

        return SparseTargets(
            ids=host(self.ids).view(np.uint32),  # ids < V < 2**31: the same bits
            logprobs=host(self.logprobs),
            n_entries=host(self.n_entries),
            tail_mass=host(self.tail_mass),
            counts=None if self.counts is None else host(self.counts),
        )


def topk_targets(logits: Logits, k: int) -> SparseTargets:
    """Top-k ids and log-probs (temperature 1) of each position, with the missing mass."""
    return topk_on_device(logits, k).to_host()


@torch.no_grad()
def topk_on_device(logits: Logits, k: int) -> DeviceTargets:
    """``topk_targets`` before the copy to the host."""
    out = DeviceTargets()
    for lp in logits.log_probs():  # [n, V] float32
        top_lp, top_ids = torch.topk(lp, k, dim=-1, sorted=True)  # [n, k]
        del lp
        tail = (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)  # [n] float32
        top_ids, top_lp = _sort_ties_by_id(top_ids, top_lp)
        out.ids.append(top_ids.reshape(-1).to(torch.int32))
        out.logprobs.append(top_lp.reshape(-1))
        out.n_entries.append(torch.full_like(tail, k, dtype=torch.int32))
        out.tail_mass.append(tail)
    return out


def _sort_ties_by_id(ids: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] rows by log-prob (desc), equal log-probs by id: canonical where torch.topk
    leaves the order of ties open (common with bfloat16 teachers). Two [n, k] sorts."""
    ids, by_id = torch.sort(ids, dim=-1)  # ids ascending
    lp = torch.gather(lp, 1, by_id)
    _, order = torch.sort(lp, dim=-1, descending=True, stable=True)  # ties keep id order
    return torch.gather(ids, 1, order), torch.gather(lp, 1, order)


def sample_generator(seed: int, sequence_index: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, sequence index) alone: draws never depend on batching."""
    digest = hashlib.sha256(f"logitcache-sample:{seed}:{sequence_index}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return gen


def sampled_targets(logits: Logits, n_samples: int, generator: torch.Generator) -> SparseTargets:
    """Distinct ids among N draws per position, with counts and log-probs."""
    return sampled_on_device(logits, n_samples, generator).to_host()


@torch.no_grad()
def sampled_on_device(logits: Logits, n_samples: int, generator: torch.Generator) -> DeviceTargets:
    """``sampled_targets`` before the copy to the host."""
    out = DeviceTargets(counts=[])
    for lp in logits.log_probs():  # [n, V] float32
        d = torch.multinomial(lp.exp(), n_samples, replacement=True, generator=generator)
        d, _ = torch.sort(d, dim=-1)  # [n, N]
        d_lp = torch.gather(lp, 1, d)  # [n, N] float32
        del lp
        first = torch.ones_like(d, dtype=torch.bool)
        first[:, 1:] = d[:, 1:] != d[:, :-1]
        covered = torch.where(first, d_lp.exp(), torch.zeros_like(d_lp)).sum(-1)
        out.tail_mass.append((1.0 - covered).clamp_min(0.0))
        ids, lps, counts, n_entries = distinct_draws(d, d_lp, first)
        out.ids.append(ids)
        out.logprobs.append(lps)
        out.counts.append(counts)
        out.n_entries.append(n_entries)
    return out


def distinct_draws(
    draws: torch.Tensor, draw_lp: torch.Tensor, first: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ids of each row of sorted draws, on the draws' device.

    In: ``draws`` [n, N] ids sorted within each row, ``draw_lp`` [n, N] their log-probs,
    ``first`` [n, N] bool, True where an id differs from the one before it. Out: the ids
    [E] int32, log-probs [E] float32 and counts [E] uint8 of each row's distinct ids, rows
    after one another, within a row by log-prob (desc), equal log-probs by id; and the
    distinct ids per row [n] int32. Each run of equal draws is one id: its count is the
    run's length (a scatter-add over run numbers), and a stable sort of the runs' first
    draws by log-prob, repeats sent last, keeps equal log-probs in id order.
    """
    run = first.cumsum(dim=1) - 1  # [n, N] run number of each draw within its row
    run_counts = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))  # [n, N]
    repeat = torch.tensor(float("inf"), dtype=draw_lp.dtype, device=draw_lp.device)
    key = torch.where(first, -draw_lp, repeat)  # drawn ids have log-prob > -inf
    _, order = torch.sort(key, dim=1, stable=True)  # [n, N]
    n_entries = first.sum(dim=1, dtype=torch.int32)  # [n]
    kept = torch.arange(draws.shape[1], device=draws.device) < n_entries[:, None]  # [n, N]
    at = kept.reshape(-1).nonzero().squeeze(1)  # [E] flat indices: one device sync
    ids = torch.gather(draws, 1, order).reshape(-1)[at].to(torch.int32)
    lps = torch.gather(draw_lp, 1, order).reshape(-1)[at]
    counts = torch.gather(run_counts, 1, torch.gather(run, 1, order)).reshape(-1)[at]
    return ids, lps, counts.to(torch.uint8), n_entries
