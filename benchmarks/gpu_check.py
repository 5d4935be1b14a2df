"""The one-call GPU check: what the first GPU machine should measure, in one table.

Run by ``bash benchmarks/gpu_check.sh`` (one H100: under 8 minutes; nothing is downloaded:
the teachers and students are random, of the real shapes, built from transformers configs).
``--device cpu`` runs the same steps at tiny sizes (the test that keeps this script working,
tests/benchmarks/test_gpu_check.py); its numbers mean nothing.

Rows, each from the product's own benchmark code (``logitcache.bench``):

- P2, per teacher (SmolLM2-135M's shape, Qwen2.5-1.5B's): the teacher pass
  (``Pipeline.run``: reader thread, teacher + sampling, writer thread) against the bare
  forward over the same batches, bf16, sampled N=64 (the default mode); goal >= 0.97.
- host side, per teacher: where the pass's main thread spends the wall time beside the
  forward: extraction on top of the forward, blocked on the writer, waiting on the reader;
  and the process's CPU seconds per wall second over the pass (cores busy).
- train: one optimizer step of a SmolLM2-135M-shaped student from a cache (forward KL,
  targets from the cache the teacher pass wrote) against cross-entropy only, bf16 autocast.
- FSDP on one GPU: ``--fsdp`` with one rank against DDP (``bench memory``'s step), per
  step and peak memory.
- peak GPU memory of each row (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.bench.precompute import run_precompute_bench, synthetic_tokenizer
from logitcache.bench.train import run_variant
from logitcache.bench.train_memory import run_memory_bench
from logitcache.bench.variant import build_model

SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49_152,
    "hidden_size": 576,
    "intermediate_size": 1_536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8_192,
    "tie_word_embeddings": True,
}
"""HuggingFaceTB/SmolLM2-135M's config.json, the fields that set its cost."""
QWEN25_15B = {
    "model_type": "llama",  # Qwen2's layout but its q/k/v biases (0.01% of the FLOPs)
    "vocab_size": 151_936,
    "hidden_size": 1_536,
    "intermediate_size": 8_960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "tie_word_embeddings": True,
}
"""Qwen/Qwen2.5-1.5B's config.json, the fields that set its cost, as a Llama: under
transformers 5 a ``qwen2`` model directory loads Qwen2's own tokenizer class whatever
tokenizer is saved beside it, and the bench's word-level one would tokenize nothing."""
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
"""``--device cpu``: the same families at a size that runs in seconds."""


@dataclass(frozen=True)
class Sizes:
    """How much work each row does: one H100, or the CPU test."""

    seq_len: int
    teacher_sequences: int
    batch_tokens: int
    train_batch: int
    train_steps: int
    warmup: int


GPU_SIZES = Sizes(
    seq_len=2048,
    teacher_sequences=128,
    batch_tokens=16_384,
    train_batch=4,
    train_steps=10,
    warmup=2,
)
CPU_SIZES = Sizes(
    seq_len=64, teacher_sequences=8, batch_tokens=256, train_batch=2, train_steps=2, warmup=1
)


@dataclass
class Row:
    check: str
    model: str
    value: str
    detail: str
    peak_gib: float | None = None


def teacher_configs(tiny: bool) -> dict[str, dict[str, Any]]:
    """The two teachers' configs (shrunk for the CPU test: vocabularies 4,352 and 8,192,
    above the 4,096 words of the bench corpus).

    Init std ``2.3 / sqrt(hidden)``: the tied head then gives logits of std ~2.3 nats,
    peaked like a trained LM's (transformers' 0.02 gives near-uniform ones, which would
    make sampled mode store several times more distinct ids per position than it does)."""
    configs = {"SmolLM2-135M": dict(SMOLLM2_135M), "Qwen2.5-1.5B": dict(QWEN25_15B)}
    if tiny:
        configs["SmolLM2-135M"].update(TINY, vocab_size=4_352)
        configs["Qwen2.5-1.5B"].update(TINY, vocab_size=8_192)
    for config in configs.values():
        config["initializer_range"] = 2.3 / config["hidden_size"] ** 0.5
    return configs


def save_teacher(config: dict[str, Any], out: Path, device: torch.device) -> Path:
    """A random model of ``config`` in bfloat16 (float32 on CPU) with a word-level tokenizer
    of its vocabulary; built on ``device`` (a 1.5B model initializes in seconds on a GPU)."""
    tokenizer = synthetic_tokenizer(config["vocab_size"])
    config = {
        **config,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    with torch.device(device):
        model = build_model(config, seed=0)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    del model
    return out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def check_teacher(name: str, teacher: Path, sizes: Sizes, device: torch.device) -> list[Row]:
    """P2 and the host side of one teacher: ``bench precompute`` with this teacher."""
    _peak_reset(device)
    r = run_precompute_bench(
        teacher=str(teacher),
        seq_len=sizes.seq_len,
        sequences=sizes.teacher_sequences,
        batch_tokens=sizes.batch_tokens,
        samples=64,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        device=str(device),
    )
    cores = r.pipeline_cpu_s / r.pipeline_s
    peak = _peak_gib(device)
    bare = sum(r.bare_forward_s) / len(r.bare_forward_s)
    share = lambda s: f"{s / r.pipeline_s:.0%}"  # noqa: E731
    return [
        Row(
            "P2: pass / bare forward (goal >= 0.97)",
            name,
            f"{r.ratio:.3f}",
            f"pass {r.pipeline_tokens_per_s:,.0f} tok/s, bare {r.bare_tokens_per_s:,.0f} tok/s; "
            f"{r.tokens:,} tokens, {r.mode}, {r.dtype}, {r.bytes_per_token:.1f} B/token",
            peak,
        ),
        Row(
            "host side of the pass",
            name,
            f"{cores:.1f} cores busy",
            f"main thread: forward {share(bare)}, extraction {share(r.extract_overhead_s)}, "
            f"blocked on writer {share(r.writer_wait_s)}, drain {share(r.drain_s)}, waiting "
            f"on reader {share(r.reader_wait_s)} of {r.pipeline_s:.2f} s",
        ),
    ]


def make_cache(teacher: Path, out: Path, sizes: Sizes, device: torch.device) -> str:
    """The cache the student trains from: ``train_batch x (steps + warmup)`` sequences."""
    from logitcache.bench.precompute import synthetic_corpus, synthetic_words
    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute

    n = sizes.train_batch * (sizes.train_steps + sizes.warmup)
    corpus = synthetic_corpus(out.with_suffix(".txt"), synthetic_words(1000), n * sizes.seq_len)
    spec = CorpusSpec(data=(str(corpus),), seq_len=sizes.seq_len, max_tokens=n * sizes.seq_len)
    dtype = "bfloat16" if device.type == "cuda" else None
    config = PrecomputeConfig(
        teacher=str(teacher),
        out=str(out),
        corpus=spec,
        samples=64,
        shard_sequences=n,
        dtype=dtype,
        device=str(device),
    )
    run_precompute(config)
    return str(out)


def check_train(
    name: str, config: dict[str, Any], cache: str, work: Path, sizes: Sizes, device: torch.device
) -> list[Row]:
    """One step from the cache (forward KL) against cross-entropy only: ``bench train``'s
    step (bf16 autocast on CUDA), this student, in this process."""
    student = work / "student.json"
    student.write_text(json.dumps(config))  # transformers' init (0.02), not the teacher's
    job = {
        "cache": cache,
        "student_config": str(student),
        "teacher": "",
        "seed": 0,
        "steps": sizes.train_steps,
        "warmup": sizes.warmup,
        "batch_size": sizes.train_batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    ce = run_variant({**job, "variant": "ce"})
    kd = run_variant({**job, "variant": "offline-kd"})
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    rows = [
        Row(
            "train step: offline KD / CE only",
            name,
            f"{kd.step_s / ce.step_s:.2f}x",
            f"offline {kd.step_s * 1e3:,.0f} ms ({kd.tokens_per_s:,.0f} tok/s), CE "
            f"{ce.step_s * 1e3:,.0f} ms; {sizes.train_batch} x {sizes.seq_len} tokens, "
            f"median of {sizes.train_steps}",
            gib(kd.peak_bytes),
        ),
    ]
    if ce.peak_bytes is not None:
        rows.append(
            Row(
                "train step: CE only (peak)",
                name,
                f"{ce.step_s * 1e3:,.0f} ms",
                "the offline row's baseline",
                gib(ce.peak_bytes),
            )
        )
    return rows


def check_fsdp(name: str, config: dict[str, Any], sizes: Sizes, device: torch.device) -> list[Row]:
    """``--fsdp`` on one rank against DDP: ``bench memory``'s step, each under a torchrun of
    one process (on CPU FSDP alone: each launch costs seconds of imports)."""
    bench = run_memory_bench(
        student_config=config,
        nproc=1,
        seq_len=sizes.seq_len,
        batch_sizes=(sizes.train_batch,),
        steps=sizes.train_steps,
        warmup=sizes.warmup,
        device=str(device),
        variants=("ddp", "fsdp") if device.type == "cuda" else ("fsdp",),
    )
    runs = {run.variant: run for run in bench.runs}
    fsdp, ddp = runs["fsdp"], runs.get("ddp")
    gib = lambda run: run.peak_bytes / 2**30  # noqa: E731
    kind = "GPU" if device.type == "cuda" else "RSS"
    detail = f"fsdp {fsdp.step_s * 1e3:,.0f} ms, peak {kind} {gib(fsdp):.2f} GiB"
    if ddp is None:
        value = f"{fsdp.step_s * 1e3:,.0f} ms"
    else:
        value = f"{fsdp.step_s / ddp.step_s:.2f}x"
        detail += f"; ddp {ddp.step_s * 1e3:,.0f} ms, peak {kind} {gib(ddp):.2f} GiB"
    detail += f"; {sizes.train_batch} x {sizes.seq_len} tokens, median of {sizes.train_steps}"
    peak = gib(fsdp) if device.type == "cuda" else None
    return [Row("FSDP on one GPU / DDP, step", name, value, detail, peak)]


def format_table(rows: list[Row], header: str) -> str:
    """One markdown table (paste it into docs/benchmarks.md as is)."""
    peak = lambda g: "-" if g is None else f"{g:.1f}"  # noqa: E731
    lines = [
        header,
        "",
        "| check | model | value | peak GPU GiB | detail |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.check} | {r.model} | {r.value} | {peak(r.peak_gib)} | {r.detail} |" for r in rows
    ]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"{name}, {os.cpu_count()} CPUs; torch {torch.__version__}, transformers "
        f"{transformers.__version__}"
    )


def run_checks(device: torch.device, work: Path) -> list[Row]:
    """Every row, timed, in the order of the table; one line of progress per step."""
    tiny = device.type == "cpu"
    sizes = CPU_SIZES if tiny else GPU_SIZES
    configs = teacher_configs(tiny)
    rows: list[Row] = []
    start = time.perf_counter()
    say = lambda what: print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)  # noqa: E731
    for name, config in configs.items():
        say(f"{name}: building a random teacher")
        teacher = save_teacher(config, work / name, device)
        say(f"{name}: teacher pass and bare forward")
        rows += check_teacher(name, teacher, sizes, device)
    student_name = "SmolLM2-135M"
    student = {k: v for k, v in configs[student_name].items() if k != "initializer_range"}
    say("train steps from a cache")
    cache = make_cache(work / student_name, work / "cache", sizes, device)
    _peak_reset(device)
    rows += check_train(student_name, student, cache, work, sizes, device)
    say("FSDP on one rank")
    rows += check_fsdp(student_name, student, sizes, device)
    say("done")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny sizes)")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--workdir", default=None, help="Where the temporary models go.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --device cpu runs the tiny sizes", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if device.index is not None:  # cuda:N; plain cuda is the current device
            torch.cuda.set_device(device)
    else:  # tiny models: a second intra-op thread only contends (as ``bench``'s --threads 1)
        torch.set_num_threads(1)
    header = f"GPU check on {machine(device)}"
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.workdir) as tmp:
        rows = run_checks(device, Path(tmp))
    print(format_table(rows, header), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
