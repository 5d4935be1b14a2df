"""From teacher logits to the sparse distributions a cache stores, on the teacher's device.

In: logits ``[T, V]`` of one sequence (any float dtype). Out (host numpy): per position the
stored ids, their log-probs, counts (sampled mode) and the uncovered mass. Log-softmax runs
in float32 over the full vocabulary, in row chunks so a 152k vocabulary never needs more
than ~0.5 GB of float32 at once; only the sparse result crosses to the host.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SparseTargets", "sample_generator", "sampled_targets", "topk_targets"]

_ROW_BUDGET = 1 << 27  # float32 elements per chunk: 512 MB


@dataclass
class SparseTargets:
    ids: np.ndarray  # [E] uint32, per position sorted by log-prob (desc), ties by id
    logprobs: np.ndarray  # [E] float32
    n_entries: np.ndarray  # [P] int32
    tail_mass: np.ndarray  # [P] float32, computed in float32 before any quantization
    counts: np.ndarray | None = None  # [E] uint8 (sampled)


def _chunk(vocab: int) -> int:
    """Rows per log-softmax chunk (depends on V only, so results never depend on batching)."""
    return max(1, _ROW_BUDGET // max(vocab, 1))


@torch.no_grad()
def topk_targets(logits: torch.Tensor, k: int) -> SparseTargets:
    """logits [P, V] -> top-k ids and log-probs (temperature 1) with the missing mass."""
    n_rows, vocab = logits.shape
    ids, lps, tails = [], [], []
    for start in range(0, n_rows, _chunk(vocab)):
        lp = torch.log_softmax(logits[start : start + _chunk(vocab)].float(), dim=-1)  # [n, V]
        top_lp, top_ids = torch.topk(lp, k, dim=-1, sorted=True)  # [n, k]
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
        n_entries=np.full(n_rows, k, dtype=np.int32),
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
def sampled_targets(logits: torch.Tensor, n_samples: int, generator: torch.Generator):
    """logits [P, V] -> distinct ids among N draws per position, with counts and log-probs."""
    n_rows, vocab = logits.shape
    draws, draw_lps, tails = [], [], []
    for start in range(0, n_rows, _chunk(vocab)):
        lp = torch.log_softmax(logits[start : start + _chunk(vocab)].float(), dim=-1)  # [n, V]
        d = torch.multinomial(lp.exp(), n_samples, replacement=True, generator=generator)
        d, _ = torch.sort(d, dim=-1)  # [n, N]
        d_lp = torch.gather(lp, 1, d)  # [n, N] float32
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
