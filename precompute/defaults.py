"""The default cache mode, chosen by the quality study (docs/benchmarks.md).

Kept apart from the heavy modules so the CLI can show it without importing torch.
"""

__all__ = ["DEFAULT_SAMPLES"]

# Sampled caches are unbiased (counts/N estimate the teacher distribution). On a real LLM
# teacher (SmolLM2-135M, docs/benchmarks.md "Real teacher") N=64 closed 108 % (prose) and
# 99 % (code) of the CE-only -> online-KD gap at 39.5 / 26.3 B/token in format 2, the only
# setting measured at >= 95 % on both; N=16 closed 86 % / 85 % (2 seeds). At <= 16 B/token
# neither did (code N=26 / 28: 93 % / 92 % over 3 seeds; prose N=16 86 %, 87 % like for like
# with --alpha 0.5 on both sides). A fixed N is the default because quality follows N, while
# a byte budget buys fewer draws at larger vocabularies.
DEFAULT_SAMPLES = 64
