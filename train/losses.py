"""Distillation losses against a cached teacher support (top-k or sampled ids).

In: student logits ``[N, V]`` (or final hidden states plus the LM head, for the chunked
path) and ``TeacherTargets`` for the same N trained positions: per row, K support ids with
the teacher's temperature-1 probabilities, a validity mask, the teacher mass the support
does not cover (``tail``) and the true next token. Out: a scalar loss SUMMED over rows, so
chunks and micro-batches add up; callers divide by the number of trained rows.

A tail policy turns each row into C teacher categories:
- ``renorm``: the valid support, probabilities renormalized (biased "top-k KD": the student
  learns to put all its mass on the support; see Anshumann et al. 2025).
- ``bucket``: the valid support plus one "rest" category holding ``tail`` (the "ghost
  token"); the student's rest is 1 - (its mass on the support).
- ``label``: ``tail`` is added to the true label, either to its support entry or as one
  extra category.

Teacher category masses are normalized to sum to 1 (absorbing codec rounding), then raised
to 1/T and renormalized. Forward KL compares with the student's full-vocabulary
probabilities at the category ids; reverse KL, JSD and TVD renormalize the student over
the categories (``bucket`` needs no renormalization: support + rest already sum to 1).
Everything is computed in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .loss_options import LOSS_OPTIONS, LOSSES, TAIL_POLICIES, LossOptions

__all__ = [
    "LOSSES",
    "TAIL_POLICIES",
    "LossOptions",
    "TeacherTargets",
    "chunked_loss",
    "cross_entropy_sum",
    "distill_loss",
    "draws_ce_rows",
    "full_vocab_kd",
    "sampled_kl_rows",
    "teacher_kl",
    "teacher_kl_rows",
]

# Teacher probabilities are floored here inside log p for reverse KL: a category the teacher
# gives 0 (a sampled-out rest bucket, a zero-prob entry) costs the student 27.6 nats per unit
# of mass it puts there, instead of infinity.
_P_FLOOR = 1e-12
# Log-softmax values carry ~8 ulp of absolute error (float32: ~1e-6 around an lse of 10),
# so a student rest mass 1 - q(support) below 8 * eps(dtype) is noise. The rest's log-mass
# is evaluated at no less than that; the gradient passes straight through the floor, so a
# student with everything on the support is still pushed toward the tail (never NaN or 0).
_REST_FLOOR_EPS = 8
# Finite stand-in for log 0 on masked entries: exp() gives exactly 0 and, unlike -inf,
# logsumexp over a fully masked row has finite gradients.
_NEG = -1e30


@dataclass
class TeacherTargets:
    """The teacher's view of N trained positions, as stored in the cache."""

    ids: Tensor  # [N, K] int64  support ids (< V, unique per row); padding holds any valid id
    probs: Tensor  # [N, K] float  teacher probability at T=1; 0 on padding
    valid: Tensor  # [N, K] bool   False on padding entries
    tail: Tensor  # [N] float     mass outside the support (top-k: stored; sampled: 0)
    labels: Tensor  # [N] int64    true next token

    def __post_init__(self) -> None:
        if self.ids.dim() != 2:
            raise ValueError(f"TeacherTargets.ids must be [N, K], got {tuple(self.ids.shape)}")
        for name in ("probs", "valid"):
            if getattr(self, name).shape != self.ids.shape:
                raise ValueError(
                    f"TeacherTargets.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected ids' shape {tuple(self.ids.shape)}"
                )
        for name in ("tail", "labels"):
            if getattr(self, name).shape != self.ids.shape[:1]:
                raise ValueError(
                    f"TeacherTargets.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected ({self.ids.shape[0]},)"
                )
        for name in ("ids", "labels"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(
                    f"TeacherTargets.{name} must be int64, got {getattr(self, name).dtype}"
                )
        if self.valid.dtype != torch.bool:
            raise ValueError(f"TeacherTargets.valid must be bool, got {self.valid.dtype}")

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, sl: slice | Tensor) -> TeacherTargets:
        """Rows ``sl`` (a slice, or [N] bool) of every field (used for chunking)."""
        return TeacherTargets(
            self.ids[sl], self.probs[sl], self.valid[sl], self.tail[sl], self.labels[sl]
        )


def _distill_options(options: dict[str, Any]) -> LossOptions:
    """``distill_loss``'s keyword arguments, checked (``LossOptions``; ce is not a divergence)."""
    unknown = set(options) - set(LOSS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown distill_loss options {sorted(unknown)}")
    loss = options.get("loss", LossOptions.loss)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return LossOptions(**options)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _masked_lse(x: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the last dim of the entries where mask is True; [N, C] -> [N]."""
    return torch.logsumexp(x.masked_fill(~mask, _NEG), dim=-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0; 1 - exp(x) is floored at 8 eps, the gradient is not."""
    hi = math.log1p(-_REST_FLOOR_EPS * torch.finfo(x.dtype).eps)
    x = x - (x - hi).clamp(min=0).detach()  # value min(x, hi), d/dx = 1
    # Two branches keep full precision near 0 and far below it (Maechler 2012).
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _categories(
    targets: TeacherTargets, tail: str, temperature: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher categories for a tail policy.

    Returns ids [N, C] int64, p [N, C] (sums to 1 per row, temperature applied, 0 on
    invalid) and valid [N, C] bool. For ``bucket`` the last column is the rest category
    (its id is meaningless).
    """
    ids, valid = targets.ids, targets.valid
    probs = targets.probs.detach().to(dtype).masked_fill(~valid, 0.0)  # [N, K]
    rest = targets.tail.detach().to(dtype).clamp(min=0.0)  # [N]
    if tail == "bucket":
        ids = torch.cat([ids, torch.zeros_like(ids[:, :1])], dim=1)
        probs = torch.cat([probs, rest[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    elif tail == "label":
        labels = targets.labels
        match = valid & (ids == labels[:, None])  # [N, K], at most one True (ids are unique)
        in_support = match.any(dim=1)  # [N]
        probs = probs + rest[:, None] * match
        ids = torch.cat([ids, labels[:, None]], dim=1)
        probs = torch.cat([probs, torch.where(in_support, 0.0, rest)[:, None]], dim=1)
        valid = torch.cat([valid, ~in_support[:, None]], dim=1)
    # One log-space softmax both normalizes (T = 1) and applies p^(1/T); p = 0 stays 0.
    positive = probs > 0
    scores = torch.where(positive, probs.clamp(min=torch.finfo(dtype).tiny).log(), -math.inf)
    p = torch.softmax(scores / temperature, dim=-1)
    p = torch.where(positive, p, 0.0)  # a row with no teacher mass at all becomes all-zero
    return ids, p, valid


def _student_logq(logp: Tensor, ids: Tensor, valid: Tensor, bucket: bool) -> Tensor:
    """Student full-vocabulary log-probabilities logp [N, V] at the categories -> [N, C].

    Invalid entries hold _NEG. For ``bucket`` the last column is log(1 - q(support)).
    """
    if bucket:
        support = logp.gather(1, ids[:, :-1])  # [N, K]
        in_support = _masked_lse(support, valid[:, :-1])  # [N] log q(support)
        logq = torch.cat([support, _log1mexp(in_support)[:, None]], dim=1)
    else:
        logq = logp.gather(1, ids)
    return logq.masked_fill(~valid, _NEG)


def _divergence_rows(
    p: Tensor, logq: Tensor, valid: Tensor, loss: str, beta: float, renorm_student: bool
) -> Tensor:
    """Per-row divergence between teacher p [N, C] and student log q [N, C]; -> [N]."""
    if loss == "forward-kl":
        return (torch.xlogy(p, p) - p * logq).sum(dim=-1)
    if renorm_student:
        logq = (logq - _masked_lse(logq, valid)[:, None]).masked_fill(~valid, _NEG)
    q = logq.exp()  # [N, C], exactly 0 on invalid
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(dim=-1)
    if loss == "reverse-kl":
        return (q * (logq - p.clamp(min=_P_FLOOR).log())).sum(dim=-1)
    # jsd: M = beta p + (1 - beta) q, all in log space so no 0 * log 0 appears.
    logp = torch.where(p > 0, p.clamp(min=_P_FLOOR).log(), _NEG)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    kl_pm = (torch.xlogy(p, p) - p * logm).sum(dim=-1)
    kl_qm = (q * (logq - logm)).sum(dim=-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits [N, V] against labels [N] int64, summed over rows (float32)."""
    return F.cross_entropy(logits.to(_compute_dtype(logits)), labels, reduction="sum")


def distill_loss(logits: Tensor, targets: TeacherTargets, **options: Any) -> Tensor:
    """(1 - alpha) * T² * divergence(teacher, student at T) + alpha * CE(logits, labels).

    ``logits`` [N, V], any float dtype; one row per trained position of ``targets``. Returns
    a scalar summed over rows. ``loss`` is forward-kl (KL(p || q)), reverse-kl (KL(q || p),
    p floored at 1e-12), jsd (beta-weighted, mixture M = beta p + (1 - beta) q) or tvd
    (0.5 * sum |p - q|); ``tail`` is renorm, bucket or label (see the module docstring).
    ``options``: those of ``LossOptions`` (``loss``, ``tail``, ``temperature``, ``alpha``,
    ``beta``), its defaults where left out (forward-kl, bucket, T=1, alpha 0, beta 0.5).
    """
    o = _distill_options(options)
    loss, tail, temperature, alpha, beta = o.loss, o.tail, o.temperature, o.alpha, o.beta
    logits = logits.to(_compute_dtype(logits))  # [N, V]
    total = logits.new_zeros(())
    logp_t1 = None  # [N, V] log-softmax at T=1, shared with the CE term when T = 1
    if alpha < 1.0:
        ids, p, valid = _categories(targets, tail, temperature, logits.dtype)
        scaled = logits if temperature == 1.0 else logits / temperature
        logp = torch.log_softmax(scaled, dim=-1)  # [N, V]
        logq = _student_logq(logp, ids, valid, bucket=tail == "bucket")  # [N, C]
        rows = _divergence_rows(p, logq, valid, loss, beta, renorm_student=tail != "bucket")
        total = total + (1.0 - alpha) * temperature**2 * rows.sum()
        logp_t1 = logp if temperature == 1.0 else None
    if alpha > 0.0:
        if logp_t1 is None:
            logp_t1 = torch.log_softmax(logits, dim=-1)
        ce = -logp_t1.gather(1, targets.labels[:, None]).sum()
        total = total + alpha * ce
    return total


def full_vocab_kd(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> Tensor:
    """Online reference: (1 - alpha) T² KL(p_T || q_T) over the full vocabulary + alpha CE.

    ``logits``, ``teacher_logits`` [N, V] (the teacher held in memory, the upper bound every
    cache is compared with); summed over rows.
    """
    LossOptions(temperature=temperature, alpha=alpha)  # checked as distill_loss's are
    logits = logits.to(_compute_dtype(logits))  # [N, V]
    logq = torch.log_softmax(logits / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.to(logits.dtype) / temperature, dim=-1)
    kd = (logp.exp() * (logp - logq)).sum()
    total = (1.0 - alpha) * temperature**2 * kd
    if alpha > 0.0:
        total = total + alpha * cross_entropy_sum(logits, labels)
    return total


def teacher_kl(logits: Tensor, targets: TeacherTargets) -> Tensor:
    """KL(teacher || student) on the stored support plus the rest bucket, summed over rows.

    logits [N, V]. Equals ``distill_loss`` with forward-kl, bucket, T=1.
    """
    return distill_loss(logits, targets, loss="forward-kl", tail="bucket")


# The three held-out measures of ``logitcache.train.evaluation``, one value per row [N], so
# that a caller (or a test) can take means and standard errors. All read the student at T=1.


def teacher_kl_rows(logits: Tensor, targets: TeacherTargets) -> Tensor:
    """Per row, KL(teacher || student) over the stored ids plus one rest bucket -> [N].

    For a top-k cache (exact log-probs, stored tail mass) this is exact: the KL between the
    teacher and the student coarsened to k + 1 categories, 0 for the teacher itself and a
    lower bound on the full-vocabulary KL (the split of the tail mass is not stored). For
    counts / N targets it is NOT a KL to the teacher: it has a floor of about H(teacher) -
    H(counts / N) > 0 (0.74 nats for the demo teacher at N=64), so evaluation never uses it
    there.
    """
    logits = logits.to(_compute_dtype(logits))
    ids, p, valid = _categories(targets, "bucket", 1.0, logits.dtype)
    logq = _student_logq(torch.log_softmax(logits, dim=-1), ids, valid, bucket=True)
    return _divergence_rows(p, logq, valid, "forward-kl", 0.5, renorm_student=False)


def sampled_kl_rows(logits: Tensor, targets: TeacherTargets, samples: Tensor | int) -> Tensor:
    """Per row, an unbiased estimate of the full-vocabulary KL(teacher || student) -> [N].

    ``targets``: the distinct ids of ``samples`` draws from the teacher (``valid``) with
    their exact teacher probabilities p (a sampled cache's stored log-probs; not counts / N).
    Horvitz-Thompson: id v is among the distinct ids with probability pi_v = 1 - (1 - p_v)^N,
    so sum over drawn v of p_v log(p_v / q_v) / pi_v has expectation sum over ALL v of
    p_v log(p_v / q_v). An id drawn almost surely (p_v >> 1/N) counts once, as in the exact
    sum; a rare one (p_v << 1/N) is weighted ~1 / (N p_v), as in the plain Monte-Carlo mean
    of log(p / q) over the draws. Exactly 0 when the student is the teacher (q = p).
    """
    logits = logits.to(_compute_dtype(logits))
    logq = torch.log_softmax(logits, dim=-1).gather(1, targets.ids)  # [N, K]
    p = targets.probs.to(logits.dtype).clamp(0.0, 1.0)  # [N, K]
    n = torch.as_tensor(samples, dtype=logits.dtype, device=logits.device)
    n = n[:, None] if n.dim() == 1 else n
    seen = -torch.expm1(n * torch.log1p(-p))  # [N, K] pi, P(v among the distinct draws)
    use = targets.valid & (p > 0)
    term = (torch.xlogy(p, p) - p * logq) / torch.where(use, seen, 1.0)
    return torch.where(use, term, 0.0).sum(dim=-1)


def draws_ce_rows(logits: Tensor, targets: TeacherTargets) -> Tensor:
    """Per row, the cross-entropy of the student on the teacher's draws -> [N].

    ``targets.probs`` are counts / N over the distinct drawn ids: -sum c_v / N log q_v, an
    unbiased estimate of the cross-entropy H(teacher, student) = H(teacher) + KL(teacher ||
    student). Counts alone do not give the teacher's entropy, so no KL follows from them.
    """
    logits = logits.to(_compute_dtype(logits))
    logq = torch.log_softmax(logits, dim=-1).gather(1, targets.ids)  # [N, K]
    p = targets.probs.to(logits.dtype).masked_fill(~targets.valid, 0.0)
    return -(p * logq).sum(dim=-1)


def chunked_loss(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: TeacherTargets | None,
    *,
    labels: Tensor | None = None,
    chunk_size: int = 1024,
    **distill_kwargs: Any,
) -> Tensor:
    """``distill_loss(head(hidden), targets, **distill_kwargs)`` without ever holding [N, V].

    ``hidden`` [N, H] are the student's final hidden states at the trained rows and ``head``
    maps [n, H] -> [n, V] logits (the LM head). Rows go through ``head`` and the loss
    ``chunk_size`` at a time under activation checkpointing, so backward recomputes each
    chunk's logits instead of storing them: peak memory is one chunk's [chunk_size, V]
    logits (1024 x 152k float32 = 620 MB, against 20 GB for 32k rows at once).

    With ``targets=None`` the loss is ``cross_entropy_sum`` against ``labels`` [N] int64
    (CE-only students); otherwise ``labels`` must be None (they are ``targets.labels``).
    Returns a scalar summed over rows; value and gradients equal the unchunked loss.
    """
    if set(distill_kwargs) - set(LOSS_OPTIONS):
        _distill_options(distill_kwargs)  # refuses the unknown ones, naming them
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets is None:
        if labels is None:
            raise ValueError("chunked_loss needs targets, or labels for plain cross-entropy")
        if distill_kwargs:
            raise ValueError(
                f"distillation options {sorted(distill_kwargs)} need targets; got targets=None"
            )
        if labels.shape != hidden.shape[:1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match hidden rows {hidden.shape[0]}"
            )
    else:
        if labels is not None:
            raise ValueError("pass labels inside targets (targets.labels), not separately")
        if len(targets) != hidden.shape[0]:
            raise ValueError(f"targets have {len(targets)} rows, hidden has {hidden.shape[0]}")
        _distill_options(distill_kwargs)  # fail here, not inside a checkpointed chunk

    def chunk_loss(h: Tensor, start: int, stop: int) -> Tensor:
        logits = head(h)  # [n, V]
        if targets is None:
            return cross_entropy_sum(logits, labels[start:stop])
        return distill_loss(logits, targets[start:stop], **distill_kwargs)

    n = hidden.shape[0]
    if n == 0:
        return hidden.sum() * 0.0
    total: Tensor | None = None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        part = checkpoint(chunk_loss, hidden[start:stop], start, stop, use_reentrant=False)
        total = part if total is None else total + part
    assert total is not None
    return total
