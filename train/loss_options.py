"""The distillation loss's settings, declared once (no torch: the CLI builds its flags from it).

In: a loss name, a tail policy, a temperature, alpha and beta. Out: ``LossOptions``, checked
on construction. Everything that takes these settings takes them from here: ``TrainConfig``
includes its fields (the flags ``--loss``, ``--tail``, ``--temperature``, ``--alpha``,
``--beta``, their recipe keys and defaults), ``DistillationLoss(...)`` and the functions of
``train.losses`` accept them as keywords, and one list of range checks serves the config
(one line naming the flag) and the library (``ValueError`` naming the argument).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

__all__ = ["LOSSES", "LOSS_OPTIONS", "TAIL_POLICIES", "LossOptions", "loss_range_checks"]

# The divergences of train.losses and where a top-k cache's missing mass goes.
Loss = Literal["forward-kl", "reverse-kl", "jsd", "tvd"]
TailPolicy = Literal["renorm", "bucket", "label"]
LOSSES: tuple[str, ...] = get_args(Loss)
TAIL_POLICIES: tuple[str, ...] = get_args(TailPolicy)


@dataclass(frozen=True)
class LossOptions:
    """What the distillation loss compares and how; ``logitcache train``'s loss flags."""

    loss: Literal[Loss, "ce"] = "forward-kl"
    """The distillation loss; ce = cross-entropy on the true next token only (baseline)."""
    tail: TailPolicy = "bucket"
    """Top-k caches: where the teacher's missing mass goes."""
    temperature: float = 1.0
    """Softmax temperature of teacher and student in the distillation loss."""
    alpha: float = 0.0
    """Weight of cross-entropy on the true next token (0 = pure distillation; 0.5 helped on
    prose and hurt on code in the real-teacher study: measure it on held-out data)."""
    beta: float = 0.5
    """JSD mixture weight."""

    def __post_init__(self) -> None:
        if self.loss not in (*LOSSES, "ce"):  # ce: cross-entropy only, DistillationLoss's own
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}, ce")
        if self.tail not in TAIL_POLICIES:
            raise ValueError(
                f"unknown tail policy {self.tail!r}; expected one of {', '.join(TAIL_POLICIES)}"
            )
        for ok, key, requirement in loss_range_checks(self):
            if not ok:
                raise ValueError(f"{key} {requirement}, got {getattr(self, key)}")


LOSS_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(LossOptions))
"""The names of the loss settings, in declaration order."""


def loss_range_checks(values: Any) -> list[tuple[bool, str, str]]:
    """(holds, key, what it must be) for each numeric loss setting of ``values`` (a
    ``LossOptions`` or a ``TrainConfig``): the one statement of their ranges."""
    t = values.temperature
    return [
        (t > 0 and math.isfinite(t), "temperature", "must be > 0"),
        (0 <= values.alpha <= 1, "alpha", "must be in [0, 1]"),
        (0 < values.beta < 1, "beta", "must be in (0, 1)"),
    ]
