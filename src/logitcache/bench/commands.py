"""The ``logitcache bench`` commands: each prints measured numbers, none is a test."""

from __future__ import annotations

import json

import click

from logitcache.errors import one_line_errors

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
@one_line_errors
def bench_storage(sequences: int, seq_len: int, top_k: int, vocab: int, as_json: bool) -> None:
    """Bytes and speed of each codec and container on a synthetic top-k cache."""
    import torch

    from logitcache.bench.storage import format_rows, rows_as_dicts, run_storage_bench

    torch.set_num_threads(1)
    rows = run_storage_bench(n_sequences=sequences, seq_len=seq_len, k=top_k, vocab=vocab)
    if as_json:
        click.echo(json.dumps(rows_as_dicts(rows), indent=1))
    else:
        click.echo(f"synthetic top-{top_k}, vocab {vocab:,}, {sequences} x {seq_len} tokens")
        click.echo(format_rows(rows))
