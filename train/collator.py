"""Padding records into one batch: a plain dict of tensors that any trainer moves to a device.

In: a list of records (``CacheDataset`` items: ``input_ids`` [T], ``labels`` [T], teacher
targets [T, K] ...) of different lengths T and support sizes K. Out: one dict with the same
keys, right-padded to the longest sequence L and the widest support K, plus
``attention_mask`` [B, L] int64. Padding is never trained: ``labels`` -100,
``teacher_valid`` False. Records of a student with another tokenizer also carry
``teacher_aligned``, padded with False.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BATCH_KEYS", "IGNORE_INDEX", "DistillCollator"]

IGNORE_INDEX = -100
"""``labels`` of positions that are not trained (the value torch's cross-entropy skips)."""

BATCH_KEYS = (
    "input_ids",  # [B, L] int64
    "attention_mask",  # [B, L] int64
    "labels",  # [B, L] int64, -100 where not trained
    "teacher_ids",  # [B, L, K] int64
    "teacher_probs",  # [B, L, K] float32
    "teacher_valid",  # [B, L, K] bool
    "teacher_tail",  # [B, L] float32
    "index",  # [B] int64 global sequence index (-1: a padding row)
    "source",  # [B] int64 which cache of the dataset's list
    "teacher_aligned",  # [B, L] bool, only for a student of another tokenizer
)


@dataclass
class DistillCollator:
    """``collate_fn`` for ``CacheDataset`` records; ``pad_token_id`` fills ``input_ids``.

    ``pad_to_multiple_of`` rounds L up (tensor cores like multiples of 8). An empty list
    gives one all-padding row (``index`` -1): what a rank with no sequence left in the
    short last step of an epoch trains on, so that every rank still runs a step.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            return self._empty()
        width = max(int(e["input_ids"].shape[0]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        k = max(int(e["teacher_ids"].shape[1]) for e in examples)
        b = len(examples)
        batch = {
            "input_ids": torch.full((b, width), self.pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros((b, width), dtype=torch.int64),
            "labels": torch.full((b, width), IGNORE_INDEX, dtype=torch.int64),
            "teacher_ids": torch.zeros((b, width, k), dtype=torch.int64),
            "teacher_probs": torch.zeros((b, width, k), dtype=torch.float32),
            "teacher_valid": torch.zeros((b, width, k), dtype=torch.bool),
            "teacher_tail": torch.zeros((b, width), dtype=torch.float32),
        }
        for i, e in enumerate(examples):
            n, kk = e["input_ids"].shape[0], e["teacher_ids"].shape[1]
            batch["input_ids"][i, :n] = e["input_ids"]
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = e["labels"]
            for key in ("teacher_ids", "teacher_probs", "teacher_valid"):
                batch[key][i, :n, :kk] = e[key]
            batch["teacher_tail"][i, :n] = e["teacher_tail"]
        if "teacher_aligned" in examples[0]:  # a student of another tokenizer
            batch["teacher_aligned"] = torch.zeros((b, width), dtype=torch.bool)
            for i, e in enumerate(examples):
                batch["teacher_aligned"][i, : e["input_ids"].shape[0]] = e["teacher_aligned"]
        for key in ("index", "source"):
            batch[key] = torch.stack([torch.as_tensor(e.get(key, -1)) for e in examples])
        return batch

    def _empty(self) -> dict[str, torch.Tensor]:
        width = 2
        return {
            "input_ids": torch.full((1, width), self.pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros((1, width), dtype=torch.int64),
            "labels": torch.full((1, width), IGNORE_INDEX, dtype=torch.int64),
            "teacher_ids": torch.zeros((1, width, 1), dtype=torch.int64),
            "teacher_probs": torch.zeros((1, width, 1), dtype=torch.float32),
            "teacher_valid": torch.zeros((1, width, 1), dtype=torch.bool),
            "teacher_tail": torch.zeros((1, width), dtype=torch.float32),
            "index": torch.full((1,), -1, dtype=torch.int64),
            "source": torch.full((1,), -1, dtype=torch.int64),
        }
