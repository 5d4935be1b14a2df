"""The ``logitcache bench`` commands: each prints measured numbers, none is a test.

Expected errors print one line: the ``logitcache`` group handles them for every command.
"""

from __future__ import annotations

import json

import click

from logitcache.core.errors import LogitcacheError

__all__ = ["bench"]


@click.group()
def bench() -> None:
    """Measure this machine and your caches: print numbers (see docs/benchmarks.md)."""


@bench.command("storage")
@click.option("--sequences", type=int, default=32, show_default=True)
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--vocab", type=int, default=151_936, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_storage(sequences: int, seq_len: int, top_k: int, vocab: int, as_json: bool) -> None:
    """Bytes and speed of each codec and container on a synthetic top-k cache."""
    import torch

    from logitcache.bench.storage import format_rows, rows_as_dicts, run_storage_bench

    for flag, value, low in (
        ("--sequences", sequences, 1),
        ("--seq-len", seq_len, 2),
        ("--top-k", top_k, 1),
        ("--vocab", vocab, 2),
    ):
        if value < low:
            raise LogitcacheError(f"{flag} must be >= {low}, got {value}")
    if top_k > vocab:
        raise LogitcacheError(f"--top-k {top_k} is larger than --vocab {vocab}")

    torch.set_num_threads(1)
    rows = run_storage_bench(n_sequences=sequences, seq_len=seq_len, k=top_k, vocab=vocab)
    if as_json:
        click.echo(json.dumps(rows_as_dicts(rows), indent=1))
    else:
        click.echo(f"synthetic top-{top_k}, vocab {vocab:,}, {sequences} x {seq_len} tokens")
        click.echo(format_rows(rows))


@bench.command("precompute")
@click.option("--teacher", default=None, help="Local teacher directory (default: a random Llama).")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--batch-tokens", type=int, default=2048, show_default=True)
@click.option("--sequences", type=int, default=16, show_default=True)
@click.option(
    "--shard-sequences", type=int, default=None, help="Sequences per shard (default: 1/4 of all)."
)
@click.option("--top-k", type=int, default=None, help="Top-k mode (default, k=64).")
@click.option("--samples", type=int, default=None, help="Sampled mode with N draws.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--threads", type=int, default=1, show_default=True, help="torch CPU threads (0: default)."
)
@click.option("--json", "as_json", is_flag=True)
def bench_precompute(
    teacher: str | None,
    seq_len: int,
    batch_tokens: int,
    sequences: int,
    shard_sequences: int | None,
    top_k: int | None,
    samples: int | None,
    dtype: str,
    device: str,
    threads: int,
    as_json: bool,
) -> None:
    """Bare teacher forward vs the full precompute pipeline, on the same batches."""
    import torch

    from logitcache.bench.precompute import (
        format_precompute,
        precompute_as_dict,
        run_precompute_bench,
    )

    if top_k is not None and samples is not None:
        raise LogitcacheError("choose one of --top-k K or --samples N")
    if top_k is None and samples is None:
        top_k = 64
    if threads:
        torch.set_num_threads(threads)
    result = run_precompute_bench(
        teacher=teacher,
        seq_len=seq_len,
        sequences=sequences,
        batch_tokens=batch_tokens,
        shard_sequences=shard_sequences,
        top_k=top_k,
        samples=samples,
        dtype=None if dtype == "auto" else dtype,
        device=device,
    )
    if as_json:
        click.echo(json.dumps(precompute_as_dict(result), indent=1))
    else:
        click.echo(format_precompute(result))


@bench.command("host")
@click.option("--vocab", type=int, default=152_064, show_default=True)
@click.option("--samples", type=int, default=None, help="Sampled mode with N draws (default 64).")
@click.option("--top-k", type=int, default=None, help="Top-k mode.")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--sequences", type=int, default=8, show_default=True)
@click.option(
    "--shard-sequences", type=int, default=None, help="Sequences per shard (default: half)."
)
@click.option(
    "--threads", type=int, default=None, help="Writer encode threads (default: the writer's)."
)
@click.option("--zstd-level", type=int, default=None, help="Default: the format's (15 / 9).")
@click.option("--json", "as_json", is_flag=True)
def bench_host(
    vocab: int,
    samples: int | None,
    top_k: int | None,
    seq_len: int,
    sequences: int,
    shard_sequences: int | None,
    threads: int | None,
    zstd_level: int | None,
    as_json: bool,
) -> None:
    """The teacher pass's host side (after the forward) on synthetic logits: tokens/s per core."""
    import torch

    from logitcache.bench.host import format_host, host_as_dict, run_host_bench

    if top_k is not None and samples is not None:
        raise LogitcacheError("choose one of --top-k K or --samples N")
    if top_k is None and samples is None:
        samples = 64
    for flag, value, low, high in (
        ("--vocab", vocab, 2, 1 << 20),
        ("--samples", samples, 1, 255),
        ("--top-k", top_k, 1, vocab),
        ("--seq-len", seq_len, 2, 1 << 17),
        ("--sequences", sequences, 1, (1 << 22) // max(seq_len, 2)),  # the results stay in memory
        ("--shard-sequences", shard_sequences, 1, sequences),
        ("--threads", threads, 1, 256),
        ("--zstd-level", zstd_level, 1, 22),
    ):
        if value is not None and not low <= value <= high:
            raise LogitcacheError(f"{flag} must be in {low}..{high}, got {value}")
    torch.set_num_threads(1)  # the device stage on this CPU: one core, as the host stages
    result = run_host_bench(
        vocab=vocab,
        samples=samples,
        top_k=top_k,
        seq_len=seq_len,
        sequences=sequences,
        shard_sequences=shard_sequences,
        encode_threads=threads,
        zstd_level=zstd_level,
    )
    click.echo(json.dumps(host_as_dict(result), indent=1) if as_json else format_host(result))


@bench.command("train")
@click.option(
    "--student-config",
    default=None,
    help="JSON/YAML transformers config with model_type (default: a 4x128 Llama, 32k vocab).",
)
@click.option(
    "--teacher-width", type=int, default=4, show_default=True, help="Teacher hidden / student's."
)
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps per variant.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed first steps.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--threads", type=int, default=1, show_default=True, help="torch CPU threads (0: default)."
)
@click.option("--json", "as_json", is_flag=True)
def bench_train(
    student_config: str | None,
    teacher_width: int,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    top_k: int,
    device: str,
    threads: int,
    as_json: bool,
) -> None:
    """Step time and peak memory: CE, offline KD from a cache, online KD, HF Trainer path."""
    import torch

    from logitcache.bench.train import format_train, run_train_bench, train_as_dict

    if threads:
        torch.set_num_threads(threads)
    result = run_train_bench(
        student_config=student_config,
        teacher_width=teacher_width,
        steps=steps,
        warmup=warmup,
        batch_size=batch_size,
        seq_len=seq_len,
        top_k=top_k,
        device=device,
    )
    if as_json:
        click.echo(json.dumps(train_as_dict(result), indent=1))
    else:
        click.echo(format_train(result))


@bench.command("remote")
@click.option("--shards", type=int, default=10_000, show_default=True, help="Shards in the cache.")
@click.option("--shard-sequences", type=int, default=4, show_default=True)
@click.option(
    "--latency-ms",
    type=float,
    default=50.0,
    show_default=True,
    help="Delay before every HTTP response.",
)
@click.option("--batches", type=int, default=20, show_default=True, help="Batches after the first.")
@click.option("--work", default=None, help="Keep (and reuse) the built cache here.")
@click.option("--json", "as_json", is_flag=True)
def bench_remote(shards, shard_sequences, latency_ms, batches, work, as_json: bool) -> None:
    """Open a large cache over HTTP with latency and time its first training batch."""
    import torch

    from logitcache.bench.remote import format_remote, run_remote_bench
    from logitcache.core.progress import Reporter

    torch.set_num_threads(1)
    result = run_remote_bench(
        n_shards=shards,
        shard_sequences=shard_sequences,
        latency_ms=latency_ms,
        batches=batches,
        work=work,
        reporter=Reporter(enabled=not as_json),
    )
    click.echo(json.dumps(result, indent=1) if as_json else format_remote(result))


@bench.command("memory")
@click.option(
    "--student-config",
    default=None,
    help="JSON/YAML transformers config (default: 8x512 Llama, 16k vocab).",
)
@click.option("--nproc", type=int, default=2, show_default=True, help="Ranks (torchrun).")
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option(
    "--batch-sizes",
    default="1,4",
    show_default=True,
    help="Micro-batch sizes; two or more split activations from the rest.",
)
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per run.")
@click.option("--device", default="cpu", show_default=True, help="cpu (gloo) or cuda (nccl).")
@click.option("--variants", default="ddp,fsdp,fsdp-gc,fsdp-gc-8bit", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_memory(
    student_config, nproc, seq_len, batch_sizes, steps, device, variants, as_json
) -> None:
    """Peak memory per parameter and step time: DDP vs FSDP, checkpointing, 8-bit AdamW."""
    from dataclasses import asdict

    from logitcache.bench.train_memory import MEMORY_VARIANTS, format_memory, run_memory_bench
    from logitcache.bench.variant import read_student_config

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    unknown = [v for v in chosen if v not in MEMORY_VARIANTS]
    if unknown or nproc < 1 or steps < 1:
        raise LogitcacheError(f"--variants: one of {MEMORY_VARIANTS}; --nproc, --steps >= 1")
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise LogitcacheError(f"--batch-sizes {batch_sizes}: integers, e.g. 1,4") from None
    result = run_memory_bench(
        student_config=read_student_config(student_config) if student_config else None,
        nproc=nproc,
        seq_len=seq_len,
        batch_sizes=sizes,
        steps=steps,
        device=device,
        variants=chosen,
    )
    click.echo(json.dumps(asdict(result), indent=1) if as_json else format_memory(result))
