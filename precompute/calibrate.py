"""Sampled mode's N from a byte budget: ``logitcache precompute --bytes-per-token B``.

In: a ``PrecomputeConfig`` with ``bytes_per_token``, its tokenizer, and the teacher pass's own
pipeline for a given N (``run.Pipeline``: its batching, forward and extraction). Out: a
``Calibration``, the largest N in 1..255 whose cache fits B bytes per token on a sample of the
corpus's sequences, with every (N, bytes per token) measured on the way.

How: the corpus is read and packed as the pass reads it (the same iterator, so the same
sequences under the same indices) up to its first ``CALIBRATION_WINDOW`` sequences; about
``CALIBRATION_TOKENS`` tokens of them, evenly spaced, are the sample. The teacher runs once
over the sample and its logits stay in memory. For each candidate N the records are built as
the pass builds them (the same ``sampled_targets``, and the same per-sequence generator and
seed: the very draws the pass will store for those sequences) and written with the real
``CacheWriter`` into a temporary local directory, in the config's format version and
container: framing, the id table and compression are measured, not estimated.

Why spaced, not the first sequences: a corpus of files in order is not alike from end to end.
On the real-teacher study's caches (SmolLM2-135M, 160 sequences of 256, docs/benchmarks.md)
the first 32 sequences of the Python corpus wrote 17-29 % fewer bytes per token than the whole
cache (N=8..64), every fifth sequence 2-10 % more.

Why each N is written twice: a shard's bytes per token fall with its size (per shard, the
format 2 id table is learnt from fewer ids and zstd starts each field afresh). The 32-sequence
sample written as one shard measured 5 % (prose) and 4 % (code) more bytes per token than the
real caches of 256-sequence shards, enough to cost prose one draw. Across shard sizes bytes per
token is close to linear in shards per sequence (x): on those caches a + b*x from shards of 16
and 32 predicted shards of 256 within 0.6 % (docs/benchmarks.md, "Choosing N from a byte
budget"). So each N is written as the sample in the pass's shards (one, for a sample under a
shard) and in shards of half that, and bytes per token is read off that line at the cache's
own x: its sequences over its shards where the whole corpus is inside the window, full shards
otherwise.
A cache made this way is an ordinary ``--samples N`` cache: its spec and recipe record N, not
the budget. Where the output already holds a cache (a resume, a complete cache, or other
workers' parts), N is read from it and nothing is calibrated (``samples_in_cache``).

Workers (``num_workers > 1``) that start together each calibrate on the same sequences, so on
identical hardware they choose the same N. On hardware that computes the teacher differently
they might not: ``CacheWriter`` refuses to add shards of another N to a cache, and
``check_workers_agree`` names the disagreement after the pass; rerun every worker with
``--samples N`` then.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from logitcache.core.errors import LogitcacheError
from logitcache.storage import CacheSpec, CacheWriter, Location, SequenceRecord, read_manifest
from logitcache.storage.writer import PARTS, part_names, stored_manifests

from .config import PrecomputeConfig
from .packing import iter_sequences

__all__ = [
    "CALIBRATION_TOKENS",
    "CALIBRATION_WINDOW",
    "Calibration",
    "calibrate",
    "calibration_sequences",
    "check_workers_agree",
    "predict_bytes",
    "samples_in_cache",
]

CALIBRATION_TOKENS = 8192
"""The sample's size: this many tokens of sequences (32 at --seq-len 256, 4 at 2048; fewer if
the corpus has fewer). Their logits are kept in memory: 8,192 x 49,152 float32 = 1.6 GB at
SmolLM2's vocabulary, 2.5 GB in bfloat16 at Qwen's 151,936. Per shard a cache pays a fixed
cost (framing, the format 2 id table) that a smaller sample would weigh more heavily."""
CALIBRATION_WINDOW = 1024
"""The sample is spread over the corpus's first this many sequences (4 shards of 256): they
are read and packed, not run through the teacher (2M tokens at --seq-len 2048)."""
_MAX_SAMPLES = 255  # the format's limit on N (counts are uint8)


class TeacherPass(Protocol):
    """What calibration uses of the teacher pass's pipeline (``run.Pipeline``)."""

    spec: CacheSpec

    def forward(self, sequences: list[tuple[int, Any]]) -> Iterator[tuple[list, torch.Tensor]]:
        """(sub-batch, its logits [B, W, V]) over (index, PackedSequence) pairs."""
        ...

    def records(self, part: list[tuple[int, Any]], logits: torch.Tensor) -> list[SequenceRecord]:
        """The records the pass writes for a sub-batch, from its logits [B, W, V]."""
        ...


@dataclass(frozen=True)
class Calibration:
    """The N chosen for a byte budget, and what was measured to choose it."""

    samples: int
    """The chosen N: the largest measured N whose cache fits the budget."""
    budget: float
    """The budget, in bytes per token."""
    measured: tuple[tuple[int, float], ...]
    """(N, predicted bytes per token of the cache) of every N written, in the order tried."""
    n_sequences: int
    """Sequences calibrated on..."""
    window: int
    """...evenly spaced over the corpus's first this many."""
    n_positions: int
    """Positions (next-token targets) calibrated on."""
    shard_sequences: int
    """The cache's shards, that bytes per token is predicted for (``predict_bytes``)."""

    def summary(self) -> str:
        """One line for the log, e.g. ``--bytes-per-token 16: calibrated on 32 of the first
        1,024 sequences (8,160 positions) for shards of 256: N=28 -> 15.83 B/token (N=29:
        16.21); --samples 28``."""
        size = dict(self.measured)
        above = size.get(self.samples + 1)
        more = f" (N={self.samples + 1}: {above:.2f})" if above is not None else ""
        return (
            f"--bytes-per-token {self.budget:g}: calibrated on {self.n_sequences} of the first "
            f"{self.window:,} sequences ({self.n_positions:,} positions) for shards of "
            f"{self.shard_sequences}: N={self.samples} -> "
            f"{size[self.samples]:.2f} "
            f"B/token{more}; --samples {self.samples}"
        )


def calibrate(
    config: PrecomputeConfig, tokenizer: Any, teacher_pass: Callable[[int], TeacherPass]
) -> Calibration:
    """The largest N whose cache fits ``config.bytes_per_token``; see the module docstring.

    ``teacher_pass(n)``: the pass's pipeline writing N draws per position (its spec with
    ``samples=n``). Raises LogitcacheError if even N=1 does not fit.
    """
    budget = config.bytes_per_token
    assert budget is not None, "calibrate needs a config with bytes_per_token"
    sequences, window = calibration_sequences(config, tokenizer)
    per_shard = config.shard_sequences
    # The cache's shards per sequence: the whole corpus is known when it ends inside the window.
    cache_x = -(-window // per_shard) / window if window < CALIBRATION_WINDOW else 1 / per_shard
    forwarded = list(teacher_pass(1).forward(sequences))  # the logits every N draws from
    measured: dict[int, float] = {}
    # Bisection over 1..255 for the largest N that fits: lo fits (0: none yet), hi does not
    # (256: beyond the format). Bytes grow with N in practice (more draws, more distinct ids,
    # larger counts), so eight writes find it; the answer is the largest measured N that fit.
    lo, hi = 0, _MAX_SAMPLES + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measured[mid] = predict_bytes(teacher_pass(mid), forwarded, cache_x)
        lo, hi = (mid, hi) if measured[mid] <= budget else (lo, mid)
    fits = [n for n, size in measured.items() if size <= budget]
    n_positions = sum(len(seq.input_ids) - 1 for _, seq in sequences)
    if not fits:
        smallest = min(measured.values())
        raise LogitcacheError(
            f"--bytes-per-token {budget:g} is below the smallest sampled cache: N=1 takes "
            f"{smallest:.2f} bytes per token (calibrated on {len(sequences)} sequences of the "
            "corpus); raise the budget"
        )
    return Calibration(
        samples=max(fits),
        budget=budget,
        measured=tuple(measured.items()),
        n_sequences=len(sequences),
        window=window,
        n_positions=n_positions,
        shard_sequences=per_shard,
    )


def calibration_sequences(
    config: PrecomputeConfig, tokenizer: Any
) -> tuple[list[tuple[int, Any]], int]:
    """(index, PackedSequence) of the sample, CALIBRATION_TOKENS // --seq-len sequences evenly
    spaced over the first CALIBRATION_WINDOW (the whole corpus if smaller), indexed as the pass
    indexes them; and how many sequences it was spread over."""
    window = list(itertools.islice(iter_sequences(config.corpus, tokenizer), CALIBRATION_WINDOW))
    count = min(max(1, CALIBRATION_TOKENS // config.corpus.seq_len), len(window))
    picked = (j * len(window) // count for j in range(count))
    return [(i, window[i]) for i in picked], len(window)


def predict_bytes(
    teacher_pass: TeacherPass, forwarded: list[tuple[list, torch.Tensor]], cache_x: float
) -> float:
    """Bytes per token of a cache with ``cache_x`` shards per sequence, from the records
    ``teacher_pass`` makes of the forwarded sequences written in two shard sizes: the pass's
    (capped at the sample) and half that; the line through both, read at ``cache_x``. Where the
    two layouts coincide (a one-sequence sample or shard) the one measurement is the answer."""
    records = sorted(
        (record for part, logits in forwarded for record in teacher_pass.records(part, logits)),
        key=lambda record: record.index,
    )
    spec = teacher_pass.spec
    full = min(spec.shard_sequences, len(records))
    x_full, y_full = measure(spec, records, full)
    if full == 1 or cache_x == x_full:
        return y_full
    x_half, y_half = measure(spec, records, -(-full // 2))
    slope = max(0.0, (y_half - y_full) / (x_half - x_full))  # fewer shards never cost bytes
    return y_full + slope * (cache_x - x_full)


def measure(spec: CacheSpec, records: list[SequenceRecord], per_shard: int) -> tuple[float, float]:
    """(shards per sequence, bytes per token) of ``records`` written for real into a temporary
    directory in shards of ``per_shard``, renumbered from 0 (a shard holds consecutive
    sequences)."""
    records = [replace(record, index=i) for i, record in enumerate(records)]
    batch = spec.batch_sequences and min(spec.batch_sequences, per_shard)  # None in format 1
    spec = replace(spec, shard_sequences=per_shard, batch_sequences=batch)
    with (
        tempfile.TemporaryDirectory(prefix="logitcache-calibrate-") as tmp,
        CacheWriter(tmp, spec) as writer,
    ):
        for first in range(0, len(records), per_shard):
            writer.write_shard(first // per_shard, records[first : first + per_shard])
        size = writer.manifest.stats()["bytes_per_token"]
    assert size is not None, "calibration wrote no tokens"
    return -(-len(records) // per_shard) / len(records), size


def samples_in_cache(config: PrecomputeConfig) -> int | None:
    """The N of the sampled cache already at ``config.out`` (its manifest, else a worker's
    part), or None where there is none yet."""
    main, parts = stored_manifests(Location(config.out))
    specs = [m.spec for m in ([main] if main else []) + parts]
    if not specs:
        return None
    if specs[0].mode != "sampled":
        raise LogitcacheError(
            f"{config.out} already holds a top-k cache (k={specs[0].k}); --bytes-per-token "
            "makes a sampled one: use another --out"
        )
    return specs[0].samples


def check_workers_agree(config: PrecomputeConfig) -> None:
    """Refuse, naming both, when another worker's part records another N than this one's."""
    loc = Location(config.out)
    for name in part_names(loc):
        other = read_manifest(loc, f"{PARTS}/{name}").spec.samples
        if other != config.samples:
            raise LogitcacheError(
                f"workers calibrated --bytes-per-token to different N ({config.samples} here, "
                f"{other} in {PARTS}/{name}): their hardware computes the teacher differently; "
                f"delete {config.out} and run every worker with the same --samples N"
            )
