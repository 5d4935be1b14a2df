"""Would a context model make format 2's sampled ids smaller? (a probe)

In: a local sampled cache (any format). Out: a JSON dict (``python
benchmarks/id_context.py CACHE [--batch-sequences 16] [--level 15]``) of the bytes per token
of format 2's ``ids`` field when, before format 2 sorts and gap-codes each position's ranks,
the ranks are renumbered per position so that ids the decoder can predict come first:

- ``label``: the position's next input token (the decoder has the input ids before the ids),
  which is among the stored ids wherever a draw hit it;
- ``bigram-m``: the m ids a shard most often stores after the current input token (a table
  per shard; its bytes are given apart, compressed as format 2 compresses its id table);
- ``label+bigram-m``: both, the label first.

The renumbering is a bijection of the rank space per position (the predicted ids take ranks
0..m-1, every other rank keeps its order after them), so a decoder could invert it. Each
variant is encoded by format 2's own ``GroupCodec`` (ids renumbered, every other field as
stored), so ``baseline`` is exactly the ``ids`` bytes a format 2 writer makes in one shard.
Results are in docs/benchmarks.md ("Context models for ids").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import numpy as np

__all__ = ["id_bytes", "probe", "to_front"]

BIGRAM_WIDTHS = (1, 2, 4, 8)


def to_front(ranks: np.ndarray, n_entries: np.ndarray, context: np.ndarray) -> np.ndarray:
    """ranks [E] of positions holding n_entries [P] each -> ranks renumbered per position so
    that the position's context ranks (row of context [P, m]; -1 = unused slot, distinct
    otherwise) become 0, 1, ... in order and every other rank r becomes r + (context ranks
    above r) (its place among the ranks not in context, after them)."""
    pos = np.repeat(np.arange(n_entries.size), n_entries)
    ctx = context[pos]  # [E, m]
    valid = ctx >= 0
    hit = (ctx == ranks[:, None]) & valid
    order = np.cumsum(valid, axis=1) - 1  # slot -> its index among the valid slots
    slot = np.take_along_axis(order, hit.argmax(1)[:, None], 1)[:, 0]
    below = ((ctx < ranks[:, None]) & valid).sum(1)
    return np.where(hit.any(1), slot, ranks + valid.sum(1) - below)


def id_bytes(records: list, spec: Any, context: Any = None) -> int:
    """Format 2 ``ids`` bytes of one shard's records (batches of ``spec.batch_sequences``),
    ranks renumbered by ``context(records, id_to_rank) -> [P, m]`` ranks when given."""
    from logitcache.storage.formats.v2 import GroupCodec

    codec = GroupCodec(spec)
    rank_to_id = codec.expand_table(codec.make_table(records)).astype(np.int64)
    id_to_rank = np.empty_like(rank_to_id)
    id_to_rank[rank_to_id] = np.arange(rank_to_id.size)
    total = 0
    for start in range(0, len(records), codec.size):
        batch = records[start : start + codec.size]
        if context is not None:
            renamed = []
            for r in batch:
                ranks = to_front(id_to_rank[r.ids], r.n_entries, context(r, id_to_rank))
                renamed.append(dataclasses.replace(r, ids=rank_to_id[ranks].astype(np.uint32)))
            batch = renamed
        total += len(codec.encode(batch, rank_to_id.astype(np.uint32))["ids"])
    return total


def _bigram_table(records: list, vocab: int, width: int) -> dict[int, np.ndarray]:
    """current input id -> the ``width`` ids most often stored after it (most often first)."""
    cur = np.concatenate([np.repeat(r.input_ids[:-1], r.n_entries) for r in records])
    ids = np.concatenate([r.ids for r in records]).astype(np.int64)
    keys, counts = np.unique(cur.astype(np.int64) * vocab + ids, return_counts=True)
    x, y = np.divmod(keys, vocab)
    order = np.lexsort((-counts, x))
    x, y = x[order], y[order]
    place = np.arange(x.size) - np.searchsorted(x, x)
    keep = place < width
    table: dict[int, list[int]] = {}
    for a, b in zip(x[keep].tolist(), y[keep].tolist(), strict=True):
        table.setdefault(a, []).append(b)
    return {a: np.array(b, dtype=np.int64) for a, b in table.items()}


def _context(table: dict[int, np.ndarray] | None, width: int, label: bool):
    def context(record: Any, id_to_rank: np.ndarray) -> np.ndarray:
        n_pos = record.n_positions
        cols = int(label) + width
        ctx = -np.ones((n_pos, cols), dtype=np.int64)
        nxt = id_to_rank[record.input_ids[1:]]
        if label:
            ctx[:, 0] = nxt
        if table:
            for p, cur in enumerate(record.input_ids[:-1].tolist()):
                guess = id_to_rank[table.get(cur, np.zeros(0, np.int64))]
                if label:
                    guess = guess[guess != nxt[p]]
                ctx[p, int(label) : int(label) + guess.size] = guess
        return ctx

    return context


def _label_hits(record: Any) -> int:
    """Positions of a record whose next input token is among their stored ids."""
    hit = np.repeat(record.input_ids[1:], record.n_entries) == record.ids
    return int(np.logical_or.reduceat(hit, np.cumsum(record.n_entries) - record.n_entries).sum())


def _table_bytes(table: dict[int, np.ndarray], spec: Any) -> int:
    from logitcache.storage.formats.v2 import GroupCodec

    flat = np.concatenate([np.concatenate([[k, v.size], v]) for k, v in sorted(table.items())])
    return len(GroupCodec(spec).codecs["ids_table"].encode(flat.astype(np.uint32)))


def probe(cache: str, batch_sequences: int = 16, level: int = 15) -> dict[str, Any]:
    """Bytes per token of format 2's ids under each renumbering, one shard for the cache."""
    from logitcache.storage import CacheReader
    from logitcache.storage.formats.v2 import v2_codecs

    reader = CacheReader(cache)
    if reader.spec.mode != "sampled":
        raise SystemExit(f"{cache}: a sampled cache is needed (ids of top-k keep log-prob order)")
    records = list(reader)
    codecs = v2_codecs(reader.spec.vocab_size, zstd_level=level)
    spec = dataclasses.replace(
        reader.spec, shard_sequences=len(records), batch_sequences=batch_sequences, codecs=codecs
    )
    tokens = sum(r.n_tokens for r in records)
    positions = sum(r.n_positions for r in records)
    out: dict[str, Any] = {
        "cache": cache,
        "tokens": tokens,
        "batch_sequences": batch_sequences,
        "zstd_level": level,
        "label_among_ids": sum(_label_hits(r) for r in records) / positions,
        "baseline": id_bytes(records, spec) / tokens,
        "label": id_bytes(records, spec, _context(None, 0, True)) / tokens,
    }
    for width in BIGRAM_WIDTHS:
        table = _bigram_table(records, spec.vocab_size, width)
        out[f"bigram-{width}_table"] = _table_bytes(table, spec) / tokens
        for label in (False, True):
            name = f"{'label+' if label else ''}bigram-{width}"
            out[name] = id_bytes(records, spec, _context(table, width, label)) / tokens
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache")
    parser.add_argument("--batch-sequences", type=int, default=16)
    parser.add_argument("--level", type=int, default=15, help="zstd level of every field")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.cache, args.batch_sequences, args.level), indent=1))


if __name__ == "__main__":
    main()
