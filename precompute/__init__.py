"""The teacher pass: run a teacher once over a corpus and write a logit cache.

In: a teacher (any AutoModelForCausalLM) and a corpus (HF dataset or local files).
Out: a cache (see ``logitcache.storage``) of its top-k or sampled next-token distributions.
"""

from logitcache.core.lazy import lazy_exports

_PUBLIC = {  # name -> its module; imported on first use, so the CLI starts without torch
    "CorpusError": ".corpus",
    "CorpusSpec": ".corpus",
    "CorpusStats": ".packing",
    "PackedSequence": ".packing",
    "PrecomputeConfig": ".config",
    "PrecomputeResult": ".run",
    "iter_sequences": ".packing",
    "run_precompute": ".run",
}

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

__getattr__ = lazy_exports(__name__, _PUBLIC)
