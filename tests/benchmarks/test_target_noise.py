"""The target-noise probe's closed forms against draws (tiny vocabularies, Monte Carlo)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from target_noise import (
    allocate_by_entries,
    expected_entries,
    importance_noise,
    sampled_noise,
    tempered,
)

from logitcache.precompute.sparse import Logits, sample_generator, sampled_targets
from logitcache.storage import SequenceRecord


def _probs(rows: int, vocab: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 1.5, -1)


def test_sampled_formulas_match_the_extraction_code():
    """Entries and noise of ``--samples N`` targets as precompute writes and train reads them."""
    p = _probs(3, 12)
    logits, n, seeds = torch.log(p).float(), 6, 1000
    entries = noise = 0.0
    for seed in range(seeds):
        rows = Logits(logits, n_rows=3, vocab=12)  # the logits themselves, no head
        t = sampled_targets(rows, n, sample_generator(seed, 0, torch.device("cpu")))
        zeros = np.zeros(4, dtype=np.uint32)
        r = SequenceRecord(
            index=0,
            input_ids=zeros,
            loss_mask=np.ones(4, dtype=bool),
            doc_starts=zeros[:1],
            ids=t.ids,
            n_entries=t.n_entries,
            tail_mass=t.tail_mass,
            logprobs=None,
            counts=t.counts,
        )
        dense = np.zeros(p.shape)
        rows = np.repeat(np.arange(3), r.n_entries)
        np.add.at(dense, (rows, r.ids.astype(np.int64)), r.target_probs())
        entries += r.n_entries.mean() / seeds
        noise += ((dense - p.numpy()) ** 2).sum(1).mean() / seeds
    want_entries, _ = expected_entries(p, torch.tensor([n]))
    assert entries == pytest.approx(float(want_entries.mean()), rel=0.02)
    assert noise == pytest.approx(float(sampled_noise(p).mean()) / n, rel=0.08)


@pytest.mark.parametrize("tau", [0.5, 0.8, 1.5, 2.0])
def test_importance_formulas_match_draws(tau):
    """N draws from q ∝ p^(1/tau), target count p / (N q): entries, noise, mass variance.

    Here ``- 1`` for ``- sum p^2`` would be off by >= 15 % and plain sampling's
    ``1 - sum p^2`` by >= 5 % (45-85 % at tau = 0.5); the Monte Carlo error over 100,000
    repeats is below 1 % (3.5 % at tau = 0.5, whose weights are heavy-tailed).
    """
    p = _probs(2, 10, seed=5)
    q = tempered(p, tau)
    n, reps = 5, 100_000
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(q.repeat_interleave(reps, 0), n, replacement=True, generator=gen)
    counts = torch.zeros(2 * reps, 10, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64)
    )  # [2 * reps, V]
    p_rep, q_rep = p.repeat_interleave(reps, 0), q.repeat_interleave(reps, 0)
    p_hat = counts * p_rep / (n * q_rep)
    mean = p_hat.view(2, reps, 10).mean(1)  # [2, V]
    torch.testing.assert_close(mean, p, rtol=0.05, atol=2e-3)  # unbiased
    noise = ((p_hat - p_rep) ** 2).sum(1).view(2, reps).mean(1)  # [2]
    mass_var = (p_hat.sum(1).view(2, reps) - 1).pow(2).mean(1)
    distinct = (counts > 0).sum(1).double().view(2, reps).mean(1)
    want_noise, want_mass = importance_noise(p, q)
    rtol = 0.06 if tau == 0.5 else 0.03
    want_entries, _ = expected_entries(q, torch.tensor([n]))
    torch.testing.assert_close(noise, want_noise / n, rtol=rtol, atol=0)
    torch.testing.assert_close(mass_var, want_mass / n, rtol=rtol, atol=0)
    torch.testing.assert_close(distinct, want_entries[:, 0], rtol=0.005, atol=0)
    assert (want_noise > sampled_noise(p)).all()  # Cauchy-Schwarz: q = p is the least noisy


def test_expected_entries_tail_series_is_within_its_bound():
    """The exact head plus the 2nd-order tail series against the full exact sum."""
    p = _probs(4, 3000, seed=1)
    draws = torch.tensor([1, 8, 64, 512])
    exact, _ = expected_entries(p, draws, head=3000)
    approx, bound = expected_entries(p, draws, head=200)
    assert ((approx - exact).abs() <= bound + 1e-9).all()
    assert (approx - exact).abs().max() > 0  # the series was used
    want = (1 - (1 - p[:, :, None]) ** draws.double()).sum(1)  # [P, G] the slow obvious way
    torch.testing.assert_close(exact, want, rtol=1e-10, atol=1e-10)


def test_allocation_by_entries_is_optimal_among_all_allocations():
    """No integer allocation (N_p in 1..6, three positions) has fewer entries and less noise
    than a Lagrangian point."""
    p = _probs(3, 40, seed=3)
    v = sampled_noise(p)
    entries, _ = expected_entries(p, torch.arange(1, 7))  # [3, 6]
    every = [
        (
            sum(float(entries[i, n - 1]) for i, n in enumerate(alloc)),
            sum(float(v[i]) / n for i, n in enumerate(alloc)),
        )
        for alloc in itertools.product(range(1, 7), repeat=3)
    ]
    seen = set()
    for lam in torch.logspace(-4, 1, 60).tolist():
        n_p = allocate_by_entries(v, entries, lam)
        seen.add(tuple(n_p.tolist()))
        e = float(torch.gather(entries, 1, (n_p - 1)[:, None]).sum())
        noise = float((v / n_p).sum())
        assert not any(o_e <= e + 1e-12 and o_n < noise - 1e-12 for o_e, o_n in every)
    assert len(seen) > 5  # the sweep moved through several allocations
