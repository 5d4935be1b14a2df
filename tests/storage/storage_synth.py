"""Synthetic cache specs and records for the storage tests, and record comparison.

Records are a function of (spec, index, seed) only, so any worker split or rewrite of the
same indices produces byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from logitcache.storage import CacheSpec, SequenceRecord, default_codecs
from logitcache.storage.formats import format_class


def make_spec(
    *,
    mode: str = "topk",
    container: str = "arrow",
    logprobs: str = "lossy",
    vocab_size: int = 1000,
    seq_len: int = 12,
    k: int = 6,
    samples: int = 12,
    sampled_logprobs: bool = False,
    shard_sequences: int = 3,
    teacher: str = "toy-teacher",
    step: float = 1 / 32,
    format_version: int = 2,
    batch_sequences: int | None = None,
) -> CacheSpec:
    """A spec of ``format_version``; format 2 with ``batch_sequences`` (default: the writers')."""
    writers = format_class(format_version).group_sequences(seq_len, shard_sequences)
    if writers is None:  # a version without batches
        batch_sequences = None
    elif batch_sequences is None:
        batch_sequences = writers
    return CacheSpec(
        mode=mode,
        vocab_size=vocab_size,
        seq_len=seq_len,
        pack=True,
        container=container,
        codecs=default_codecs(
            vocab_size, logprobs=logprobs, step=step, format_version=format_version, mode=mode
        ),
        shard_sequences=shard_sequences,
        k=k if mode == "topk" else None,
        samples=samples if mode == "sampled" else None,
        sampled_logprobs=sampled_logprobs,
        teacher={"name_or_path": teacher, "dtype": "float32"},
        tokenizer={"fingerprint": "0" * 64, "eos_token_id": 0},
        corpus={"name": "synthetic"},
        settings={"seed": 0},
        batch_sequences=batch_sequences,
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, the slow obvious way."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def peaked_logprobs(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """[n, vocab] float64 log-softmax of random logits with a few strongly boosted ids."""
    logits = 2.0 * rng.standard_normal((n, vocab))
    for row in logits:
        boosted = rng.integers(0, vocab, size=3)
        row[boosted] += rng.uniform(3.0, 9.0, size=3)
    return log_softmax(logits)


def seq_length(spec: CacheSpec, index: int) -> int:
    """Lengths cycle through 2, seq_len and values between, so every size appears."""
    cycle = [2, spec.seq_len, 3, spec.seq_len - 1, (spec.seq_len + 2) // 2]
    return min(max(cycle[index % len(cycle)], 2), spec.seq_len)


def make_record(spec: CacheSpec, index: int, seed: int = 0) -> SequenceRecord:
    rng = np.random.default_rng([seed, index])
    v, t = spec.vocab_size, seq_length(spec, index)
    lp_dense = peaked_logprobs(rng, t - 1, v)  # [T-1, V] float64
    # The vocabulary edge must survive: make id V-1 the favourite at position 0.
    lp_dense[0] = log_softmax(np.where(np.arange(v) == v - 1, 12.0, lp_dense[0]))
    input_ids = rng.integers(0, v, size=t).astype(np.uint32)
    input_ids[-1] = v - 1
    n_docs = int(rng.integers(1, min(t, 3) + 1))
    doc_starts = np.sort(rng.choice(np.arange(1, t), size=n_docs - 1, replace=False))
    doc_starts = np.concatenate([[0], doc_starts]).astype(np.uint32)
    ids, lps, counts, n_entries, tails = [], [], [], [], []
    for row in lp_dense:
        p = np.exp(row)
        if spec.mode == "topk":
            top = np.argpartition(-row, spec.k - 1)[: spec.k]
            top = top[np.argsort(-row[top], kind="stable")]
            ids.append(top)
            lps.append(row[top])
            n_entries.append(len(top))
            tails.append(max(0.0, 1.0 - p[top].sum()))
        else:
            draws = rng.choice(v, size=spec.samples, p=p / p.sum())
            uniq, cnt = np.unique(draws, return_counts=True)
            order = np.argsort(-row[uniq], kind="stable")  # by teacher probability
            uniq, cnt = uniq[order], cnt[order]
            ids.append(uniq)
            lps.append(row[uniq])
            counts.append(cnt)
            n_entries.append(len(uniq))
            tails.append(max(0.0, 1.0 - p[uniq].sum()))
    has_logprobs = spec.mode == "topk" or spec.sampled_logprobs
    return SequenceRecord(
        index=index,
        input_ids=input_ids,
        loss_mask=rng.random(t) < 0.7,
        doc_starts=doc_starts,
        ids=np.concatenate(ids).astype(np.uint32),
        n_entries=np.asarray(n_entries, dtype=np.int32),
        tail_mass=np.asarray(tails, dtype=np.float32),
        logprobs=np.concatenate(lps).astype(np.float32) if has_logprobs else None,
        counts=np.concatenate(counts).astype(np.uint8) if spec.mode == "sampled" else None,
    )


def make_records(spec: CacheSpec, start: int, stop: int, seed: int = 0) -> list[SequenceRecord]:
    return [make_record(spec, i, seed) for i in range(start, stop)]


def shard_records(spec: CacheSpec, shard: int, n_total: int, seed: int = 0):
    first = shard * spec.shard_sequences
    return make_records(spec, first, min(first + spec.shard_sequences, n_total), seed)


def write_cache(path, spec: CacheSpec, n_total: int, seed: int = 0):
    """Write all shards of an n_total-sequence cache with one worker; returns the records."""
    from logitcache.storage import CacheWriter

    records = make_records(spec, 0, n_total, seed)
    s = spec.shard_sequences
    with CacheWriter(path, spec) as writer:
        for j in range(-(-n_total // s)):
            writer.write_shard(j, records[j * s : (j + 1) * s])
        writer.finish(n_total)
    return records


def logprob_tolerance(spec: CacheSpec, exact: np.ndarray) -> np.ndarray:
    """Per-value |decoded - exact| bound for the spec's logprob codec."""
    config = spec.codecs["logprobs"][0]
    if config["id"] == "logitcache.logprob":
        return config["step"] / 2 + np.spacing(np.abs(exact).astype(np.float32))
    if config["dtype"] == "float16":
        return np.abs(exact) * 2.0**-11 + 2.0**-25
    return np.zeros_like(exact)


def by_id(r: SequenceRecord) -> SequenceRecord:
    """``r`` with the entries of each position in increasing id order (a sampled position is
    a set: format 2 stores it in another order than the writer's)."""
    pos = np.repeat(np.arange(r.n_positions), r.n_entries)
    order = np.lexsort((r.ids, pos))
    pick = {
        n: getattr(r, n)[order] for n in ("ids", "logprobs", "counts") if getattr(r, n) is not None
    }
    return dataclasses.replace(r, **pick)


def assert_records_match(spec: CacheSpec, got: SequenceRecord, want: SequenceRecord) -> None:
    """Every field: exact for integers and masks, codec tolerance for floats."""
    assert got.index == want.index
    if spec.mode == "sampled":
        got, want = by_id(got), by_id(want)
    for name in ("input_ids", "loss_mask", "doc_starts", "ids", "n_entries"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    if spec.mode == "sampled":
        np.testing.assert_array_equal(got.counts, want.counts)
    else:
        assert got.counts is None
    if spec.mode == "topk" or spec.sampled_logprobs:
        assert got.logprobs.dtype == np.float32
        err = np.abs(got.logprobs.astype(np.float64) - want.logprobs)
        assert (err <= logprob_tolerance(spec, want.logprobs)).all()
    else:
        assert got.logprobs is None
    if spec.format_version == 2 and spec.mode == "sampled" and not spec.sampled_logprobs:
        assert got.tail_mass is None  # the counts target does not read it: not stored
        return
    tail_err = np.abs(got.tail_mass.astype(np.float64) - want.tail_mass)
    assert (tail_err <= np.abs(want.tail_mass) * 2.0**-11 + 2.0**-25).all()


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under root (relative POSIX path -> content), to prove nothing changed."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
