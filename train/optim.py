"""The student's optimizer: AdamW from torch, or 8-bit AdamW from torchao (an optional extra).

In: the model and the learning-rate settings. Out: an optimizer with two parameter groups
(weight decay on matrices, none on norms and biases), betas (0.9, 0.95), eps 1e-8.

``adamw`` keeps two float32 moments, 8 B per parameter. ``adamw8bit`` is torchao's
``AdamW8bit`` (pytorch/ao: block-wise 8-bit moments, 256 values per scale): about 2 B per
parameter for tensors of 4,096 values or more (smaller ones keep float32 moments). Its
update is compiled with ``torch.compile`` (a C++ compiler on CPU, Triton on CUDA); the
first steps pay the compilation (~20 s on one CPU core). Its state works under DDP and
FSDP2 (torchao's quantized state is a tensor subclass that shards like a ``DTensor``).
"""

from __future__ import annotations

import torch
from torch import nn

from logitcache.core.errors import LogitcacheError

from .config import OPTIMIZERS

__all__ = [
    "OPTIMIZERS",
    "STATE_BYTES_PER_PARAM",
    "make_optimizer",
    "optimizer_state_classes",
    "set_lr",
]

# Optimizer state per parameter, nominal: two float32 moments, or two 8-bit moments plus a
# float32 scale per 256-value block (2 x (1 + 4/256) B). train.memory uses these.
STATE_BYTES_PER_PARAM = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256)}


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; decay on tensors of 2+ dimensions only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if name == "adamw8bit":
        return _torchao_adamw8bit()(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    raise LogitcacheError(f"--optimizer {name}: expected one of {', '.join(OPTIMIZERS)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; torchao keeps it a tensor (its compiled update reads
    it without recompiling) and refuses a float in its place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _torchao_adamw8bit():
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise LogitcacheError(
            f"--optimizer adamw8bit needs torchao (pip install 'logitcache[optim]' or "
            f"pip install torchao): {err}"
        ) from None
    return AdamW8bit


def optimizer_state_classes(name: str) -> list[type]:
    """Tensor subclasses an optimizer's saved state holds, allowed by ``weights_only`` loads."""
    if name != "adamw8bit":
        return []
    from torchao.optim.subclass_8bit import OptimState8bit

    return [OptimState8bit]
