"""The student trainer, and the pieces any training loop can use to learn from a cache.

In: a cache (``logitcache.storage``) and a student (pretrained or from a config).
Out: ``OUT/model`` loadable with ``AutoModelForCausalLM.from_pretrained``, metrics and
checkpoints. No teacher is ever loaded.

The public API (``docs/api.md``): ``CacheDataset`` (records, map-style, and its exact-resume
stream ``CacheStream``), ``DistillCollator`` (records -> a dict of padded tensors) and
``DistillationLoss`` (an ``nn.Module``); ``logitcache train`` (``train``) is built on them.
"""

from .collator import DistillCollator
from .config import TrainConfig, lr_multiplier
from .data import StreamState
from .dataset import CacheDataset
from .distill_loss import DistillationLoss
from .evaluate import evaluate
from .loop import TrainResult, train
from .losses import TeacherTargets
from .stream import CacheStream

__all__ = [
    "CacheDataset",
    "CacheStream",
    "DistillCollator",
    "DistillationLoss",
    "StreamState",
    "TeacherTargets",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "lr_multiplier",
    "train",
]
