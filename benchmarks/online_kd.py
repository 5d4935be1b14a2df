"""Online full-vocabulary KD: the studies' upper reference, as a target source for ``train``.

In: a teacher (a directory, hub id or ``.gguf``, as ``precompute --teacher`` takes) and a
``TrainConfig``. Out: ``OnlineKD``, a ``DistillationLoss`` that ignores the cache's targets
and distills from the teacher held in memory: its forward under ``no_grad`` on every batch,
forward KL over the whole vocabulary (``losses.full_vocab_kd``, with the config's
temperature and alpha), chunked like the cached path. The cache still supplies the tokens:
``train(config, loss=OnlineKD.load(teacher, config))``. The product has no online teacher;
the studies measure how much of the CE-only -> online-KD gap each cache closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from logitcache.train import DistillationLoss
from logitcache.train.distill_loss import final_hidden
from logitcache.train.losses import full_vocab_kd

__all__ = ["OnlineKD"]


class OnlineKD(DistillationLoss):
    """``DistillationLoss`` of ``teacher`` (a model in memory, named ``source``)."""

    def __init__(self, teacher: nn.Module, source: str, **loss: Any) -> None:
        super().__init__(**loss)
        self.source = source
        # Kept out of the module's parameters (and of DDP, the optimizer and checkpoints).
        self._teacher = [teacher.eval().requires_grad_(False)]

    @classmethod
    def load(cls, teacher: str, config: Any) -> OnlineKD:
        """The teacher loaded on the CPU (moved to the batches' device at the first one) with
        the loss settings of ``config`` (a ``TrainConfig``)."""
        from logitcache.models import load_teacher

        model, _, _ = load_teacher(teacher, device="cpu")
        base = DistillationLoss.from_config(config)
        return cls(
            model,
            teacher,
            loss=base.loss,
            tail=base.tail,
            temperature=base.temperature,
            alpha=base.alpha,
            beta=base.beta,
            chunk_size=base.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"teacher={self.source}, temperature={self.temperature}, alpha={self.alpha}, "
            f"chunk_size={self.chunk_size}"
        )

    def forward(
        self, batch: Mapping[str, Tensor], *, model: nn.Module, reduction: str = "mean"
    ) -> Tensor:
        """Full-vocabulary KD of ``model`` against the teacher on ``batch``'s trained
        positions, summed (``reduction="sum"``, as ``DistillModule`` asks) or averaged."""
        teacher = self._teacher[0]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if next(teacher.parameters()).device != ids.device:
            teacher.to(ids.device)
        trained = self.trained(batch)  # [B, L-1]
        with torch.no_grad():
            th = final_hidden(teacher, ids, mask)[:, :-1][trained]  # [N, Ht]
        h = final_hidden(model, ids, mask)[:, :-1][trained]  # [N, H]
        labels = batch["labels"][:, 1:][trained]  # [N]
        head, t_head = model.get_output_embeddings(), teacher.get_output_embeddings()
        kw = {"temperature": self.temperature, "alpha": self.alpha}

        def chunk(hc, thc, lc):
            with torch.no_grad():
                t_logits = t_head(thc)  # [n, V]
            return full_vocab_kd(head(hc), t_logits, lc, **kw)

        total = h.sum() * 0.0
        for s in range(0, h.shape[0], self.chunk_size):
            sl = slice(s, s + self.chunk_size)
            total = total + checkpoint(chunk, h[sl], th[sl], labels[sl], use_reentrant=False)
        return total if reduction == "sum" else total / max(1, h.shape[0])
