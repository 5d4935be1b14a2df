"""``logitcache bench remote``: opening a large remote cache and its first training batch.

In: a shard count, a per-request latency. Out: the time from nothing to the first training
batch of a synthetic cache of that many tiny shards served over HTTP on 127.0.0.1 with the
latency injected before every response, measured the way ``logitcache train`` reads (a
``CacheStream``), with a cold local shard cache: once reading by ranged requests only, once
with the stream's shard order handed to ``CacheReader.prefetch_sequences``. Also the
manifest's size and parse time, the requests made, and the batch rate after the first.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from logitcache.bench.http_server import StaticServer
from logitcache.bench.storage import synthetic_records
from logitcache.core.progress import Reporter
from logitcache.storage import CacheSpec, Location, Manifest, ShardInfo, default_codecs
from logitcache.storage.containers import get_container
from logitcache.storage.formats.v1 import RecordCodec
from logitcache.storage.writer import MANIFEST, shard_name, shard_stats

__all__ = ["RemoteRow", "build_cache", "format_remote", "run_remote_bench"]


@dataclass
class RemoteRow:
    reading: str
    """``ranged`` (train as of today) or ``prefetch`` (train calling prefetch_sequences)."""
    open_s: float
    """Cold: until the CacheStream's reader holds the parsed manifest."""
    first_batch_s: float
    """Cold: from nothing to the first micro-batch."""
    requests_to_first_batch: int
    batches_per_s: float
    """The next ``batches`` micro-batches."""
    requests_total: int


def build_cache(
    root: Path, n_shards: int, shard_sequences: int, seq_len: int, k: int, vocab: int, reporter
) -> int:
    """A synthetic top-k cache of ``n_shards`` tiny shards; returns the manifest's bytes.

    The manifest is written once at the end (a CacheWriter rewrites it after every shard,
    which for 10,000 shards is 10,000 rewrites of a growing file).
    """
    spec = CacheSpec(
        mode="topk",
        vocab_size=vocab,
        seq_len=seq_len,
        pack=True,
        container="arrow",
        codecs=default_codecs(vocab, format_version=1),
        shard_sequences=shard_sequences,
        k=k,
        teacher={"name_or_path": "synthetic"},
        corpus={"name": "bench-remote"},
    )
    loc, codec, container = Location(root), RecordCodec(spec), get_container("arrow")
    loc.makedirs("shards")
    templates = synthetic_records(64, seq_len, k, vocab)
    infos = []
    bar = reporter.bar(total=n_shards, desc="build", unit="shard")
    for j in range(n_shards):
        first = j * shard_sequences
        indices = list(range(first, first + shard_sequences))
        records = [replace(templates[i % len(templates)], index=i) for i in indices]
        metadata = {
            "format_version": spec.format_version,
            "cache_id": spec.cache_id,
            "spec": spec.to_dict(),
            "shard_index": j,
            "first_sequence": first,
            "n_sequences": shard_sequences,
        }
        rel = shard_name(j, container.suffix)
        rows = [codec.encode(r) for r in records]
        size, digest = container.write(loc, rel, metadata, indices, rows, codec.fields)
        infos.append(
            ShardInfo(
                index=j,
                path=rel,
                first_sequence=first,
                bytes=size,
                sha256=digest,
                **shard_stats(records),
            )
        )
        bar.update(1)
    bar.close()
    manifest = Manifest(
        spec=spec,
        shards=tuple(infos),
        complete=True,
        n_sequences_total=n_shards * shard_sequences,
        created_by="logitcache bench remote",
    )
    data = manifest.to_json().encode()
    loc.publish_bytes(MANIFEST, data)
    return len(data)


def _first_batches(url: str, vocab: int, prefetch: bool, batches: int, server) -> RemoteRow:
    from logitcache.train import CacheDataset

    server.clear()
    start = time.perf_counter()
    stream = CacheDataset(url, eval_fraction=0.02, vocab_limit=vocab).stream(
        batch_size=8, seed=0, block_shards=4
    )
    reader = stream.dataset.readers()[0]
    opened = time.perf_counter()
    if prefetch:  # what train does per cache c: readers[c].prefetch_sequences(its order)
        source, order = stream.order(0)
        reader.prefetch_sequences(order[source == 0])
    it = iter(stream)
    next(it)
    first = time.perf_counter()
    n_first = len(server.requests)
    for _ in range(batches):
        next(it)
    rest = time.perf_counter() - first
    reader.close()
    return RemoteRow(
        reading="prefetch" if prefetch else "ranged",
        open_s=opened - start,
        first_batch_s=first - start,
        requests_to_first_batch=n_first,
        batches_per_s=batches / rest if rest > 0 else float("inf"),
        requests_total=len(server.requests),
    )


@contextmanager
def _home(path: str):
    """A fresh $LOGITCACHE_HOME: the local shard cache starts cold."""
    before = os.environ.get("LOGITCACHE_HOME")
    os.environ["LOGITCACHE_HOME"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOGITCACHE_HOME", None)
        else:
            os.environ["LOGITCACHE_HOME"] = before


def run_remote_bench(
    *,
    n_shards: int = 10_000,
    shard_sequences: int = 4,
    latency_ms: float = 50.0,
    seq_len: int = 64,
    k: int = 8,
    vocab: int = 32_000,
    batches: int = 20,
    work: str | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Build (or reuse, in ``work``) the cache, serve it, and time both ways of reading."""
    reporter = reporter or Reporter(enabled=False)
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-remote-") as scratch:
        root = Path(work or scratch) / f"cache-{n_shards}x{shard_sequences}-{seq_len}"
        if not (root / MANIFEST).exists():
            build_cache(root, n_shards, shard_sequences, seq_len, k, vocab, reporter)
        manifest_bytes = (root / MANIFEST).stat().st_size
        t0 = time.perf_counter()
        Manifest.from_json((root / MANIFEST).read_bytes())
        parse_s = time.perf_counter() - t0
        rows = []
        with StaticServer(root.parent, latency=latency_ms / 1000) as server:
            url = f"{server.url}/{root.name}"
            for prefetch in (False, True):
                with _home(tempfile.mkdtemp(dir=scratch)):
                    rows.append(_first_batches(url, vocab, prefetch, batches, server))
    return {
        "n_shards": n_shards,
        "shard_sequences": shard_sequences,
        "seq_len": seq_len,
        "top_k": k,
        "latency_ms": latency_ms,
        "manifest_bytes": manifest_bytes,
        "manifest_parse_s": parse_s,
        "rows": [asdict(r) for r in rows],
    }


def format_remote(result: dict) -> str:
    lines = [
        f"{result['n_shards']:,} shards of {result['shard_sequences']} x {result['seq_len']} "
        f"tokens (top-{result['top_k']}) over HTTP on 127.0.0.1, {result['latency_ms']:g} ms "
        "before every response; cold local shard cache; micro-batch 8, --block-shards 4",
        f"manifest.json {result['manifest_bytes']:,} bytes, parsed in "
        f"{result['manifest_parse_s']:.2f} s",
        "",
        "reading    open s   first batch s   requests   batches/s after   requests total",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['reading']:<9} {r['open_s']:>7.2f} {r['first_batch_s']:>15.2f} "
            f"{r['requests_to_first_batch']:>10} {r['batches_per_s']:>17.1f} "
            f"{r['requests_total']:>16}"
        )
    return "\n".join(lines)
