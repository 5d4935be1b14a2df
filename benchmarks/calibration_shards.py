"""Bytes per token against shard size, and calibration's prediction of it (a probe).

In: local sampled caches (only read; the study used two made with ``precompute
--bytes-per-token 16``). Out: a Markdown table row per cache: B/token rewritten in shards of
16, 64 and 256 sequences, the cache's own, calibration's 32 spaced sequences written as one
shard and as two, and the line through those two read at the cache's shards per sequence.
``python benchmarks/calibration_shards.py CACHE...``; the numbers are in docs/benchmarks.md
("Choosing N from a byte budget").
"""

from __future__ import annotations

import sys

from logitcache.precompute.calibrate import measure
from logitcache.storage import CacheReader, Location, read_manifest


def row(path: str) -> str:
    with CacheReader(path) as reader:
        records, spec = list(reader), reader.manifest.spec
    n = len(records)
    whole = read_manifest(Location(path)).stats()["bytes_per_token"]
    by_size = {s: measure(spec, records, s)[1] for s in (16, 64, 256)}
    sample = [records[j * n // 32] for j in range(32)]  # calibration's 32 spaced sequences
    (x1, y1), (x2, y2) = measure(spec, sample, 32), measure(spec, sample, 16)
    predicted = y1 + (y2 - y1) / (x2 - x1) * (-(-n // 256) / n - x1)
    sizes = " | ".join(f"{by_size[s]:.2f}" for s in (16, 64, 256))
    return (
        f"| {path} (N={spec.samples}, {n} seq) | {sizes} | {whole:.2f} "
        f"| {y1:.2f} ({y1 / whole - 1:+.1%}) | {y2:.2f} "
        f"| {predicted:.2f} ({predicted / whole - 1:+.1%}) |"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/calibration_shards.py CACHE...")
    for cache in sys.argv[1:]:
        print(row(cache))
