"""The default cache mode, chosen by the quality study (docs/benchmarks.md).

Kept apart from the heavy modules so the CLI can show it without importing torch.
"""

__all__ = ["DEFAULT_SAMPLES"]

# Sampled caches are unbiased (counts/N estimate the teacher distribution); on the demo's
# teacher N=64 closed 93 % of the CE-only -> online-KD gap, every top-k mode at most 63 %.
DEFAULT_SAMPLES = 64
