"""The ``logitcache bench`` commands: each prints measured numbers, none is a test.

Expected errors print one line: the ``logitcache`` group handles them for every command.
"""

from __future__ import annotations

import json

import click

from logitcache.errors import LogitcacheError

__all__ = ["bench"]


@click.group()
def bench() -> None:
    """Benchmarks: print measured numbers (see docs/benchmarks.md)."""


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

    for flag, value, low in (("--sequences", sequences, 1), ("--seq-len", seq_len, 2),
                             ("--top-k", top_k, 1), ("--vocab", vocab, 2)):  # fmt: skip
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


@bench.command("quality")
@click.option("--out", default="logitcache-quality", show_default=True,
              help="Work directory: caches, students, quality.json.")  # fmt: skip
@click.option("--home", default=None, help="Where teachers are kept (as for the demo).")
@click.option("--shakespeare", default=None,
              help="Path of tinyshakespeare.txt to add the second corpus.")  # fmt: skip
@click.option("--quick", is_flag=True, help="Tiny sizes and fewer variants (plumbing check).")
@click.option("--stdlib/--no-stdlib", default=True, show_default=True,
              help="Include the demo's corpus (the Python standard library).")  # fmt: skip
@click.option("--only", multiple=True, help="Only these cache variants (repeatable).")
@click.option("--more-data/--no-more-data", default=True, show_default=True,
              help="Also the data-size point (4x the slice, best variant).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.option("--teacher", default=None,
              help="A real teacher (.gguf or directory): the real-teacher study.")  # fmt: skip
@click.pass_context
def bench_quality(ctx, out, home, shakespeare, quick, stdlib, only, more_data, as_json,
                  teacher) -> None:  # fmt: skip
    """Which cache to write: students from each cache mode vs CE-only and online KD.

    The teachers are toys trained here; with --teacher it is the study on that real teacher
    (the same as `logitcache bench real-teacher`)."""
    from pathlib import Path

    if teacher is not None:
        flags = {"home": "--home", "more_data": "--more-data", "as_json": "--json"}
        default = click.core.ParameterSource.DEFAULT
        given = [flag for name, flag in flags.items() if ctx.get_parameter_source(name) != default]
        if given:
            raise LogitcacheError(f"{', '.join(given)}: not an option of the real-teacher "
                                  "study (--teacher); see `bench real-teacher --help`")  # fmt: skip
        ctx.invoke(bench_real_teacher, teacher=teacher, out=out, shakespeare=shakespeare,
                   stdlib=stdlib, quick=quick, only=only, report_only=False)  # fmt: skip
        return

    from logitcache.bench.quality import format_rows, run_quality
    from logitcache.demo import default_home
    from logitcache.progress import Reporter

    rows = run_quality(
        out=Path(out),
        home=Path(home).expanduser() if home else default_home(),
        reporter=Reporter(enabled=not as_json),
        shakespeare=Path(shakespeare) if shakespeare else None,
        quick=quick,
        stdlib=stdlib,
        only=tuple(only),
        more_data=more_data,
    )
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        click.echo(format_rows(rows))


@bench.command("real-teacher")
@click.option("--teacher", required=True, help="A .gguf file or model directory.")
@click.option("--out", default="logitcache-real-teacher", show_default=True,
              help="Work directory; rerunning with the same --out resumes the study.")  # fmt: skip
@click.option("--shakespeare", default=None, help="tinyshakespeare.txt (the first corpus).")
@click.option("--stdlib/--no-stdlib", default=True, show_default=True)
@click.option("--quick", is_flag=True, help="Toy sizes (plumbing check).")
@click.option("--only", multiple=True, help="Only these variants (repeatable).")
@click.option("--report", "report_only", is_flag=True,
              help="Run nothing: print results so far, write OUT/real-teacher.png.")  # fmt: skip
def bench_real_teacher(teacher, out, shakespeare, stdlib, quick, only, report_only) -> None:
    """The cache-mode study on a real LLM teacher (GGUF or directory); resumable."""
    from pathlib import Path

    from logitcache.bench import real_teacher as rt
    from logitcache.bench.real_teacher_report import (
        cache_table,
        format2_bytes,
        plot_gap,
        summarize,
        summary_table,
    )
    from logitcache.progress import Reporter

    budget = rt.QUICK_STUDY if quick else rt.FULL_STUDY
    config = rt.StudyConfig(teacher=teacher, out=out, shakespeare=shakespeare, stdlib=stdlib,
                            budget=budget, only=tuple(only))  # fmt: skip
    rows = rt.load_results(Path(out)) if report_only else rt.run_study(config, Reporter())
    summary = summarize(rows, format2_bytes(Path(out)))
    click.echo(summary_table(summary) + "\n\n" + cache_table(Path(out)))
    if plot_gap(summary, Path(out) / "real-teacher.png"):
        click.echo(f"plot: {Path(out) / 'real-teacher.png'}")


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
    from logitcache.progress import Reporter

    torch.set_num_threads(1)
    result = run_remote_bench(n_shards=shards, shard_sequences=shard_sequences,
                              latency_ms=latency_ms, batches=batches, work=work,
                              reporter=Reporter(enabled=not as_json))  # fmt: skip
    click.echo(json.dumps(result, indent=1) if as_json else format_remote(result))


@bench.command("memory")
@click.option("--student-config", default=None,
              help="JSON/YAML transformers config (default: 8x512 Llama, 16k vocab).")  # fmt: skip
@click.option("--nproc", type=int, default=2, show_default=True, help="Ranks (torchrun).")
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--batch-sizes", default="1,4", show_default=True,
              help="Micro-batch sizes; two or more split activations from the rest.")  # fmt: skip
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per run.")
@click.option("--device", default="cpu", show_default=True, help="cpu (gloo) or cuda (nccl).")
@click.option("--variants", default="ddp,fsdp,fsdp-gc,fsdp-gc-8bit", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_memory(student_config, nproc, seq_len, batch_sizes, steps, device, variants,
                       as_json) -> None:  # fmt: skip
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
        student_config=read_student_config(student_config) if student_config else None, nproc=nproc,
        seq_len=seq_len, batch_sizes=sizes, steps=steps, device=device, variants=chosen,
    )  # fmt: skip
    click.echo(json.dumps(asdict(result), indent=1) if as_json else format_memory(result))
