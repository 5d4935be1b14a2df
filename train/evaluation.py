"""Held-out evaluation of a student against a cache: cross-entropy, and closeness to the teacher.

In: a causal LM and a ``CacheDataset`` (usually ``split="eval"``). Out: per-position means
over the trained positions (nats), each present only when the cache gives it:

- ``eval_ce``: cross-entropy on the true next tokens (every cache);
- ``eval_kl``: KL(teacher || student), from caches that store the teacher's log-probs. Top-k:
  exact over the k ids plus one rest bucket (a lower bound on the full-vocabulary KL); sampled
  with ``--sampled-logprobs``: an unbiased estimate of the full-vocabulary KL. Both are 0
  for the teacher itself, up to the log-prob codec's rounding;
- ``eval_ce_draws``: from sampled caches that store counts only (the default): the
  cross-entropy of the student on the teacher's N draws, an unbiased estimate of H(teacher)
  + KL(teacher || student). It falls as the student nears the teacher but not to 0: counts
  do not give the teacher's entropy, so no KL is reported for such a cache;
- ``eval_bits_per_byte``: the cross-entropy summed over the evaluated positions, in bits,
  divided by the bytes of the text they predict (``eval_bytes``; a special token such as
  EOS has none). It does not depend on the tokenizer, so students of different tokenizers
  compare on it (over the same held-out sequences, the bytes differ only by each row's
  first token, which nothing predicts). Present when the tokenizer of the labels is known:
  the student's with another tokenizer, else the one given or stored in the cache;
- ``eval_positions``: trained positions evaluated.

A student of another tokenizer is evaluated on its own retokenized rows: CE and bits per
byte over all its trained positions, KL only over those aligned with a teacher position;
``eval_aligned_share`` is the share of them aligned, ``eval_exact_mass_share`` and
``eval_mapped_mass_share`` the share of the teacher's stored mass there (top-k's, or the
draws') carried to student ids exactly and by any rule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .collator import DistillCollator
from .dataset import CacheDataset
from .distill_loss import DistillationLoss, final_hidden, is_chunkable
from .losses import (
    TeacherTargets,
    cross_entropy_sum,
    draws_ce_rows,
    sampled_kl_rows,
    teacher_kl_rows,
)
from .sharding import pad_sharded_forwards

__all__ = ["eval_summary", "evaluate"]

# What one cache's targets measure (see the module docstring).
_TOPK, _SAMPLED, _DRAWS = 0, 1, 2
# Sums of a batch, all-reduced as one float64 vector: CE, KL, KL rows, CE-draws, its rows,
# rows, bytes of the predicted tokens.
_SUMS = 7


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: CacheDataset,
    *,
    batch_size: int = 8,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    autocast=None,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Held-out ``eval_ce``, ``eval_kl`` or ``eval_ce_draws``, ``eval_bits_per_byte``,
    ``eval_positions`` (see above). ``tokenizer``: the one of the labels, for bits per byte
    (default: the student's with another tokenizer, else the cache's stored one).

    Under DDP rank r evaluates micro-batches r, r + world, ... and the sums are all-reduced,
    so every rank returns what one process evaluating all of them would (up to the order of
    a float64 sum) in 1/world of the time. Returns ``{}`` when there is nothing to evaluate.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    kinds, samples = (x.to(device) for x in _measures(dataset))  # [C] per cache of the list
    lengths = dataset.byte_lengths(tokenizer)
    byte_lengths = None if lengths is None else torch.from_numpy(lengths).to(device)  # [V]
    collate = DistillCollator()
    was_training = model.training
    model.eval()
    sums = torch.zeros(_SUMS, dtype=torch.float64)
    cross = getattr(dataset, "cross", None)  # a student of another tokenizer
    before = _cross_counts(cross)
    starts = range(0, len(dataset), batch_size)
    for i, start in enumerate(starts):
        if i % world_size != rank:
            continue
        items = [dataset[j] for j in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(items).items()}
        sums += _sums(model, batch, chunk_size, autocast, kinds, samples, byte_lengths)
    pad_sharded_forwards(model, len(starts), rank, world_size, device)
    model.train(was_training)
    sums = torch.cat([sums, _cross_counts(cross) - before])
    if world_size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    ce, kl, n_kl, ce_draws, n_draws, n, n_bytes = sums[:_SUMS].tolist()
    if n == 0:
        return {}
    out = {"eval_ce": ce / n}
    if n_kl:
        out["eval_kl"] = kl / n_kl
    if n_draws:
        out["eval_ce_draws"] = ce_draws / n_draws
    if byte_lengths is not None and n_bytes:
        out["eval_bits_per_byte"] = ce / math.log(2) / n_bytes
        out["eval_bytes"] = int(n_bytes)
    if cross is not None:
        out.update(_cross_shares(sums[_SUMS:]))
    return {**out, "eval_positions": int(n)}


_CROSS_COUNTS = ("trained", "aligned", "support_mass", "exact_mass", "mapped_mass")


def _cross_counts(cross: Any) -> Tensor:
    """[5] float64 running counts of a ``CrossTokenizer`` (zeros without one)."""
    if cross is None:
        return torch.zeros(len(_CROSS_COUNTS), dtype=torch.float64)
    values = [getattr(cross.stats, name) for name in _CROSS_COUNTS]
    return torch.tensor(values, dtype=torch.float64)


def _cross_shares(counts: Tensor) -> dict[str, float]:
    """A student of another tokenizer: the share of its evaluated positions aligned with a
    teacher position, and of the teacher's stored mass there mapped exactly / by any rule."""
    trained, aligned, support, exact, mapped = counts.tolist()
    return {
        "eval_aligned_share": aligned / max(trained, 1.0),
        "eval_exact_mass_share": exact / max(support, 1e-30),
        "eval_mapped_mass_share": mapped / max(support, 1e-30),
    }


def eval_summary(ev: Mapping[str, float]) -> str:
    """One line for people: 'held-out CE 3.1234 nats/token, KL to teacher 0.1234'."""
    parts = [f"held-out CE {ev['eval_ce']:.4f} nats/token"]
    if "eval_kl" in ev:
        parts.append(f"KL to teacher {ev['eval_kl']:.4f}")
    if "eval_ce_draws" in ev:
        parts.append(f"CE to teacher's draws {ev['eval_ce_draws']:.4f} (teacher entropy + KL)")
    if "eval_bits_per_byte" in ev:
        parts.append(f"{ev['eval_bits_per_byte']:.4f} bits/byte")
    return ", ".join(parts)


def _measures(dataset: CacheDataset) -> tuple[Tensor, Tensor]:
    """Per cache of ``dataset``: what its targets measure [C] int64, draws per position [C]."""
    kinds, samples = [], []
    for reader in dataset.readers():
        spec = reader.spec
        exact = dataset.target != "counts"  # records hold exp(stored log-probs), not counts / N
        if spec.mode == "topk":
            kinds.append(_TOPK)
        else:
            kinds.append(_SAMPLED if exact and spec.sampled_logprobs else _DRAWS)
        samples.append(spec.samples or 0)
    return torch.tensor(kinds), torch.tensor(samples, dtype=torch.float32)


def _sums(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    chunk_size: int,
    autocast,
    kinds: Tensor,
    samples: Tensor,
    byte_lengths: Tensor | None,
) -> Tensor:
    """[_SUMS] float64 sums of one batch, ``chunk_size`` rows at a time."""
    mask = DistillationLoss.trained(batch)  # [B, L-1]
    targets = DistillationLoss.targets(batch, mask)
    source = batch["source"][:, None].expand_as(mask)[mask]  # [N] cache of each row
    kind, n_samples = kinds[source], samples[source]  # [N], [N]
    aligned = DistillationLoss.aligned(batch, mask)  # [N] bool, or None: all
    if aligned is not None:  # positions without a teacher target measure CE only
        kind = torch.where(aligned, kind, torch.full_like(kind, -1))
    with autocast:
        if is_chunkable(model):
            hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
            rows, head = hidden[:, :-1][mask], model.get_output_embeddings()  # [N, H]
        else:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            rows, head = logits[:, :-1][mask], None  # [N, V]
        sums = torch.zeros(_SUMS, dtype=torch.float64)
        for s in range(0, rows.shape[0], chunk_size):
            chunk = slice(s, s + chunk_size)
            logits = (head(rows[chunk]) if head is not None else rows[chunk]).float()  # [n, V]
            t, k, ns = targets[chunk], kind[chunk], n_samples[chunk]
            sums[0] += cross_entropy_sum(logits, t.labels).item()
            for measure, at in ((_TOPK, 1), (_SAMPLED, 1), (_DRAWS, 3)):
                sel = k == measure
                if sel.any():
                    value = _measure_rows(measure, logits[sel], t[sel], ns[sel])
                    sums[at] += value.sum().item()
                    sums[at + 1] += int(sel.sum())
        sums[5] = rows.shape[0]
        if byte_lengths is not None:
            sums[6] = int(byte_lengths[targets.labels].sum())
    return sums


def _measure_rows(kind: int, logits: Tensor, t: TeacherTargets, samples: Tensor) -> Tensor:
    """[n] per-row value of one measure: KL (top-k or sampled) or cross-entropy to the draws."""
    if kind == _TOPK:
        return teacher_kl_rows(logits, t)
    if kind == _SAMPLED:
        return sampled_kl_rows(logits, t, samples)
    return draws_ce_rows(logits, t)
