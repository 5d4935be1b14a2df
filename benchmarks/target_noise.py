"""Stored entries against target noise for sampled caches and two candidates (a probe).

In: a local cache (for its token sequences) and the teacher that made it. Out: a JSON dict
(``python benchmarks/target_noise.py CACHE TEACHER [N_SEQ [STRIDE]]``, sequences 0,
STRIDE, 2 STRIDE, ...) of expected stored entries per position and expected target noise
``E ||p_hat - p||^2`` per position for

- plain sampled caches (``--samples N``): the distinct ids of N draws from the teacher's p,
  target counts/N;
- importance sampling (Anshumann et al. 2025): N draws from a tempered proposal
  ``q ∝ p^(1/tau)``, target ``p_hat(x) = count(x) p(x) / (N q(x))`` (a weight per id);
- a per-position draw budget: N_p draws at position p instead of a fixed N, chosen from
  the teacher's distribution (``N_p ∝ sqrt(1 - sum p^2)``, or the allocation that is
  optimal for the expected entries).

All numbers are exact expectations over the draws, computed from the teacher's full
distributions, so no cache of any candidate has to be written. The noise is what an
unbiased target costs against the full distribution: the forward-KL gradient in logit space
is ``s - p_hat``, so its variance summed over the vocabulary is ``E ||p_hat - p||^2``. With
counts ~ Multinomial(N, q) and ``w = p / q``:

- entries ``sum_j 1 - (1 - q_j)^N``;
- noise ``(sum_j p_j^2 / q_j - sum_j p_j^2) / N`` (q = p: ``(1 - sum p^2) / N``; by
  Cauchy-Schwarz ``sum p^2 / q >= 1``, equality only at q = p);
- the target's total mass ``sum p_hat`` is 1 only at q = p; its variance is
  ``(sum_j p_j^2 / q_j - 1) / N``.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch

__all__ = [
    "allocate_by_entries",
    "allocate_by_uncertainty",
    "expected_entries",
    "importance_noise",
    "probe",
    "sampled_noise",
    "tempered",
]

SAMPLED_MAX = 256  # fixed N and per-position N_p range over 1..256
TAUS = (0.5, 0.8, 0.9, 0.95, 1.0, 1.5, 2.0)
IS_DRAWS = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
FIXED = (8, 12, 16)
HEAD = 4096  # ids per position summed exactly for entries; the rest by a 2nd-order series

# Bytes model (format 2, sampled): B/token ~ INTERCEPT + PER_ENTRY * entries, fit to the
# measured N=8 (10.3 B/token at 5.4 entries) and N=16 (16.0 at 9.4) rows of
# docs/benchmarks.md. The other two are estimates, not measurements:
PER_ENTRY = 1.43
INTERCEPT = 2.58
WEIGHT_BYTES = 1.0  # a lossy log-weight per entry: hybrid's head log-probs cost 0.8-1.5 B
PER_POSITION_N_BYTES = 0.22  # keeping each position's last count (format 2 drops it)


def tempered(p: torch.Tensor, tau: float) -> torch.Tensor:
    """p [P, V] float64 -> q [P, V], q ∝ p^(1/tau) per row (computed in log space)."""
    return torch.softmax(torch.log(p.clamp_min(1e-300)) / tau, dim=-1)


def expected_entries(
    q: torch.Tensor, draws: torch.Tensor, head: int = HEAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [P, V] float64 draw distribution, draws [G] int -> ([P, G] expected distinct ids
    among N draws, [P, G] bound on the absolute error).

    The ``head`` most probable ids are summed exactly; each tail id adds
    ``1 - (1 - q)^N = N q - C(N, 2) q^2 + r`` with ``0 <= r <= C(N, 3) q^3``, so the tail is
    ``N s1 - C(N, 2) s2`` (power sums ``s_k``) within ``C(N, 3) s3``.
    """
    n = draws.to(torch.float64)
    top = torch.topk(q, min(head, q.shape[-1]), dim=-1).values  # [P, H]
    log_miss = torch.log1p(-top.clamp(max=1 - 1e-16))  # [P, H]
    exact = torch.stack([-torch.expm1(log_miss * k).sum(-1) for k in n.tolist()], 1)  # [P, G]
    s1, s2, s3 = ((q**k).sum(-1) - (top**k).sum(-1) for k in (1, 2, 3))  # [P] each
    c2, c3 = n * (n - 1) / 2, n * (n - 1) * (n - 2) / 6
    tail = n * s1.clamp_min(0)[:, None] - c2 * s2.clamp_min(0)[:, None]
    return exact + tail.clamp_min(0), c3 * s3.clamp_min(0)[:, None]


def sampled_noise(p: torch.Tensor) -> torch.Tensor:
    """p [P, V] -> [P] ``1 - sum p^2``: the noise of a sampled target times N."""
    return 1 - (p**2).sum(-1)


def importance_noise(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p, q [P, V] -> ([P] noise times N, [P] variance of ``sum p_hat`` times N)."""
    ratio = (p**2 / q.clamp_min(1e-300)).sum(-1)  # sum p^2/q >= 1
    return ratio - (p**2).sum(-1), ratio - 1


def allocate_by_uncertainty(v: torch.Tensor, scale: float, n_max: int) -> torch.Tensor:
    """v [P] ``1 - sum p^2`` -> [P] int64 N_p = round(scale sqrt(v)) in [1, n_max]: the
    minimiser of ``sum v / N_p`` for a fixed total of draws (rounded)."""
    return torch.round(scale * v.sqrt()).clamp(1, n_max).long()


def allocate_by_entries(v: torch.Tensor, entries: torch.Tensor, lam: float) -> torch.Tensor:
    """v [P], entries [P, n_max] (column i: N = i + 1) -> [P] int64 N_p minimising
    ``v / N_p + lam * entries(N_p)`` per position: the allocation with the least total
    noise among all with at most its total expected entries (a Lagrangian point)."""
    n = torch.arange(1, entries.shape[1] + 1, dtype=torch.float64)
    return torch.argmin(v[:, None] / n + lam * entries, dim=1) + 1


def _at(v: torch.Tensor, entries: torch.Tensor, n_p: torch.Tensor) -> tuple[float, float]:
    """Mean (entries, noise) over positions of the allocation n_p [P]."""
    e = torch.gather(entries, 1, (n_p - 1)[:, None])[:, 0]
    return float(e.mean()), float((v / n_p).mean())


def _loglog(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x on the piecewise log-log line through (xs, ys) (xs increasing); None outside."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1 and x1 > x0:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


class _Stats:
    """Per-position summaries of the teacher's distributions, gathered sequence by sequence."""

    def __init__(self) -> None:
        self.v: list[torch.Tensor] = []  # [P] 1 - sum p^2
        self.entries: list[torch.Tensor] = []  # [P, SAMPLED_MAX], N = 1..SAMPLED_MAX
        self.is_noise: dict[float, list[torch.Tensor]] = {t: [] for t in TAUS}  # [P]
        self.is_mass: dict[float, list[torch.Tensor]] = {t: [] for t in TAUS}  # [P]
        self.is_entries: dict[float, list[torch.Tensor]] = {t: [] for t in TAUS}  # [P, G]
        self.bound = 0.0  # largest error bound on expected entries, relative

    def add(self, p: torch.Tensor) -> None:
        """p [P, V] float64 teacher probabilities of one sequence."""
        self.v.append(sampled_noise(p))
        e, bound = expected_entries(p, torch.arange(1, SAMPLED_MAX + 1))
        self.entries.append(e)
        self.bound = max(self.bound, float((bound / e).max()))
        for tau in TAUS:
            q = tempered(p, tau)
            noise, mass = importance_noise(p, q)
            e, bound = expected_entries(q, torch.tensor(IS_DRAWS))
            self.is_noise[tau].append(noise)
            self.is_mass[tau].append(mass)
            self.is_entries[tau].append(e)
            self.bound = max(self.bound, float((bound / e).max()))


def _sampled_curve(v: torch.Tensor, entries: torch.Tensor) -> dict[str, list[float]]:
    ns = list(range(1, entries.shape[1] + 1))
    return {
        "N": ns,
        "entries": entries.mean(0).tolist(),
        "noise": [float(v.mean()) / n for n in ns],
    }


def _importance(stats: _Stats, curve: dict[str, list[float]]) -> dict[str, Any]:
    """Per tau: the (entries, noise) curve over IS_DRAWS; the noise ratio against sampled at
    sampled N=8/12/16's entries (weights free) and bytes (weights WEIGHT_BYTES each); and the
    bytes per weight at which IS would tie sampled (negative: it loses even with free weights)."""
    out: dict[str, Any] = {}
    for tau in TAUS:
        noise = torch.cat(stats.is_noise[tau]).mean()
        entries = torch.cat(stats.is_entries[tau]).mean(0).tolist()
        noises = [float(noise) / n for n in IS_DRAWS]
        row: dict[str, Any] = {
            "sum_p2_over_q": float(torch.cat(stats.is_mass[tau]).mean()) + 1,
            "mass_variance_times_N": float(torch.cat(stats.is_mass[tau]).mean()),
            "curve": {"N": list(IS_DRAWS), "entries": entries, "noise": noises},
        }
        for n in FIXED:
            e_s, noise_s = curve["entries"][n - 1], curve["noise"][n - 1]
            free = _loglog(entries, noises, e_s)
            paid = _loglog(entries, noises, e_s * PER_ENTRY / (PER_ENTRY + WEIGHT_BYTES))
            tie = _loglog(noises[::-1], entries[::-1], noise_s)  # IS entries at that noise
            row[f"vs N={n}"] = {
                "equal_entries_ratio": None if free is None else free / noise_s,
                "equal_bytes_ratio": None if paid is None else paid / noise_s,
                "break_even_weight_bytes": None if tie is None else PER_ENTRY * (e_s / tie - 1),
            }
        out[f"tau={tau}"] = row
    return out


def _budget(v: torch.Tensor, entries: torch.Tensor, curve: dict[str, list[float]]) -> dict:
    """Per-position N_p against fixed N: curves of both allocations, their noise ratio at
    fixed N=8/12/16's entries, bytes (N_p costs PER_POSITION_N_BYTES) and (sqrt) draws, and
    the draws of the allocation nearest to fixed N's entries."""
    n_max = entries.shape[1]
    allocations = {
        "sqrt": [allocate_by_uncertainty(v, s, n_max) for s in torch.logspace(0, 2.5, 80).tolist()],
        "optimal": [
            allocate_by_entries(v, entries, lam) for lam in torch.logspace(-6, 0, 120).tolist()
        ],
    }
    out: dict[str, Any] = {}
    for name, allocs in allocations.items():
        pts = sorted(
            {(*_at(v, entries, n_p), float(n_p.double().mean())): n_p for n_p in allocs}.items()
        )
        xs, ys, ds = ([pt[i] for pt, _ in pts] for i in range(3))
        out[name] = {"entries": xs, "noise": ys, "mean_draws": ds}
        for n in FIXED:
            e_s, noise_s = curve["entries"][n - 1], curve["noise"][n - 1]
            at_e = _loglog(xs, ys, e_s)
            at_b = _loglog(xs, ys, e_s - PER_POSITION_N_BYTES / PER_ENTRY)
            draws = sorted(zip(ds, ys))
            at_d = _loglog([d for d, _ in draws], [z for _, z in draws], float(n))
            near = min(pts, key=lambda pt: abs(pt[0][0] - e_s))[1].double()
            out[name][f"vs N={n}"] = {
                "equal_entries_ratio": None if at_e is None else at_e / noise_s,
                "equal_bytes_ratio": None if at_b is None else at_b / noise_s,
                "equal_draws_ratio": None if at_d is None else at_d / noise_s,
                "nearest": {
                    "mean_draws": float(near.mean()),
                    "share_N1": float((near == 1).double().mean()),
                    "p90_N": float(near.quantile(0.9)),
                    "max_N": float(near.max()),
                },
            }
    return out


def _teacher_probs(model, device, input_ids) -> torch.Tensor:
    """input_ids [T] uint -> [T-1, V] float64 next-token probabilities."""
    ids = torch.from_numpy(input_ids.astype("int64"))[None].to(device)
    with torch.inference_mode():
        return torch.softmax(model(input_ids=ids).logits[0, :-1].double(), -1).cpu()


def probe(cache: str, teacher: str, n_sequences: int = 8, stride: int = 1) -> dict[str, Any]:
    """Means over the positions of ``n_sequences`` sequences of ``cache``: sequences 0,
    stride, 2 stride, ..."""
    from logitcache.models import load_teacher
    from logitcache.storage import CacheReader

    model, _, device = load_teacher(teacher, device="cpu")
    stats = _Stats()
    for i, record in enumerate(CacheReader(cache)):
        if i == n_sequences * stride:
            break
        if i % stride == 0:
            stats.add(_teacher_probs(model, device, record.input_ids))
    v, entries = torch.cat(stats.v), torch.cat(stats.entries)  # [P], [P, SAMPLED_MAX]
    curve = _sampled_curve(v, entries)
    return {
        "cache": cache,
        "sequences": f"{n_sequences} (every {stride})",
        "positions": int(v.shape[0]),
        "entries_max_relative_error_bound": stats.bound,
        "bytes_model": {
            "intercept": INTERCEPT,
            "per_entry": PER_ENTRY,
            "weight_per_entry_estimate": WEIGHT_BYTES,
            "per_position_N_estimate": PER_POSITION_N_BYTES,
        },
        "sampled": {
            f"N={n}": {"entries": curve["entries"][n - 1], "noise": curve["noise"][n - 1]}
            for n in (1, 2, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
        },
        "importance": _importance(stats, curve),
        "budget": _budget(v, entries, curve),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 3, 4):
        sys.exit("usage: python benchmarks/target_noise.py CACHE TEACHER [N_SEQ [STRIDE]]")
    print(json.dumps(probe(args[0], args[1], *(int(a) for a in args[2:4])), indent=1))
