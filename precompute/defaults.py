"""The default cache mode, chosen by the quality study (docs/benchmarks.md).

Kept apart from the heavy modules so the CLI can show it without importing torch.
"""

__all__ = ["DEFAULT_SAMPLES"]

# Sampled caches are unbiased (counts/N estimate the teacher distribution). On a real LLM
# teacher (SmolLM2-135M, docs/benchmarks.md "Real teacher") N=64 closed 122 % (prose) and
# 104 % (code) of the CE-only -> online-KD gap at 39.5 / 26.3 B/token in format 2, the only
# setting measured at >= 95 % on both; N=16 closed 101 % / 88 % at 15.6 / 11.3 B/token.
DEFAULT_SAMPLES = 64
