"""logitcache: distill language models from an offline teacher-logit cache.

Stages (each a subpackage): ``logitcache.storage`` owns the on-disk cache format,
``logitcache.precompute`` runs a teacher once over a corpus and writes a cache,
``logitcache.train`` trains students from a cache with no teacher in memory.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
