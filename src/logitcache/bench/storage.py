"""``logitcache bench storage``: size and speed of each codec and container.

Writes and reads a synthetic top-k cache at a realistic vocabulary (default 151,936, k=64)
on one core and reports bytes per token and per stored entry, write and read throughput,
random-access latency of one sequence, and the lossy codec's KL(exact || decoded).
Synthetic ids follow a Zipf law with per-document topic pools; real teacher output is
usually more compressible (see docs/benchmarks.md for both).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from logitcache.storage import CacheReader, CacheSpec, CacheWriter, SequenceRecord, default_codecs
from logitcache.storage.formats.v2 import default_group_sequences

__all__ = ["StorageRow", "kl_exact_vs_decoded", "run_storage_bench", "synthetic_records"]


@dataclass
class StorageRow:
    container: str
    logprobs: str
    bytes_per_token: float
    bytes_per_entry: float
    write_tokens_per_s: float
    read_positions_per_s: float
    random_read_ms: float
    kl_nats_per_position: float


def synthetic_records(
    n_sequences: int, seq_len: int, k: int, vocab: int, seed: int = 0
) -> list[SequenceRecord]:
    """Top-k records shaped like a teacher's: Zipf ids, decaying sorted log-probs."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    zipf = ranks**-1.1
    zipf /= zipf.sum()
    perm = rng.permutation(vocab)
    records = []
    positions = seq_len - 1
    for index in range(n_sequences):
        pool = perm[rng.choice(vocab, size=4096, replace=False, p=zipf)]  # a document's topics
        ids = pool[np.minimum(rng.zipf(1.3, size=(positions, k)) - 1, 4095)]
        tokens = pool[np.minimum(rng.zipf(1.3, size=seq_len) - 1, 4095)]
        ids[:, 0] = np.where(rng.random(positions) < 0.55, tokens[1:], ids[:, 0])
        weights = np.arange(1, k + 1) ** -1.6 * np.exp(rng.normal(0, 0.7, (positions, k)))
        head = rng.beta(8, 1, size=(positions, 1)) * 0.999  # covered mass, median ~0.92
        p = np.sort(weights / weights.sum(1, keepdims=True), axis=1)[:, ::-1] * head
        records.append(
            SequenceRecord(
                index=index,
                input_ids=tokens.astype(np.uint32),
                loss_mask=np.r_[False, np.ones(positions, dtype=bool)],
                doc_starts=np.zeros(1, dtype=np.uint32),
                ids=ids.reshape(-1).astype(np.uint32),
                n_entries=np.full(positions, k, dtype=np.int32),
                tail_mass=(1.0 - head[:, 0]).astype(np.float32),
                logprobs=np.log(p).reshape(-1).astype(np.float32),
            )
        )
    return records


def kl_exact_vs_decoded(exact: SequenceRecord, decoded: SequenceRecord) -> float:
    """Mean over positions of KL over the k ids + tail, decoded renormalized (nats)."""
    k = int(exact.n_entries[0])
    p = np.exp(exact.logprobs.astype(np.float64)).reshape(-1, k)
    q = np.exp(decoded.logprobs.astype(np.float64)).reshape(-1, k)
    p = np.concatenate([p, exact.tail_mass[:, None].astype(np.float64)], axis=1)
    q = np.concatenate([q, decoded.tail_mass[:, None].astype(np.float64)], axis=1)
    p /= p.sum(1, keepdims=True)
    q /= q.sum(1, keepdims=True)
    ok = p > 0
    kl = np.where(ok, p * (np.log(np.where(ok, p, 1)) - np.log(np.where(ok, q, 1))), 0)
    return float(kl.sum(1).mean())


def _spec(container: str, logprobs: str, vocab: int, k: int, seq_len: int, shard: int):
    return CacheSpec(
        mode="topk",
        vocab_size=vocab,
        seq_len=seq_len,
        pack=True,
        container=container,
        codecs=default_codecs(vocab, logprobs=logprobs, mode="topk"),
        shard_sequences=shard,
        k=k,
        batch_sequences=default_group_sequences(seq_len, shard),  # format 2
    )


def run_storage_bench(
    *,
    n_sequences: int = 32,
    seq_len: int = 2048,
    k: int = 64,
    vocab: int = 151_936,
    shard_sequences: int = 16,
    containers: tuple[str, ...] = ("arrow", "zarr"),
    codecs: tuple[str, ...] = ("lossy", "float16", "float32"),
    workdir: str | None = None,
) -> list[StorageRow]:
    records = synthetic_records(n_sequences, seq_len, k, vocab)
    n_tokens = n_sequences * seq_len
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for container in containers:
            for logprobs in codecs:
                path = os.path.join(tmp, f"{container}-{logprobs}")
                spec = _spec(container, logprobs, vocab, k, seq_len, shard_sequences)
                t0 = time.perf_counter()
                with CacheWriter(path, spec, encode_threads=1) as writer:
                    for j in range(0, n_sequences, shard_sequences):
                        writer.write_shard(j // shard_sequences, records[j : j + shard_sequences])
                    manifest = writer.finish(n_sequences)
                write_s = time.perf_counter() - t0
                reader = CacheReader(path, verify=False)
                t0 = time.perf_counter()
                decoded = list(reader)
                read_s = time.perf_counter() - t0
                fresh = CacheReader(path, verify=False)
                rng = np.random.default_rng(1)
                for i in rng.integers(0, n_sequences, size=4):  # open every shard once first
                    fresh.read(int(i))
                picks = rng.integers(0, n_sequences, size=20)
                t0 = time.perf_counter()
                for i in picks:
                    fresh.read(int(i))
                random_ms = (time.perf_counter() - t0) / len(picks) * 1000
                kl = float(np.mean([kl_exact_vs_decoded(a, b) for a, b in zip(records, decoded)]))
                rows.append(
                    StorageRow(
                        container=container,
                        logprobs=logprobs,
                        bytes_per_token=manifest.bytes / n_tokens,
                        bytes_per_entry=manifest.bytes / manifest.n_entries,
                        write_tokens_per_s=n_tokens / write_s,
                        read_positions_per_s=manifest.n_positions / read_s,
                        random_read_ms=random_ms,
                        kl_nats_per_position=kl,
                    )
                )
    return rows


def format_rows(rows: list[StorageRow]) -> str:
    head = (
        f"{'container':9} {'logprobs':8} {'B/token':>8} {'B/entry':>8} {'write tok/s':>12} "
        f"{'read pos/s':>12} {'1 seq ms':>9} {'KL nats/pos':>12}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.container:9} {r.logprobs:8} {r.bytes_per_token:8.1f} {r.bytes_per_entry:8.3f} "
            f"{r.write_tokens_per_s:12,.0f} {r.read_positions_per_s:12,.0f} "
            f"{r.random_read_ms:9.2f} {r.kl_nats_per_position:12.2e}"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: list[StorageRow]) -> list[dict]:
    return [asdict(r) for r in rows]
