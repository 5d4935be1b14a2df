"""Cross-tokenizer records: conversion speed and coverage, per student tokenizer.

In: a cache (its stored tokenizer is the teacher's), a text corpus, and student tokenizers
(directories or hub ids on this machine). Out: one markdown row per (student tokenizer,
method): teacher positions converted per wall second and per CPU second (the corpus packed
into rows of ``--seq-len`` teacher tokens, one document per blank-line block, with a k=32
support per position), bytes per token of both tokenizers, the share of trained student
positions aligned, and the share of the cache's stored teacher mass mapped exactly and by
any rule (from the cache's own records).

    python benchmarks/cross_tokenizer_alignment.py --cache CACHE --corpus tiny.txt \\
        --student-tokenizer DIR [--student-tokenizer DIR2 ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def packed_records(teacher, text: str, seq_len: int, k: int = 32) -> list:
    """The corpus as cache records of ``seq_len`` teacher tokens, EOS after each document."""
    from logitcache.storage import SequenceRecord

    eos = teacher.eos_token_id
    ids: list[int] = []
    starts: list[int] = []
    for doc in (d for d in text.split("\n\n") if d.strip()):
        starts.append(len(ids))
        ids += teacher(doc, add_special_tokens=False)["input_ids"] + [eos]
    row_ids, doc_starts = np.asarray(ids, dtype=np.uint32), np.asarray(starts)
    rng, out = np.random.default_rng(0), []
    for i in range(0, len(row_ids) - seq_len, seq_len):
        r = row_ids[i : i + seq_len]
        ds = (doc_starts[(doc_starts >= i) & (doc_starts < i + seq_len)] - i).astype(np.uint32)
        support = rng.integers(0, len(teacher), size=(seq_len - 1, k)).astype(np.uint32)
        support[:, 0] = r[1:]  # the true next token among them
        logprobs = np.full((seq_len - 1, k), np.log(1 / (k + 8)), dtype=np.float32)
        out.append(
            SequenceRecord(
                0,
                r,
                np.ones(seq_len, bool),
                ds,
                support.reshape(-1),
                np.full(seq_len - 1, k, np.int32),
                np.full(seq_len - 1, 8 / (k + 8), np.float32),
                logprobs=logprobs.reshape(-1),
            )
        )
    return out


def measure(teacher, student, method: str, records: list, cached: list) -> dict:
    from logitcache.train.crosstok import CrossStats, CrossTokenizer
    from logitcache.train.dataset import example_of

    start = time.perf_counter()
    cross = CrossTokenizer(teacher, student, method=method, max_tokens=1 << 16)
    setup = time.perf_counter() - start
    wall, cpu = time.perf_counter(), time.process_time()
    for r in records:
        cross.example(r, example_of(r))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    speed = cross.stats.as_dict()
    cross.stats = CrossStats()
    for r in cached:
        cross.example(r, example_of(r))
    real = cross.stats.as_dict()
    n = sum(r.n_tokens for r in records)
    return {"setup_s": setup, "wall": n / wall, "cpu": n / cpu, "speed": speed, "real": real}


def main() -> None:
    from transformers import AutoTokenizer

    from logitcache.storage import CacheReader
    from logitcache.storage.tokenizer import stored_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--student-tokenizer", action="append", required=True)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    args = parser.parse_args()
    teacher, _ = stored_tokenizer(args.cache)
    reader = CacheReader(args.cache)
    cached = [reader.read(int(i)) for i in reader.sequence_indices()[:64]]
    with open(args.corpus, encoding="utf-8") as fh:
        text = fh.read(args.max_chars)
    records = packed_records(teacher, text, args.seq_len)
    print(
        f"{len(records)} rows of {args.seq_len} teacher tokens; cache {args.cache}: "
        f"{reader.spec.mode}, {len(cached)} sequences\n"
    )
    print(
        "| student tokenizer | V | method | pos/s wall | pos/CPU-s | bytes/tok student, "
        "teacher | aligned (corpus) | aligned (cache) | stored mass exact | mapped | "
        "student token longer (cache) | of them chained |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.student_tokenizer:
        student = AutoTokenizer.from_pretrained(name)
        for method in ("exact", "prefix", "chain"):
            m = measure(teacher, student, method, records, cached)
            s, r = m["speed"], m["real"]
            print(
                f"| {name} | {len(student):,} | {method} | {m['wall']:,.0f} | {m['cpu']:,.0f} | "
                f"{s['bytes_per_student_token']:.2f}, {s['bytes_per_teacher_token']:.2f} | "
                f"{s['aligned_share']:.3f} | {r['aligned_share']:.3f} | "
                f"{r['exact_support_share']:.3f} | {r['mapped_support_share']:.3f} | "
                f"{r['longer_share']:.3f} | {r['chained_share']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
