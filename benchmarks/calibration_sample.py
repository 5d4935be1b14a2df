"""Which sample should ``precompute --bytes-per-token`` calibrate on? (a probe)

In: the real-teacher study's ``--out`` directory (its format 1 sampled caches, only read).
Out: a Markdown table row per (corpus, N) of bytes per token of the whole cache (converted to
format 2 in one shard) against 32 of its records written again alone, as calibration writes
them: the first 32 sequences, or every fifth. ``python benchmarks/calibration_sample.py STUDY``;
the numbers are in docs/benchmarks.md ("Choosing N from a byte budget").
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace

from logitcache.storage import CacheReader, CacheWriter, Location, convert_cache, read_manifest

CACHES = [
    ("shakespeare", 8),
    ("shakespeare", 16),
    ("shakespeare", 64),
    ("stdlib", 8),
    ("stdlib", 16),
    ("stdlib", 32),
    ("stdlib", 64),
]


def written(spec, records, where: str) -> float:
    """B/token of these records alone, renumbered, in one shard."""
    with CacheWriter(where, spec) as writer:
        writer.write_shard(0, [replace(r, index=i) for i, r in enumerate(records)])
        return writer.manifest.stats()["bytes_per_token"]


def row(study: str, corpus: str, n: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{study}/{corpus}/caches/samples{n}"
        convert_cache(source, f"{tmp}/v2", format_version=2, shard_sequences=256)  # one shard
        whole = read_manifest(Location(f"{tmp}/v2"))
        with CacheReader(f"{tmp}/v2") as reader:
            first = [reader.read(i) for i in range(32)]
            spaced = [reader.read(i) for i in range(0, len(reader), 5)][:32]
        b = whole.stats()["bytes_per_token"]
        f, s = written(whole.spec, first, f"{tmp}/f"), written(whole.spec, spaced, f"{tmp}/s")
        f_vs, s_vs = f"{f:.2f} ({f / b - 1:+.0%})", f"{s:.2f} ({s / b - 1:+.0%})"
        return f"| {corpus} | {n} | {b:.2f} | {f_vs} | {s_vs} |"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/calibration_sample.py STUDY_OUT_DIR")
    for corpus, n in CACHES:
        print(row(sys.argv[1], corpus, n))
