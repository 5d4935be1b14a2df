"""Held-out evaluation of a student against a cache: cross-entropy and KL to the teacher.

In: a causal LM and a ``CacheDataset`` (usually ``split="eval"``). Out: per-position means
``eval_ce`` (cross-entropy on the true next tokens, nats) and ``eval_kl`` (KL(teacher ||
student) on the stored support plus the rest bucket), and ``eval_positions``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from .collator import DistillCollator
from .dataset import CacheDataset
from .distill_loss import DistillationLoss, final_hidden, is_chunkable
from .losses import cross_entropy_sum, teacher_kl
from .sharding import pad_sharded_forwards

__all__ = ["evaluate"]


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
) -> dict[str, float]:
    """Mean held-out cross-entropy and KL(teacher || student) per trained position.

    Under DDP rank r evaluates micro-batches r, r + world, ... and the sums are all-reduced,
    so every rank returns what one process evaluating all of them would (up to the order of
    a float64 sum) in 1/world of the time. Returns ``{}`` when there is nothing to evaluate.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    collate = DistillCollator()
    was_training = model.training
    model.eval()
    ce = kl = 0.0
    n = 0
    starts = range(0, len(dataset), batch_size)
    for i, start in enumerate(starts):
        if i % world_size != rank:
            continue
        items = [dataset[j] for j in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(items).items()}
        c, k, rows = _sums(model, batch, chunk_size, autocast)
        ce, kl, n = ce + c, kl + k, n + rows
    pad_sharded_forwards(model, len(starts), rank, world_size, device)
    model.train(was_training)
    if world_size > 1:
        sums = torch.tensor([ce, kl, float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        ce, kl, n = sums[0].item(), sums[1].item(), int(sums[2].item())
    if n == 0:
        return {}
    return {"eval_ce": ce / n, "eval_kl": kl / n, "eval_positions": n}


def _sums(
    model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int, autocast
) -> tuple[float, float, int]:
    """(summed CE, summed KL, trained positions) of one batch, ``chunk_size`` rows at a time."""
    mask = DistillationLoss.trained(batch)  # [B, L-1]
    targets = DistillationLoss.targets(batch, mask)
    with autocast:
        if is_chunkable(model):
            hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
            rows, head = hidden[:, :-1][mask], model.get_output_embeddings()  # [N, H]
        else:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits  # fmt: skip
            rows, head = logits[:, :-1][mask], None  # [N, V]
        ce = kl = 0.0
        for s in range(0, rows.shape[0], chunk_size):
            part = rows[s : s + chunk_size]
            logits = (head(part) if head is not None else part).float()  # [n, V]
            t = targets[s : s + chunk_size]
            ce += cross_entropy_sum(logits, t.labels).item()
            kl += teacher_kl(logits, t).item()
    return ce, kl, rows.shape[0]
