"""Format 1 against format 2 on real caches: bytes by component, and decoding speed.

In: local Arrow caches (any format) and a scratch directory. Out: a JSON-able dict per cache:
bytes per token and per stored entry by field (plus framing: the file's bytes that are not
field blobs; format 2's id table counted apart) of the cache re-encoded in format 1 and in
format 2 from the same records, and single-thread decoding speed (positions per CPU second of
``CacheReader`` iteration, best of ``repeats`` after a warm-up).
``python benchmarks/format_bytes.py CACHE... --out DIR [--k 64] [--batch-sequences 16]``;
numbers and commands are in docs/benchmarks.md ("Format v2"). The source caches are only
read; copies go under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["components", "decode_rate", "measure", "reencode", "truncate_topk"]


def components(cache: Path) -> dict[str, Any]:
    """Bytes per token and per entry of a local Arrow cache, by field, table and framing."""
    import pyarrow as pa

    from logitcache.storage import Location, read_manifest

    manifest = read_manifest(Location(str(cache)))
    sizes: dict[str, int] = {}
    framing = 0
    for shard in manifest.shards:
        path = cache / shard.path
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            blobs = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                for name in batch.schema.names[1:]:
                    size = sum(len(v) for v in batch.column(name).to_pylist())
                    sizes[name] = sizes.get(name, 0) + size
                    blobs += size
            table = (reader.schema.metadata or {}).get(b"logitcache.ids_table", b"")
            # the schema (with its metadata) is in an IPC file twice: stream head and footer
            sizes["ids_table"] = sizes.get("ids_table", 0) + 2 * len(table)
            blobs += 2 * len(table)
        framing += path.stat().st_size - blobs
    sizes["framing"] = framing
    if not sizes["ids_table"]:
        del sizes["ids_table"]
    tokens, entries = manifest.n_tokens, manifest.n_entries
    return {
        "format": manifest.version_label,
        "bytes": manifest.bytes,
        "tokens": tokens,
        "entries": entries,
        "entries_per_position": entries / manifest.n_positions,
        "bytes_per_token": manifest.bytes / tokens,
        "bytes_per_entry": manifest.bytes / entries,
        "per_token": {k: v / tokens for k, v in sorted(sizes.items())},
    }


def truncate_topk(record: Any, k: int) -> Any:
    """A top-k record cut to its k most probable entries (tail mass grows by the rest)."""
    n_pos = record.n_positions
    width = record.ids.size // max(n_pos, 1)
    ids = record.ids.reshape(n_pos, width)[:, :k].reshape(-1)
    lp = record.logprobs.reshape(n_pos, width)
    dropped = np.exp(lp[:, k:].astype(np.float64)).sum(1)
    tail = (record.tail_mass + dropped).clip(0, 1).astype(np.float32)
    return dataclasses.replace(
        record,
        ids=ids,
        logprobs=lp[:, :k].reshape(-1).copy(),
        n_entries=np.full(n_pos, k, np.int32),
        tail_mass=tail,
    )


def reencode(
    src: Path,
    dest: Path,
    format_version: int,
    *,
    k: int | None = None,
    batch_sequences: int | None = None,
    shard_sequences: int | None = None,
) -> float:
    """Write the records of ``src`` (cut to top-``k`` if given; in shards of
    ``shard_sequences`` if given) as a ``format_version`` cache at ``dest`` (replaced) with
    ``convert_cache``; returns the CPU seconds spent encoding and writing shards (one thread)."""
    from logitcache.storage import convert_cache
    from logitcache.storage.convert import RecordEdit

    edit = None if k is None else RecordEdit({"k": k}, lambda r: truncate_topk(r, k))
    if dest.exists():
        shutil.rmtree(dest)
    result = convert_cache(
        src,
        dest,
        format_version=format_version,
        edit=edit,
        batch_sequences=batch_sequences,
        shard_sequences=shard_sequences,
        encode_threads=1,
    )
    return result.write_cpu_s


def decode_rate(cache: Path, repeats: int = 7) -> float:
    """Positions per CPU second of iterating every record of a local cache (one thread):
    process time, not wall time, so other work on the machine counts less."""
    from logitcache.storage import CacheReader

    positions = CacheReader(str(cache)).manifest.n_positions
    for _ in CacheReader(str(cache), verify=False):  # warm the page cache
        pass
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in CacheReader(str(cache), verify=False):
            pass
        best = min(best, time.process_time() - start)
    return positions / best


def measure(
    src: Path,
    out: Path,
    *,
    k: int | None = None,
    batch_sequences: int | None = None,
    shard_sequences: int | None = None,
    speed: bool = True,
) -> dict[str, Any]:
    """Format 1 and 2 copies of ``src`` under ``out``: their components and decode rates."""
    result: dict[str, Any] = {"cache": str(src), "k": k}
    for version in (1, 2):
        name = f"{src.name}{f'-k{k}' if k else ''}-v{version}"
        if version == 2 and batch_sequences:
            name += f"-b{batch_sequences}"
        if shard_sequences:
            name += f"-s{shard_sequences}"
        copy = out / name
        write_s = reencode(
            src,
            copy,
            version,
            k=k,
            batch_sequences=batch_sequences,
            shard_sequences=shard_sequences,
        )
        row = components(copy)
        row["write_tokens_per_s"] = row["tokens"] / write_s
        if speed:
            row["decode_positions_per_s"] = decode_rate(copy)
        result[f"v{version}"] = row
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("caches", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="scratch directory for copies")
    parser.add_argument("--k", type=int, default=None, help="cut top-k caches to this k")
    parser.add_argument("--batch-sequences", type=int, default=None)
    parser.add_argument(
        "--shard-sequences",
        type=int,
        default=None,
        help="reshard the copies (default: the source's shard size)",
    )
    parser.add_argument("--no-speed", action="store_true", help="bytes only")
    args = parser.parse_args(argv)
    for cache in args.caches:
        row = measure(
            cache,
            args.out,
            k=args.k,
            batch_sequences=args.batch_sequences,
            shard_sequences=args.shard_sequences,
            speed=not args.no_speed,
        )
        print(json.dumps(row, indent=1), flush=True)


if __name__ == "__main__":
    main()
