"""The default cache mode, chosen by the quality study (docs/benchmarks.md).

Kept apart from the heavy modules so the CLI can show it without importing torch.
"""

__all__ = ["DEFAULT_SAMPLES"]

# Sampled caches are unbiased (counts/N estimate the teacher distribution). On a real LLM
# teacher (SmolLM2-135M, docs/benchmarks.md "Real teacher") N=64 closed 122 % (prose) and
# 104 % (code) of the CE-only -> online-KD gap at 39.5 / 26.3 B/token in format 2, with room
# to spare on both; N=16 closed 97 % / 89 % (2 seeds); code reached 95 % from N=26 (N=24
# 92 %, N=26 103 %, N=28 96 %). --bytes-per-token 16 (N=15 / N=26 there) is the budget
# choice. A fixed N is the default because quality follows N, while a byte budget buys fewer
# draws at larger vocabularies.
DEFAULT_SAMPLES = 64
