"""Distilling from a cache with the Hugging Face ``Trainer``: ``DistillationTrainer``.

In: the usual ``Trainer`` arguments, with a ``CacheDataset`` as ``train_dataset`` (and
optionally ``eval_dataset``) and a ``DistillationLoss``. Out: a ``Trainer`` whose loss is
``logitcache train``'s (same module, same normalization over the trained positions of the
whole accumulated batch), whose batches come from ``DistillCollator`` and whose training
order is ``logitcache train``'s (``CacheSampler``; the Trainer shards it by process and
skips what a resumed run already trained on). Everything else (optimizers, schedulers,
DeepSpeed/FSDP through Accelerate, PEFT models, callbacks, ``save_pretrained``) is the
Trainer's own.

Why a subclass and not ``compute_loss_func``: the Trainer calls ``model(**inputs)`` before
that hook, which would pass the teacher keys to the model and build [B, L, V] logits; here
the loss runs the decoder and the LM head in chunks instead.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .collator import BATCH_KEYS, DistillCollator
from .dataset import CacheDataset
from .distill_loss import DistillationLoss
from .sampler import CacheSampler

__all__ = ["DistillationMixin", "DistillationTrainer"]


class DistillationMixin:
    """What makes a ``Trainer`` (or a subclass of it, such as TRL's ``SFTTrainer``) distil
    from a cache: put it first, ``class MyTrainer(DistillationMixin, SFTTrainer)``.

    ``distillation_loss``: the loss (default ``DistillationLoss()``: forward KL, bucket
    tail). ``block_shards``: the shuffle window of ``CacheSampler``. ``data_collator``
    defaults to ``DistillCollator()``. ``args.seed`` (or ``args.data_seed``) seeds the order.
    """

    def __init__(
        self,
        *args: Any,
        distillation_loss: DistillationLoss | None = None,
        block_shards: int = 4,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DistillCollator()
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss: drop compute_loss_func")
        super().__init__(*args, **kwargs)
        self.distillation_loss = distillation_loss or DistillationLoss()
        self.block_shards = block_shards
        # Have the Trainer count the trained positions of each accumulated batch (across
        # processes with average_tokens_across_devices) and pass them to compute_loss.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the teacher keys that the model's forward does not name.
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *BATCH_KEYS]

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, CacheDataset) and dataset.split != "eval":
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return CacheSampler(dataset, seed=seed, block_shards=self.block_shards)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Loss summed over the batch's trained positions, divided by those of the whole
        accumulated batch (``num_items_in_batch``); the plain mean when it is not given."""
        if num_items_in_batch is None:
            loss = self.distillation_loss(inputs, model=model, reduction="mean")
        else:
            total = self.distillation_loss(inputs, model=model, reduction="sum")
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # num_items_in_batch counts every process; DDP averages gradients over them.
                loss = loss * self.args.world_size
        return (loss, {"loss": loss.detach()}) if return_outputs else loss


class DistillationTrainer(DistillationMixin, Trainer):
    """The Hugging Face ``Trainer`` distilling from a cache (``DistillationMixin``)."""
