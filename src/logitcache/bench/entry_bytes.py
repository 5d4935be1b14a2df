"""Bytes per stored entry of a real sampled cache under candidate v2 encodings (a probe).

In: a local sampled cache (``precompute --samples N``). Out: a dict of bytes per token and
per entry for the v1 fields as written and for each candidate re-encoding of the same
content, all with zstd at the cache's level 3 (``python -m logitcache.bench.entry_bytes
CACHE``). Nothing here changes the format: it measures what a format v2 could save (issue
#12: <= 1.5 bytes per stored entry all-in). The candidates:

- ids ``sorted+delta``: each position's ids sorted, stored as gaps from the previous id of
  the position (the first as is), in uint16 byte planes;
- ids ``rank``: ids renamed by their frequency rank in this cache (a table of vocab ids
  stored once per cache), so frequent ids get small codes, then byte planes;
- ids ``rank sorted+delta``: both (sorted by rank, gaps of ranks);
- ids ``rank, label flag``: as ``rank``, but an entry equal to the true next token (already
  stored in input_ids) is dropped and marked by one bit per position;
- counts and entry counts as uint8 (their values fit 8 bits for N <= 255);
- no tail-mass field (the counts target does not read it);
- framing: Arrow IPC with 1 vs 16 sequences per record batch, measured by writing both.

Every size is of real bytes zstd produced; the order-0 entropy of the renamed ids is given
as the bound a per-cache entropy coder could approach. Format 2 adopted ranks (per shard),
sorting with gaps, counts without a tail mass, and batches; ``logitcache.bench.format_bytes``
measures the real format 1 and format 2 writers against each other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

__all__ = ["probe_cache"]

_ZSTD = numcodecs.Zstd(level=3)


def _z(a: np.ndarray) -> int:
    """zstd size of an array laid out as byte planes (low byte plane first)."""
    a = np.ascontiguousarray(a)
    planes = a.view(np.uint8).reshape(-1, a.itemsize).T.copy()
    return len(_ZSTD.encode(planes.tobytes()))


def _framing(records: list[Any], per_batch: int) -> int:
    """Arrow IPC file bytes minus its blob bytes, with ``per_batch`` rows per batch."""
    import pyarrow as pa

    blobs = [_ZSTD.encode(r.ids.astype(np.uint16).tobytes()) for r in records]
    schema = pa.schema([pa.field("index", pa.int64())] + [pa.field(f"f{i}", pa.binary())
                                                          for i in range(8)])  # fmt: skip
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        for s in range(0, len(records), per_batch):
            part = blobs[s : s + per_batch]
            arrays = [pa.array(list(range(s, s + len(part))), pa.int64())]
            arrays += [pa.array(part, pa.binary()) for _ in range(8)]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
    return sink.getvalue().size - 8 * sum(len(b) for b in blobs)


def probe_cache(cache: Path) -> dict[str, Any]:
    from logitcache.storage import CacheReader

    reader = CacheReader(str(cache))
    if reader.spec.mode != "sampled":
        raise ValueError(f"{cache} is a {reader.spec.mode} cache; the probe reads sampled caches")
    records = list(reader)
    tokens = sum(len(r.input_ids) for r in records)
    all_ids = np.concatenate([r.ids for r in records]).astype(np.int64)
    entries = all_ids.size
    freq = np.bincount(all_ids, minlength=reader.spec.vocab_size)
    order = np.argsort(-freq, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    used = int((freq > 0).sum())
    p = freq[freq > 0] / entries
    sizes = {"v1 ids": 0, "sorted+delta": 0, "rank": 0, "rank sorted+delta": 0,
             "rank+label flag": 0,
             "v1 counts": 0, "counts u8": 0, "v1 n_entries": 0, "n_entries u8": 0}  # fmt: skip
    label_hits = 0
    for r in records:
        ids, counts, n = r.ids.astype(np.int64), r.counts, r.n_entries
        pos = np.repeat(np.arange(n.size), n)
        sizes["v1 ids"] += _z(ids.astype(np.uint16))
        srt = np.lexsort((ids, pos))
        s_ids, s_pos = ids[srt], pos[srt]
        first = np.r_[True, s_pos[1:] != s_pos[:-1]]
        gaps = np.where(first, s_ids, s_ids - np.r_[0, s_ids[:-1]])
        sizes["sorted+delta"] += _z(gaps.astype(np.uint16))
        ranked = rank[ids]
        sizes["rank"] += _z(ranked.astype(np.uint16))
        r_srt = np.lexsort((ranked, pos))
        r_ids = ranked[r_srt]
        sizes["rank sorted+delta"] += _z(
            np.where(first, r_ids, r_ids - np.r_[0, r_ids[:-1]]).astype(np.uint16)
        )
        is_label = ids == r.input_ids[1:].astype(np.int64)[pos]
        label_hits += int(is_label.sum())
        flags = np.zeros(n.size, dtype=bool)
        flags[pos[is_label]] = True
        sizes["rank+label flag"] += _z(ranked[~is_label].astype(np.uint16)) + len(
            _ZSTD.encode(np.packbits(flags).tobytes())
        )
        sizes["v1 counts"] += _z(counts.astype(np.uint16))
        sizes["counts u8"] += len(_ZSTD.encode(counts.astype(np.uint8).tobytes()))
        sizes["v1 n_entries"] += _z(n.astype(np.uint16))
        sizes["n_entries u8"] += len(_ZSTD.encode(n.astype(np.uint8).tobytes()))
    framing = {b: _framing(records, b) for b in (1, 16)}
    positions = sum(r.n_entries.size for r in records)
    return {
        "cache": str(cache), "samples": reader.spec.samples, "seq_len": reader.spec.seq_len,
        "sequences": len(records), "tokens": tokens, "entries": entries,
        "entries_per_position": entries / positions,
        "true_token_among_entries": label_hits / positions,
        "distinct_ids_used": used, "rank_table_bytes": 2 * used,
        "ids_order0_entropy_bits": float(-(p * np.log2(p)).sum()),
        "bytes_per_entry": {k: v / entries for k, v in sizes.items()},
        "bytes_per_token": {k: v / tokens for k, v in sizes.items()},
        "framing_bytes_per_token": {f"{b} seq/batch": v / tokens for b, v in framing.items()},
    }  # fmt: skip


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(probe_cache(Path(path)), indent=1))
