"""``logitcache bench precompute``: how close the teacher pass comes to the bare teacher.

In: a teacher directory (or a synthetic Llama built here) and a synthetic corpus of random
words. Out: a ``PrecomputeBench`` of measured numbers, nothing asserted.

Both passes run on the SAME batches: the sequences ``iter_sequences`` makes from the
corpus, grouped by shard and batched by the pipeline's own ``_batches``.

- (a) bare forward: ``model(input_ids=..., attention_mask=...).logits`` under
  ``inference_mode`` on those batches, already on the device; synchronized. Run once
  before and once after (b), so drift in machine load shows and averages out.
- (b) pipeline: the teacher is loaded once, outside the clock; then the real ``Pipeline``
  (reader thread tokenizing, teacher + top-k/sampling on the main thread, writer thread
  encoding and publishing shards, the manifest at the end) runs into a temporary cache.
  Its wall time is ``Pipeline.run()`` alone: no model loading, no weight hashing.

The teacher thread's time inside (b) is split into busy (forward + extraction + copy to
host, per shard), blocked on the writer (handing it a shard), the final drain (writer finishing
the last shards, manifest) and the rest, which is waiting on the corpus reader.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from logitcache.toy import ToyModelSpec, llama_config

if TYPE_CHECKING:
    from logitcache.precompute import PrecomputeConfig

__all__ = [
    "BENCH_TEACHER",
    "PrecomputeBench",
    "format_precompute",
    "precompute_as_dict",
    "run_precompute_bench",
    "synthetic_corpus",
    "synthetic_teacher",
    "synthetic_tokenizer",
    "synthetic_words",
]

EOS, PAD, UNK = "<|eos|>", "<|pad|>", "<|unk|>"
_CONSONANTS = "bdfghjklmnprstvwz"
_VOWELS = "aeiou"


BENCH_TEACHER = ToyModelSpec(
    hidden=512,
    layers=4,
    heads=8,
    intermediate=1376,
    max_positions=None,
    vocab_size=32_000,
    tie_embeddings=False,
    init_std=0.1,
)
"""The random teacher of the precompute bench. Init std 0.1 gives logits of std ~0.1 *
sqrt(hidden) = 2.3 nats, peaked like a trained LM's (the transformers default 0.02 gives a
near-uniform distribution); ``max_positions`` is set to the bench's ``seq_len``."""


@dataclass
class PrecomputeBench:
    teacher: str
    device: str
    dtype: str
    threads: int
    teacher_params: int
    vocab: int
    mode: str
    seq_len: int
    sequences: int
    tokens: int
    batch_tokens: int
    batches: int
    shards: int
    load_s: float
    """Loading the teacher (excluded from both throughputs)."""
    bare_forward_s: list[float]
    """(a), once before and once after (b)."""
    bare_tokens_per_s: float
    pipeline_s: float
    pipeline_tokens_per_s: float
    ratio: float
    """(b) / (a); the project's goal is >= 0.97 on a GPU."""
    bytes_per_token: float
    teacher_busy_s: float
    """Forward + top-k/sampling + copy to host, summed over shards (synchronized)."""
    extract_overhead_s: float
    """teacher_busy_s minus the mean bare forward: what the pipeline adds on the main thread."""
    writer_wait_s: float
    """Main thread blocked putting finished shards into the writer's queue."""
    writer_wait_share: float
    drain_s: float
    """After the last put: the writer finishing its queue, then the manifest."""
    reader_wait_s: float
    """The rest of the wall time: the main thread waiting on the corpus reader."""
    pipeline_cpu_s: float
    """CPU seconds of the whole process (every thread) during (b); over ``pipeline_s``, the
    host cores the pass kept busy (on CUDA the main thread's wait for the GPU may spin)."""
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]


# -- synthetic teacher and corpus ---------------------------------------------------------
def synthetic_words(n: int) -> list[str]:
    """``n`` distinct pronounceable words (two or more consonant-vowel syllables)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]  # 85
    base = len(syllables)
    words = []
    for i in range(base, base + n):  # every number >= base has two or more digits
        digits = []
        while i:
            i, d = divmod(i, base)
            digits.append(syllables[d])
        words.append("".join(reversed(digits)))
    return words


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` ids (3 specials + generated words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate([EOS, PAD, UNK, *synthetic_words(vocab_size - 3)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def synthetic_teacher(
    out_dir: str | os.PathLike, shape: ToyModelSpec, *, max_positions: int, seed: int = 0
) -> Path:
    """Save a random Llama of ``shape`` with a word-level tokenizer sized to its vocabulary."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as load_teacher does: no bar for saving shards
    tokenizer = synthetic_tokenizer(shape.vocab_size)
    config = llama_config(replace(shape, max_positions=max_positions), tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


def synthetic_corpus(
    path: str | os.PathLike, words: list[str], n_words: int, *, seed: int = 0
) -> Path:
    """A .txt of one document per line, ``n_words`` words drawn from a Zipf law over ``words``.

    Every word is at least one token for any tokenizer, so the file holds >= n_words tokens.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    p = (ranks + 2.7) ** -1.07  # Zipf-Mandelbrot, roughly natural-language word frequencies
    drawn = rng.permutation(len(words))[rng.choice(len(words), size=n_words, p=p / p.sum())]
    lines, start = [], 0
    while start < n_words:
        n = int(rng.integers(50, 800))  # document lengths in words
        lines.append(" ".join(words[i] for i in drawn[start : start + n]))
        start += n
    out = Path(path)
    out.write_text("\n".join(lines) + "\n")
    return out


# -- the benchmark ------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_pipeline_class():
    """``Pipeline`` plus clocks on the teacher thread (built lazily: nothing at import)."""
    from logitcache.precompute.run import Pipeline

    class TimedPipeline(Pipeline):
        busy_s = 0.0
        cpu_s = 0.0
        put_wait_s = 0.0
        last_put_end: float | None = None
        main_thread: threading.Thread | None = None

        def run(self) -> None:
            self.main_thread = threading.current_thread()
            cpu0 = time.process_time()
            super().run()
            self.cpu_s = time.process_time() - cpu0

        def _teacher_shard(self, work: Any, bar: Any) -> Any:
            t0 = time.perf_counter()
            records = super()._teacher_shard(work, bar)  # host numpy: synchronized
            self.busy_s += time.perf_counter() - t0
            return records

        def _send(self, written: Any, shard: int, records: Any) -> None:
            t0 = time.perf_counter()
            super()._send(written, shard, records)
            self.last_put_end = time.perf_counter()
            self.put_wait_s += self.last_put_end - t0

    return TimedPipeline


def _bare_pass(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
            del logits  # free before the next batch, as the pipeline does
    _sync(device)
    return time.perf_counter() - t0


def _as_tensors(batch: list[tuple[int, Any]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same padded [B, L] int64 ids and mask that ``Pipeline._forward`` builds."""
    lengths = [len(seq.input_ids) for _, seq in batch]
    ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (_, seq) in enumerate(batch):
        ids[row, : lengths[row]] = torch.from_numpy(seq.input_ids.astype(np.int64))
        mask[row, : lengths[row]] = 1
    return ids.to(device), mask.to(device)


def run_precompute_bench(
    *,
    teacher: str | None = None,
    shape: ToyModelSpec = BENCH_TEACHER,
    seq_len: int = 512,
    sequences: int = 16,
    batch_tokens: int = 2048,
    shard_sequences: int | None = None,
    top_k: int | None = 64,
    samples: int | None = None,
    dtype: str | None = None,
    device: str = "auto",
    workdir: str | None = None,
    seed: int = 0,
) -> PrecomputeBench:
    """Measure (a) the bare teacher and (b) the full pipeline on the same batches.

    ``teacher``: a local model directory; None builds a random Llama of ``shape``.
    ``shard_sequences`` defaults to a quarter of ``sequences``, so the writer overlaps.
    ``samples``, if given, selects sampled mode instead of top-``top_k``.
    """
    from transformers import AutoConfig

    from logitcache.models import load_teacher, load_tokenizer
    from logitcache.precompute.run import make_spec

    synthetic = teacher is None
    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-precompute-", dir=workdir) as tmp:
        if teacher is None:
            teacher = str(
                synthetic_teacher(Path(tmp, "teacher"), shape, max_positions=seq_len, seed=seed)
            )
        tokenizer = load_tokenizer(teacher)
        words = synthetic_words(min(shape.vocab_size - 3, 4096) if synthetic else 4096)
        config = _bench_config(
            Path(tmp),
            teacher,
            words,
            seq_len=seq_len,
            sequences=sequences,
            top_k=top_k,
            samples=samples,
            shard_sequences=shard_sequences,
            dtype=dtype,
            device=device,
            batch_tokens=batch_tokens,
            seed=seed,
        )

        t0 = time.perf_counter()
        model, torch_dtype, dev = load_teacher(teacher, dtype=dtype, device=device)
        load_s = time.perf_counter() - t0
        spec = make_spec(config, tokenizer, AutoConfig.from_pretrained(teacher))

        pipe, batches, n_tokens, bare, pipeline_s, t0, manifest = _time_both(
            config, spec, tokenizer, model, dev
        )

    return PrecomputeBench(
        teacher=f"synthetic {_describe(shape)}" if synthetic else teacher,
        device=str(dev),
        dtype=str(torch_dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        teacher_params=sum(p.numel() for p in model.parameters()),
        vocab=spec.vocab_size,
        mode=f"top-{config.top_k}" if config.top_k else f"sampled N={samples}",
        seq_len=seq_len,
        sequences=manifest.n_sequences,
        tokens=n_tokens,
        batch_tokens=batch_tokens,
        batches=len(batches),
        shards=len(manifest.shards),
        load_s=load_s,
        bytes_per_token=manifest.bytes / manifest.n_tokens,
        **_time_split(pipe, bare, pipeline_s, t0, n_tokens),
        loadavg_before=loadavg_before,
        loadavg_after=os.getloadavg(),
    )


def _bench_config(
    tmp: Path,
    teacher: str,
    words: list[str],
    *,
    seq_len: int,
    sequences: int,
    top_k: int | None,
    samples: int | None,
    shard_sequences: int | None,
    **settings: Any,
) -> PrecomputeConfig:
    """The teacher pass of the bench: ``sequences`` x ``seq_len`` tokens of a Zipf corpus of
    ``words`` written into ``tmp``, the cache in ``tmp/cache``; sampled mode where
    ``samples`` is given, shards of a quarter of ``sequences`` by default (the writer
    overlaps)."""
    from logitcache.precompute import CorpusSpec, PrecomputeConfig

    corpus_file = synthetic_corpus(tmp / "corpus.txt", words, sequences * seq_len + 1000)
    corpus = CorpusSpec(data=(str(corpus_file),), seq_len=seq_len, max_tokens=sequences * seq_len)
    return PrecomputeConfig(
        teacher=teacher,
        out=str(tmp / "cache"),
        corpus=corpus,
        top_k=None if samples is not None else top_k,
        samples=samples,
        shard_sequences=shard_sequences or max(1, sequences // 4),
        **settings,
    )


def _time_split(
    pipe: Any, bare: list[float], pipeline_s: float, t0: float, n_tokens: int
) -> dict[str, float]:
    """Where the pipeline's time went, beside the bare teacher's mean pass over the batches:
    the teacher's busy time, the extraction on top of it, waits for the writer and, after
    the last put, the drain (the writer finishing its queue); the rest is reader waits."""
    bare_mean = sum(bare) / len(bare)
    drain_s = pipeline_s - (pipe.last_put_end - t0) if pipe.last_put_end else 0.0
    return {
        "bare_forward_s": bare,
        "bare_tokens_per_s": n_tokens / bare_mean,
        "pipeline_s": pipeline_s,
        "pipeline_tokens_per_s": n_tokens / pipeline_s,
        "ratio": bare_mean / pipeline_s,
        "teacher_busy_s": pipe.busy_s,
        "extract_overhead_s": pipe.busy_s - bare_mean,
        "writer_wait_s": pipe.put_wait_s,
        "writer_wait_share": pipe.put_wait_s / pipeline_s,
        "drain_s": drain_s,
        "reader_wait_s": max(0.0, pipeline_s - pipe.busy_s - pipe.put_wait_s - drain_s),
        "pipeline_cpu_s": pipe.cpu_s,
    }


def _time_both(config, spec, tokenizer, model, dev):
    """(pipeline, batches, tokens, bare pass times, pipeline time, its start, manifest)."""
    from logitcache.core.progress import Reporter
    from logitcache.precompute import PrecomputeResult
    from logitcache.precompute.packing import iter_sequences
    from logitcache.storage import CacheWriter

    size = config.shard_sequences
    result = PrecomputeResult(manifest=None)
    with CacheWriter(config.out, spec) as writer:
        pipe = _make_pipeline_class()(
            config, spec, tokenizer, model, dev, writer, Reporter(enabled=False), result
        )
        seqs = list(enumerate(iter_sequences(config.corpus, tokenizer)))
        # Packed and cut at a multiple of seq_len: no padding in either pass.
        assert all(len(seq.input_ids) == config.corpus.seq_len for _, seq in seqs)
        batches = [
            _as_tensors(batch, dev)
            for j in range(0, len(seqs), size)
            for batch in pipe._batches(seqs[j : j + size])
        ]
        n_tokens = sum(int(mask.sum()) for _, mask in batches)
        _bare_pass(model, batches[:1], dev)  # warm-up: kernels, allocator, caches
        bare = [_bare_pass(model, batches, dev)]
        t0 = time.perf_counter()
        pipe.run()
        pipeline_s = time.perf_counter() - t0
        bare.append(_bare_pass(model, batches, dev))
    manifest = result.manifest
    assert manifest is not None and manifest.n_tokens == n_tokens
    return pipe, batches, n_tokens, bare, pipeline_s, t0, manifest


def _describe(shape: ToyModelSpec) -> str:
    mlp, vocab = shape.intermediate, shape.vocab_size
    return f"Llama {shape.layers}x{shape.hidden} (MLP {mlp}, vocab {vocab:,})"


def format_precompute(r: PrecomputeBench) -> str:
    load = lambda avg: " ".join(f"{x:.2f}" for x in avg)  # noqa: E731
    a = ", ".join(f"{s:.2f}" for s in r.bare_forward_s)
    return "\n".join(
        [
            f"teacher     {r.teacher}: {r.teacher_params / 1e6:.1f}M params, {r.dtype}, "
            f"{r.device}, torch threads {r.threads}",
            f"work        {r.sequences} x {r.seq_len} = {r.tokens:,} tokens, {r.mode}; "
            f"{r.batches} batches (--batch-tokens {r.batch_tokens}), {r.shards} shards",
            f"load        {r.load_s:.2f} s (excluded)",
            f"(a) bare    {r.bare_tokens_per_s:12,.0f} tok/s   forward passes {a} s",
            f"(b) pipe    {r.pipeline_tokens_per_s:12,.0f} tok/s   {r.pipeline_s:.2f} s wall",
            f"ratio b/a   {r.ratio:.3f}   (goal >= 0.97 on a GPU)",
            f"cache       {r.bytes_per_token:.1f} bytes/token",
            f"main thread busy {r.teacher_busy_s:.2f} s (extraction adds "
            f"{r.extract_overhead_s:+.2f} s to the forward), blocked on writer "
            f"{r.writer_wait_s:.2f} s = {r.writer_wait_share:.1%} of wall, "
            f"final drain {r.drain_s:.2f} s, waiting on reader {r.reader_wait_s:.2f} s",
            f"host CPU    {r.pipeline_cpu_s:.2f} s over (b) = "
            f"{r.pipeline_cpu_s / r.pipeline_s:.1f} cores busy (all threads)",
            f"load avg    {load(r.loadavg_before)} before, {load(r.loadavg_after)} after",
        ]
    )


def precompute_as_dict(r: PrecomputeBench) -> dict[str, Any]:
    return asdict(r)
