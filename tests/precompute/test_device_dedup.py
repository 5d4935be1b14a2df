"""The per-position work moved onto the teacher's device gives the old host results exactly.

The reference implementations below are the host code this replaced (``np.unique`` over
position x vocab keys, then ``np.lexsort``; topk ties by ``np.lexsort``), kept here as the
plain slow way to check the device code against.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.precompute.sparse import Logits, distinct_draws, sampled_targets, topk_targets


def _host_dedup(d: np.ndarray, d_lp: np.ndarray, vocab: int):
    """The old host dedup of sorted draws [P, N] (ids, log-probs, counts, n_entries)."""
    n_rows, n_samples = d.shape
    pos = np.repeat(np.arange(n_rows, dtype=np.int64), n_samples)
    keys = pos * vocab + d.reshape(-1)
    uniq, first_at, counts = np.unique(keys, return_index=True, return_counts=True)
    u_pos, u_ids = np.divmod(uniq, vocab)
    u_lp = d_lp.reshape(-1)[first_at]
    order = np.lexsort((u_ids, -u_lp, u_pos))
    return (
        u_ids[order].astype(np.uint32),
        u_lp[order].astype(np.float32),
        counts[order].astype(np.uint8),
        np.bincount(u_pos, minlength=n_rows).astype(np.int32),
    )


def _device_dedup(d: torch.Tensor, d_lp: torch.Tensor):
    first = torch.ones_like(d, dtype=torch.bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    ids, lps, counts, n = distinct_draws(d, d_lp, first)
    return ids.numpy().view(np.uint32), lps.numpy(), counts.numpy(), n.numpy()


def _draws(rng, rows: int, n: int, vocab: int, levels: int):
    """Sorted draws [rows, N] and their log-probs, a function of the id (as gathered from a
    row of log-probs), with only ``levels`` distinct values: many equal log-probs."""
    d = np.sort(rng.integers(0, vocab, size=(rows, n)), axis=1)
    table = -rng.integers(0, levels, size=(rows, vocab)).astype(np.float32) / 8  # [rows, V]
    d_lp = np.take_along_axis(table, d, axis=1)
    return torch.from_numpy(d), torch.from_numpy(d_lp)


@pytest.mark.parametrize(
    ("rows", "n", "vocab", "levels"),
    [(40, 16, 50, 3), (40, 64, 20, 2), (7, 1, 5, 1), (30, 64, 1000, 1000), (25, 255, 3, 2)],
)
def test_device_dedup_equals_the_host_dedup(rows, n, vocab, levels):
    rng = np.random.default_rng(rows * n + vocab)
    d, d_lp = _draws(rng, rows, n, vocab, levels)
    d[0] = 0  # a row whose draws are all the same id
    d_lp[0] = d_lp[0, 0]
    d[-1] = vocab - 1
    d_lp[-1] = 0.0
    want = _host_dedup(d.numpy(), d_lp.numpy(), vocab)
    got = _device_dedup(d, d_lp)
    for name, w, g in zip(("ids", "logprobs", "counts", "n_entries"), want, got):
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert got[3][0] == 1 and got[2][0] == n


def test_sampled_targets_order_counts_and_ties():
    """Through ``sampled_targets``: a vocabulary of equal logits (every draw a tie)."""
    vocab, n = 6, 64
    logits = torch.zeros(9, vocab)
    logits[3, 2] = 50.0  # one position that always draws id 2
    gen = torch.Generator().manual_seed(0)
    got = sampled_targets(Logits(logits, 9, vocab), n, gen)
    start = 0
    for p, k in enumerate(got.n_entries):
        ids = got.ids[start : start + k]
        if p == 3:
            assert ids.tolist() == [2] and got.counts[start] == n
        else:
            assert (np.diff(ids.astype(np.int64)) > 0).all()  # equal log-probs: by id
        assert got.counts[start : start + k].sum() == n
        start += k
    assert start == got.ids.size


def test_topk_ties_are_ordered_by_id():
    """bfloat16-like logits with many equal values: by log-prob (desc), then id."""
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.integers(0, 4, size=(70, 40)).astype(np.float32))
    got = topk_targets(Logits(logits, 70, 40), 12)
    lp = got.logprobs.reshape(70, 12).astype(np.float64)
    ids = got.ids.reshape(70, 12).astype(np.int64)
    order = np.lexsort((ids, -lp), axis=-1)
    np.testing.assert_array_equal(order, np.broadcast_to(np.arange(12), order.shape))
    top = -np.sort(-logits.numpy(), axis=1)[:, :12]  # which tied ids make the cut is open
    np.testing.assert_array_equal(np.take_along_axis(logits.numpy(), ids, axis=1), top)
