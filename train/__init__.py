"""The student trainer, and the pieces any training loop can use to learn from a cache.

In: a cache (``logitcache.storage``) and a student (pretrained or from a config).
Out: ``OUT/model`` loadable with ``AutoModelForCausalLM.from_pretrained``, metrics and
checkpoints. No teacher is ever loaded.

The public API (``docs/api.md``): ``CacheDataset`` (records, map-style, and its exact-resume
stream ``CacheStream``), ``DistillCollator`` (records -> a dict of padded tensors) and
``DistillationLoss`` (an ``nn.Module``); ``logitcache train`` (``train``) is built on them.
"""

from logitcache.core.lazy import lazy_exports

_PUBLIC = {  # name -> its module; imported on first use, so the CLI starts without torch
    "CacheDataset": ".dataset",
    "CacheStream": ".stream",
    "DistillCollator": ".collator",
    "DistillationLoss": ".distill_loss",
    "StreamState": ".order",
    "TeacherTargets": ".losses",
    "TrainConfig": ".config",
    "TrainResult": ".loop",
    "evaluate": ".evaluation",
    "lr_multiplier": ".config",
    "train": ".loop",
}

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

__getattr__ = lazy_exports(__name__, _PUBLIC)
