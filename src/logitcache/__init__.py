"""logitcache: distill language models from an offline teacher-logit cache.

Stages (each a subpackage): ``logitcache.storage`` owns the on-disk cache format,
``logitcache.precompute`` runs a teacher once over a corpus and writes a cache,
``logitcache.train`` trains students from a cache with no teacher in memory.

The names below are the public API for bringing a cache to your own trainer
(``docs/api.md``); they are imported on first use, so ``import logitcache`` stays cheap.
"""

from logitcache.core.lazy import lazy_exports
from logitcache.core.version import __version__

_PUBLIC = {
    "CacheDataset": "logitcache.train.dataset",
    "CacheStream": "logitcache.train.stream",
    "DistillCollator": "logitcache.train.collator",
    "DistillationLoss": "logitcache.train.distill_loss",
    "StreamState": "logitcache.train.order",
    "TrainConfig": "logitcache.train.config",
    "evaluate": "logitcache.train.evaluation",
}

__all__ = ["__version__", *_PUBLIC]

__getattr__ = lazy_exports(__name__, _PUBLIC)
