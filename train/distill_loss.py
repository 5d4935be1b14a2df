"""The distillation loss of a batch, as one ``nn.Module`` for any training loop.

In: a ``DistillCollator`` batch (``labels`` [B, L], teacher targets [B, L, K]) and the
student's output in one of three forms: the model itself, its final hidden states [B, L, H]
with its LM head, or its logits [B, L, V]. Out: a scalar, the mean over trained positions
(``reduction="mean"``) or their sum (``"sum"``, for callers that normalize across
micro-batches and ranks themselves). A batch of a student with another tokenizer
(``teacher_aligned``) trains its positions without a teacher target on cross-entropy.

The hidden-state forms never build [B, L, V]: the trained rows go through the LM head and
the loss ``chunk_size`` rows at a time under activation checkpointing (``chunked_loss``),
so the loss costs one chunk's [chunk_size, V] logits. ``logitcache train`` computes its
loss with this module; the losses themselves are in ``logitcache.train.losses``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .losses import (
    LOSSES,
    TAIL_POLICIES,
    TeacherTargets,
    check_loss_args,
    chunked_loss,
    cross_entropy_sum,
    distill_loss,
)

__all__ = ["DistillationLoss", "final_hidden", "is_chunkable"]

# Models whose logits are not simply lm_head(hidden): the chunked path would skip their
# final transform, so they run through the model's own forward instead.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def is_chunkable(model: nn.Module) -> bool:
    """Whether the model's logits are its LM head applied to its final hidden states."""
    config = getattr(_unwrap(model), "config", None)
    return all(getattr(config, a, None) in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP-style wrapper (one with ``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(
        model, "get_decoder"
    ):
        model = model.module
    return model


def final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L, H] the final (normalized) hidden states of a Hugging Face causal LM.

    A model wrapped for data parallelism (DDP, Accelerate) is run through its own forward,
    which the wrapper needs to synchronize gradients; logits are then computed for the last
    position only (``logits_to_keep=1``) and the decoder's output is taken by a hook.
    """
    inner = _unwrap(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.base_model
    if inner is model:
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    seen: list[Tensor] = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    finally:
        hook.remove()
    return seen[-1]


class DistillationLoss(nn.Module):
    """``logitcache train``'s loss: ``loss`` is forward-kl, reverse-kl, jsd, tvd or ce
    (cross-entropy on the true tokens only); ``tail`` renorm, bucket or label;
    ``temperature``, ``alpha`` (weight of cross-entropy) and ``beta`` (JSD mixture weight)
    as in ``logitcache.train.losses.distill_loss``. ``chunk_size``: rows per LM-head chunk.

    Call it with a batch and exactly one of:

    - ``model=`` a Hugging Face causal LM (wrapped or not, PEFT too);
    - ``hidden=`` [B, L, H] final hidden states and ``head=`` the LM head (a module, or its
      weight [V, H] as a tensor; ``bias`` [V] optional);
    - ``logits=`` [B, L, V].
    """

    def __init__(
        self,
        loss: str = "forward-kl",
        *,
        tail: str = "bucket",
        temperature: float = 1.0,
        alpha: float = 0.0,
        beta: float = 0.5,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        if loss not in (*LOSSES, "ce"):  # ce (cross-entropy only) is this module's own
            raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}, ce")
        if loss != "ce":
            check_loss_args(loss, tail, temperature, alpha, beta)
        elif tail not in TAIL_POLICIES:
            raise ValueError(f"unknown tail policy {tail!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.loss, self.tail, self.temperature = loss, tail, temperature
        self.alpha, self.beta, self.chunk_size = alpha, beta, chunk_size

    @classmethod
    def from_config(cls, config: Any) -> DistillationLoss:
        """The loss of a ``TrainConfig`` (``loss``, ``tail``, ``temperature``, ...)."""
        return cls(
            config.loss,
            tail=config.tail,
            temperature=config.temperature,
            alpha=config.alpha,
            beta=config.beta,
            chunk_size=config.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss}, tail={self.tail}, temperature={self.temperature}, "
            f"alpha={self.alpha}, chunk_size={self.chunk_size}"
        )

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``distill_loss`` (empty for ce)."""
        if self.loss == "ce":
            return {}
        return {
            "loss": self.loss,
            "tail": self.tail,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "beta": self.beta,
        }

    @staticmethod
    def trained(batch: Mapping[str, Tensor]) -> Tensor:
        """[B, L-1] bool: positions p whose next token p + 1 is trained."""
        return batch["labels"][:, 1:] != -100

    @staticmethod
    def targets(batch: Mapping[str, Tensor], mask: Tensor | None = None) -> TeacherTargets:
        """The teacher targets of the trained positions, N rows in (b, p) order."""
        mask = DistillationLoss.trained(batch) if mask is None else mask
        return TeacherTargets(
            ids=batch["teacher_ids"][:, 1:][mask],  # [N, K]
            probs=batch["teacher_probs"][:, 1:][mask],
            valid=batch["teacher_valid"][:, 1:][mask],
            tail=batch["teacher_tail"][:, 1:][mask],  # [N]
            labels=batch["labels"][:, 1:][mask],
        )

    def forward(
        self,
        batch: Mapping[str, Tensor],
        *,
        model: nn.Module | None = None,
        hidden: Tensor | None = None,
        head: nn.Module | Tensor | None = None,
        bias: Tensor | None = None,
        logits: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction {reduction!r}: expected mean or sum")
        if sum(x is not None for x in (model, hidden, logits)) != 1:
            raise ValueError("give exactly one of model=, hidden= (with head=) or logits=")
        mask = self.trained(batch)  # [B, L-1]
        if model is not None:
            try:
                if is_chunkable(model):
                    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
                    head = _unwrap(model).get_output_embeddings()
                else:
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
            except IndexError:  # torch's "index out of range in self", from the embedding
                raise ValueError(_too_few_rows(batch, model)) from None
        if hidden is not None:
            if head is None:
                raise ValueError("hidden= needs head= (the LM head module or its weight)")
            rows = hidden[:, :-1][mask]  # [N, H]
            total = self._chunked(rows, _as_head(head, bias), batch, mask)
        else:
            rows = logits[:, :-1][mask]  # [N, V]
            total = self._on_logits(rows, batch, mask)
        if rows.shape[0] == 0 and isinstance(model if model is not None else head, nn.Module):
            # Nothing trained (a rank's empty last micro-batch): DDP still waits for a
            # gradient of every parameter, the LM head's included, so touch them all.
            owner = model if model is not None else head
            total = total + sum(p.sum() for p in owner.parameters() if p.requires_grad) * 0.0
        if reduction == "sum":
            return total
        return total / mask.sum().clamp(min=1)

    def _chunked(self, rows: Tensor, head: Callable, batch, mask: Tensor) -> Tensor:
        targets = self.targets(batch, mask)
        if self.loss == "ce":
            return chunked_loss(rows, head, None, labels=targets.labels, chunk_size=self.chunk_size)
        aligned = self.aligned(batch, mask)
        if aligned is None:
            return chunked_loss(rows, head, targets, chunk_size=self.chunk_size, **self.options)
        kd = chunked_loss(
            rows[aligned], head, targets[aligned], chunk_size=self.chunk_size, **self.options
        )
        ce = chunked_loss(
            rows[~aligned], head, None, labels=targets.labels[~aligned], chunk_size=self.chunk_size
        )
        return kd + ce

    def _on_logits(self, rows: Tensor, batch, mask: Tensor) -> Tensor:
        targets = self.targets(batch, mask)
        if rows.shape[0] == 0:
            return rows.sum() * 0.0
        if self.loss == "ce":
            return cross_entropy_sum(rows, targets.labels)
        aligned = self.aligned(batch, mask)
        if aligned is None:
            return distill_loss(rows, targets, **self.options)
        total = cross_entropy_sum(rows[~aligned], targets.labels[~aligned])
        if aligned.any():
            total = total + distill_loss(rows[aligned], targets[aligned], **self.options)
        return total

    @staticmethod
    def aligned(batch: Mapping[str, Tensor], mask: Tensor) -> Tensor | None:
        """[N] bool: trained rows with a teacher target; None when every row has one (a
        student of the cache's tokenizer). A student of another tokenizer trains the rest on
        cross-entropy only."""
        if "teacher_aligned" not in batch:
            return None
        return batch["teacher_aligned"][:, 1:][mask]


def _too_few_rows(batch: Mapping[str, Tensor], model: nn.Module) -> str:
    """What to say when a batch's token ids are beyond the student's embedding rows."""
    rows = _unwrap(model).get_input_embeddings().weight.shape[0]
    largest = int(batch["input_ids"].max())
    return (
        f"the batch holds token id {largest} but the student has {rows} vocabulary rows: it "
        "needs at least the cache's tokenizer's rows (teacher ids beyond them are handled by "
        "CacheDataset(vocab_limit=rows); a larger student vocabulary by --extended-vocab)"
    )


def _as_head(head: nn.Module | Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    if isinstance(head, Tensor):
        return lambda h: F.linear(h, head, bias)  # [n, H] -> [n, V]
    return head
