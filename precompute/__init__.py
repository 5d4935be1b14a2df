"""The teacher pass: run a teacher once over a corpus and write a logit cache.

In: a teacher (any AutoModelForCausalLM) and a corpus (HF dataset or local files).
Out: a cache (see ``logitcache.storage``) of its top-k or sampled next-token distributions.
"""

from .corpus import CorpusError, CorpusSpec
from .packing import CorpusStats, PackedSequence, iter_sequences
from .run import PrecomputeConfig, PrecomputeResult, run_precompute

__all__ = [
    "CorpusError",
    "CorpusSpec",
    "CorpusStats",
    "PackedSequence",
    "PrecomputeConfig",
    "PrecomputeResult",
    "iter_sequences",
    "run_precompute",
]
