"""``logitcache bench host``: whether the host side of the teacher pass keeps up with a GPU.

In: a vocabulary, a mode (``samples`` N or ``top_k`` K), sequences of ``seq_len`` tokens, the
writer's encoding threads and zstd level. Out: a ``HostBench`` of measured numbers, nothing
asserted.

The forward costs nothing: a synthetic output head makes each chunk's logits from one hidden
state per position: one of 32 Zipf unigrams (random id orders), 24 candidate ids raised by
up to 12 nats and 104 more by 2.5 nats, rounded to bfloat16 like a bf16 teacher's (ties
included). At vocabulary 49,152 that gives 8.2 distinct ids per position at N=16 and 25.6 at
N=64, 17.7 / 45.7 / 247 B/token at N=16 / N=64 / top-128; the real SmolLM2-135M caches of
docs/benchmarks.md hold 9.4 and 27.1 ids, 16.0 / 39.9 / 242.6 B/token.

Everything after the logits is the pass's own code: ``sampled_on_device`` /
``topk_on_device`` (log-softmax, draws or top-k, sort, dedup, counts),
``DeviceTargets.to_host``, ``sequence_record``, and ``CacheWriter`` (record checks, the id
table, the zstd-compressed fields, shard statistics, the container file and its sha256, the
manifest).

Two measurements over the same device results (the device stage runs once, first):
- **stages**: each host stage alone, one thread, in CPU seconds (``time.process_time``).
  Host tokens per CPU second = tokens / the host stages' CPU seconds: the rate one host core
  sustains. The device stage is timed too (the synthetic logits' own making subtracted): on
  this CPU the "device" is the CPU; on a GPU that stage runs there.
- **pipelined**: the host side as the pass runs it, in wall seconds: the main thread's copies
  and records, shard by shard, into the pass's writer stage (``ShardWriter``, a
  ``CacheWriter`` encoding in 1 and in ``encode_threads`` threads): what this machine's
  cores give together, and its CPU seconds per wall second (above 1: threads ran at once).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from logitcache.precompute.packing import PackedSequence
from logitcache.precompute.run import sequence_record
from logitcache.precompute.sparse import (
    DeviceTargets,
    Logits,
    sample_generator,
    sampled_on_device,
    topk_on_device,
)
from logitcache.precompute.writing import ShardWriter
from logitcache.storage import CacheSpec, CacheWriter, SequenceRecord, default_codecs
from logitcache.storage.formats.v2 import FormatV2, default_group_sequences
from logitcache.storage.record import check_record
from logitcache.storage.writer import default_encode_threads, shard_stats

__all__ = ["HostBench", "format_host", "host_as_dict", "run_host_bench", "synthetic_head"]

_TOPICS = 32  # unigrams (random id orders); each position draws one
_ZIPF_S = 1.0  # each unigram: log-prob -log(1 + rank)
_STRONG = 24  # ids per position raised far above its unigram (a context's candidates)
_MAX_BOOST = 12.0  # nats; each position draws its candidates' strength from [0, 12)
_FLAT_IDS = 104  # further ids raised a little: the top-k tail differs between positions
_FLAT = 2.5  # nats
_FLAT_FROM = 64  # their unigram ranks start here
MAIN_STAGES = ("to_host", "records")
"""Host stages on the pass's main thread, between forwards."""
WRITER_STAGES = ("check", "id_table", "encode", "stats", "container")
"""Host stages in the writer (``CacheWriter.write_shard``), beside the main thread."""


@dataclass
class HostBench:
    vocab: int
    mode: str
    per_position: int
    """N (sampled) or k (top-k)."""
    seq_len: int
    sequences: int
    tokens: int
    shard_sequences: int
    encode_threads: int
    zstd_level: int
    distinct_per_position: float = 0.0
    bytes_per_token: float = 0.0
    logits_s: float = 0.0
    """Making the synthetic logits (the forward's stand-in; counted nowhere below)."""
    device_s: float = 0.0
    """Log-softmax, draws or top-k, sort, dedup, counts: on a GPU this runs there."""
    stage_s: dict[str, float] = field(default_factory=dict)
    """Host CPU seconds of each stage, one at a time on one thread."""
    write_shard_s: float = 0.0
    """CPU seconds of ``CacheWriter.write_shard`` with one encode thread (the writer's
    stages above, measured again together: their sum differs by the noise)."""
    pipelined_s: dict[int, float] = field(default_factory=dict)
    """Encode threads -> wall seconds of the host side as the pass runs it (main thread's
    copies and records feeding the writer stage), the device stage done beforehand."""
    pipelined_cpu_s: dict[int, float] = field(default_factory=dict)
    """The same runs' CPU seconds (all threads of the process)."""
    cpus: int = 0
    loadavg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    loadavg_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def main_s(self) -> float:
        return sum(self.stage_s.get(s, 0.0) for s in MAIN_STAGES)

    @property
    def writer_s(self) -> float:
        """``write_shard``'s own CPU seconds (one encode thread), all writer stages."""
        return self.write_shard_s

    @property
    def host_tokens_per_core_s(self) -> float:
        """Tokens per host CPU second, all host stages: one core's sustained rate."""
        return self.tokens / max(self.main_s + self.writer_s, 1e-9)


def synthetic_head(vocab: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """[n, 1] -> [n, V] bfloat16 logits, peaked like a trained LM's (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(_TOPICS)])
    topics = -_ZIPF_S * torch.log1p(ranks.float())  # [M, V] a Zipf unigram per topic
    by_rank = torch.argsort(ranks, dim=1)  # [M, V] id of each rank, per topic
    strong = 0.75 ** torch.arange(_STRONG, dtype=torch.float32)  # [S]
    # log-uniform ranks: the strong candidates anywhere, the flat ones below the head
    low = torch.full((_STRONG + _FLAT_IDS,), math.log(min(_FLAT_FROM, vocab - 1)))
    low[:_STRONG] = 0.0

    def head(states: torch.Tensor) -> torch.Tensor:
        n = states.shape[0]
        topic = torch.randint(0, _TOPICS, (n,), generator=gen)  # [n]
        out = topics[topic]  # [n, V] float32, a copy
        u = torch.rand(n, low.numel(), generator=gen)
        rank = torch.exp(low + u * (math.log(vocab) - low)).long() - 1  # [n, S + F]
        ids = by_rank.reshape(-1)[topic[:, None] * vocab + rank.clamp_(0, vocab - 1)]
        boost = torch.full((n, low.numel()), _FLAT)
        boost[:, :_STRONG] = torch.rand(n, 1, generator=gen) * _MAX_BOOST * strong
        out.scatter_add_(1, ids, boost)
        return out.to(torch.bfloat16)

    return head


def _spec(vocab: int, mode: str, per_position: int, seq_len: int, shard: int, level: int):
    return CacheSpec(
        mode=mode,
        vocab_size=vocab,
        seq_len=seq_len,
        pack=True,
        container="arrow",
        codecs=default_codecs(vocab, mode=mode, zstd_level=level),
        shard_sequences=shard,
        k=per_position if mode == "topk" else None,
        samples=per_position if mode == "sampled" else None,
        batch_sequences=default_group_sequences(seq_len, shard),
    )


def _sequence(index: int, seq_len: int, vocab: int) -> PackedSequence:
    rng = np.random.default_rng(index)
    ids = np.minimum(rng.zipf(1.2, size=seq_len) - 1, vocab - 1).astype(np.int32)
    mask = np.ones(seq_len, dtype=bool)
    mask[0] = False
    return PackedSequence(input_ids=ids, loss_mask=mask, doc_starts=np.zeros(1, np.int32))


class _TimedHead:
    """The synthetic head, with the CPU seconds spent in it (subtracted from the device's)."""

    def __init__(self, vocab: int) -> None:
        self.head, self.seconds = synthetic_head(vocab), 0.0

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        t0 = time.process_time()
        out = self.head(states)
        self.seconds += time.process_time() - t0
        return out


def _on_device(head: _TimedHead, index: int, bench: HostBench) -> DeviceTargets:
    """The device stage of one sequence (its logits made by ``head``)."""
    states = torch.zeros(bench.seq_len, 1)  # [T, 1]: the head ignores them
    logits = Logits(states, bench.seq_len - 1, bench.vocab, head)
    if bench.mode == "topk":
        return topk_on_device(logits, bench.per_position)
    gen = sample_generator(0, index, states.device)
    return sampled_on_device(logits, bench.per_position, gen)


def _clock(bench: HostBench, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its CPU seconds added to ``stage``."""
    t0 = time.process_time()
    out = fn(*args)
    bench.stage_s[stage] = bench.stage_s.get(stage, 0.0) + time.process_time() - t0
    return out


def _device_stage(bench: HostBench) -> list[DeviceTargets]:
    """Every sequence's device stage, its CPU seconds without the logits' making."""
    head = _TimedHead(bench.vocab)
    t0 = time.process_time()
    out = [_on_device(head, index, bench) for index in range(bench.sequences)]
    bench.logits_s = head.seconds
    bench.device_s = time.process_time() - t0 - head.seconds
    return out


def _stages(bench: HostBench, on_device: list[DeviceTargets], spec: CacheSpec, out: str) -> None:
    """Every host stage alone on one thread; the records written once to ``out``."""
    keep = bench.mode == "topk"
    records = []
    for index, targets in enumerate(on_device):
        sparse = _clock(bench, "to_host", targets.to_host)
        seq = _sequence(index, bench.seq_len, bench.vocab)
        records.append(_clock(bench, "records", _record, index, seq, sparse, keep))
    codec = FormatV2(spec).groups
    shards = _shards(records, spec.shard_sequences)
    for shard in shards:
        for r in shard:
            _clock(bench, "check", check_record, spec, r, codec.record_fields, None, True)
        table = _clock(bench, "id_table", codec.make_table, shard)
        rank_to_id = codec.expand_table(table)
        for i in range(0, len(shard), codec.size):
            _clock(bench, "encode", codec.encode, shard[i : i + codec.size], rank_to_id)
        _clock(bench, "stats", shard_stats, shard)
    with CacheWriter(f"{out}-warmup", spec, encode_threads=1) as warm:  # lazy imports
        warm.write_shard(0, shards[0])
    whole = 0.0
    with CacheWriter(out, spec, encode_threads=1) as writer:
        for j, shard in enumerate(shards):
            t0 = time.process_time()
            writer.write_shard(j, shard)
            whole += time.process_time() - t0
        manifest = writer.finish(len(records))
    others = sum(bench.stage_s[s] for s in WRITER_STAGES if s != "container")
    bench.stage_s["container"] = max(0.0, whole - others)  # the rest of write_shard
    bench.write_shard_s = whole
    bench.bytes_per_token = manifest.bytes / bench.tokens
    bench.distinct_per_position = manifest.n_entries / manifest.n_positions


def _record(index: int, seq: PackedSequence, sparse: Any, logprobs: bool) -> SequenceRecord:
    return sequence_record(index, seq, sparse, logprobs=logprobs)


def _shards(records: list[SequenceRecord], size: int) -> list[list[SequenceRecord]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def _pipelined(
    bench: HostBench, on_device: list[DeviceTargets], spec: CacheSpec, out: str, threads: int
) -> float:
    """Wall seconds of the host side as the pass runs it: the main thread's copies and
    records, shard by shard, into the pass's writer stage encoding in ``threads`` threads."""
    keep = bench.mode == "topk"
    t0, cpu0 = time.perf_counter(), time.process_time()
    with CacheWriter(out, spec, encode_threads=threads) as writer:
        with ShardWriter(writer, out) as stage:
            shard: list[SequenceRecord] = []
            for index, targets in enumerate(on_device):
                seq = _sequence(index, bench.seq_len, bench.vocab)
                shard.append(sequence_record(index, seq, targets.to_host(), logprobs=keep))
                if len(shard) == spec.shard_sequences or index == bench.sequences - 1:
                    stage.put(index // spec.shard_sequences, shard)
                    shard = []
        if stage.errors:
            raise stage.errors[0]
        writer.finish(bench.sequences)
    bench.pipelined_cpu_s[threads] = time.process_time() - cpu0
    return time.perf_counter() - t0


def run_host_bench(
    *,
    vocab: int = 152_064,
    samples: int | None = 64,
    top_k: int | None = None,
    seq_len: int = 2048,
    sequences: int = 8,
    shard_sequences: int | None = None,
    encode_threads: int | None = None,
    zstd_level: int | None = None,
    workdir: str | None = None,
) -> HostBench:
    """Measure the host side of the teacher pass on synthetic logits (see the module doc)."""
    import pyarrow  # noqa: F401  (imported before any clock starts)

    mode = "topk" if top_k is not None else "sampled"
    per_position = top_k if top_k is not None else samples
    assert per_position is not None
    shard = shard_sequences or max(1, sequences // 2)
    level = zstd_level if zstd_level is not None else (15 if mode == "sampled" else 9)
    threads = encode_threads or default_encode_threads()
    spec = _spec(vocab, mode, per_position, seq_len, shard, level)
    bench = HostBench(
        vocab=vocab,
        mode=mode,
        per_position=per_position,
        seq_len=seq_len,
        sequences=sequences,
        tokens=sequences * seq_len,
        shard_sequences=shard,
        encode_threads=threads,
        zstd_level=level,
        cpus=os.cpu_count() or 1,
        loadavg_before=os.getloadavg(),
    )
    on_device = _device_stage(bench)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        _stages(bench, on_device, spec, os.path.join(tmp, "stages"))
        for n in sorted({1, threads}):
            path = os.path.join(tmp, f"pipelined-{n}")
            bench.pipelined_s[n] = _pipelined(bench, on_device, spec, path, n)
    bench.loadavg_after = os.getloadavg()
    return bench


def format_host(b: HostBench) -> str:
    what = f"top-{b.per_position}" if b.mode == "topk" else f"sampled N={b.per_position}"
    lines = [
        f"{what}, vocab {b.vocab:,}, {b.sequences} x {b.seq_len} tokens, zstd level "
        f"{b.zstd_level}: {b.distinct_per_position:.1f} ids/position, "
        f"{b.bytes_per_token:.1f} bytes/token",
        f"{'stage':26} {'CPU s':>8} {'tokens/CPU s':>13}",
    ]

    def row(name: str, seconds: float) -> str:
        rate = b.tokens / seconds if seconds > 0 else float("inf")
        return f"{name:26} {seconds:8.3f} {rate:13,.0f}"

    lines.append(row("(logits, not counted)", b.logits_s))
    lines.append(row("device (CPU here)", b.device_s))
    for stage in (*MAIN_STAGES, *WRITER_STAGES):
        lines.append(row(f"host: {stage}", b.stage_s.get(stage, 0.0)))
    lines.append(row("host, main thread", b.main_s))
    lines.append(row("host, writer (write_shard)", b.writer_s))
    lines.append(row("host, all (one core)", b.main_s + b.writer_s))
    for n, wall in sorted(b.pipelined_s.items()):
        cpu = b.pipelined_cpu_s.get(n, 0.0)
        lines.append(
            f"pipelined host side, {n} encode thread{'s' * (n > 1)}: {wall:.3f} s wall = "
            f"{b.tokens / wall:,.0f} tokens/s ({cpu / wall:.2f} CPU s per wall s)"
        )
    lines.append(
        f"({b.cpus} CPUs; load average {b.loadavg_before[0]:.1f} before, "
        f"{b.loadavg_after[0]:.1f} after)"
    )
    return "\n".join(lines)


def host_as_dict(b: HostBench) -> dict[str, Any]:
    return asdict(b) | {
        "main_s": b.main_s,
        "writer_s": b.writer_s,
        "host_tokens_per_core_s": b.host_tokens_per_core_s,
    }
