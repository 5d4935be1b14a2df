"""The ``logitcache`` command line: thin click commands over the library.

Expected errors (``LogitcacheError``: bad flags, files, models, shards) print one line and
exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from logitcache.errors import LogitcacheError
from logitcache.errors import one_line_errors as _expected_errors
from logitcache.precompute.defaults import DEFAULT_SAMPLES

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="logitcache")
def main() -> None:
    """Distill language models from an offline teacher-logit cache.

    A teacher runs once (`precompute`) and writes its sparse next-token distributions to a
    cache; students then train from the cache alone (`train`), as often as you like.
    """


# -- demo -------------------------------------------------------------------------------
@main.command()
@click.option("--quick", is_flag=True, help="Smaller everything (< 90 s), same code path.")
@click.option(
    "--out",
    default="logitcache-demo",
    show_default=True,
    help="Where the cache, students, plot and summary go.",
)
@click.option("--home", default=None,
              help="Where the teacher is kept and reused [default: $LOGITCACHE_HOME or "
              "~/.cache/logitcache].")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, default=False)
@_expected_errors
def demo(quick: bool, out: str, home: str | None, seed: int, quiet: bool) -> None:
    """Teacher, cache, and a distilled student beating a CE-only one, on this CPU.

    Uses the Python standard library's own source as the corpus: no download. The first run
    pretrains a small teacher (a few minutes) and keeps it for later runs.
    """
    from pathlib import Path

    from logitcache.demo import FULL, QUICK, default_home, format_summary, run_demo
    from logitcache.progress import Reporter

    budget = QUICK if quick else FULL
    summary = run_demo(
        budget,
        home=Path(home).expanduser() if home else default_home(),
        out=Path(out),
        reporter=Reporter(enabled=not quiet),
        seed=seed,
    )
    click.echo(format_summary(summary))


# -- precompute -----------------------------------------------------------------------
@main.command()
@click.option("--teacher", required=True, help="Hub id or local directory of a causal LM.")
@click.option(
    "--data",
    "data",
    required=True,
    multiple=True,
    help="HF dataset name, or local .txt/.jsonl/.parquet files or globs (repeatable).",
)
@click.option("--out", required=True, help="Cache directory (or URL) to write.")
@click.option("--data-config", default=None, help="HF dataset config name.")
@click.option("--split", default="train", show_default=True, help="HF dataset split.")
@click.option("--revision", default=None, help="Dataset revision (and teacher revision).")
@click.option("--streaming/--no-streaming", default=False, help="Stream the HF dataset.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--messages-field", default=None, help="Chat data: a list of {role, content}.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many tokens.")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option(
    "--pack/--no-pack",
    default=True,
    show_default=True,
    help="Concatenate documents with EOS, or one document per sequence.",
)
@click.option("--top-k", type=int, default=None, help="Store the k most probable ids.")
@click.option(
    "--samples",
    type=int,
    default=None,
    help=f"Store the distinct ids of N draws with counts (1..255) [default: {DEFAULT_SAMPLES} "
    "when --top-k is not given; see docs/benchmarks.md].",
)
@click.option(
    "--sampled-logprobs/--no-sampled-logprobs",
    default=False,
    help="Sampled mode: also store exact log-probs of the drawn ids.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--container", type=click.Choice(["arrow", "zarr"]), default="arrow", show_default=True
)
@click.option(
    "--logprob-codec",
    type=click.Choice(["lossy", "float16", "float32"]),
    default="lossy",
    show_default=True,
)
@click.option(
    "--logprob-step",
    type=float,
    default=1 / 32,
    show_default=True,
    help="Quantization step of the lossy codec (nats).",
)
@click.option("--shard-sequences", type=int, default=256, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
)
@click.option("--device", default="auto", show_default=True, help="auto, cuda, cuda:N, cpu, mps.")
@click.option("--device-map", default=None, help="'auto' to spread a large teacher over GPUs.")
@click.option(
    "--batch-tokens",
    type=int,
    default=16384,
    show_default=True,
    help="Tokens per teacher forward; halved automatically on out-of-memory.",
)
@click.option(
    "--num-workers",
    type=int,
    default=None,
    help="Split the work over N workers (default: torchrun's WORLD_SIZE, else 1).",
)
@click.option("--worker-index", type=int, default=None, help="This worker's index (0..N-1).")
@click.option("--trust-remote-code", is_flag=True, default=False)
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
@_expected_errors
def precompute(**kw: Any) -> None:
    """Run a teacher over a corpus once and write the cache (resumable)."""
    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute
    from logitcache.precompute.ranks import distributed_worker, resolve_worker
    from logitcache.progress import Reporter

    if kw["top_k"] is None and kw["samples"] is None:
        kw["samples"] = DEFAULT_SAMPLES
    rank, _ = distributed_worker()
    worker, num_workers = resolve_worker(kw["num_workers"], kw["worker_index"])
    corpus = CorpusSpec(
        data=tuple(kw["data"]),
        data_config=kw["data_config"],
        split=kw["split"],
        revision=kw["revision"],
        streaming=kw["streaming"],
        text_field=kw["text_field"],
        messages_field=kw["messages_field"],
        max_tokens=kw["max_tokens"],
        seq_len=kw["seq_len"],
        pack=kw["pack"],
    )
    config = PrecomputeConfig(
        teacher=kw["teacher"],
        out=kw["out"],
        corpus=corpus,
        top_k=kw["top_k"],
        samples=kw["samples"],
        sampled_logprobs=kw["sampled_logprobs"],
        seed=kw["seed"],
        container=kw["container"],
        logprob_codec=kw["logprob_codec"],
        logprob_step=kw["logprob_step"],
        shard_sequences=kw["shard_sequences"],
        dtype=None if kw["dtype"] == "auto" else kw["dtype"],
        device=kw["device"],
        device_map=kw["device_map"],
        batch_tokens=kw["batch_tokens"],
        num_workers=num_workers,
        worker_index=worker,
        trust_remote_code=kw["trust_remote_code"],
    )
    result = run_precompute(config, Reporter(enabled=not kw["quiet"], rank=rank))
    if result.manifest is not None and result.manifest.complete and not kw["quiet"] and rank == 0:
        click.echo(_summary_text(result.manifest, kw["out"]), err=True)


# -- train ----------------------------------------------------------------------------
@main.command()
@click.option(
    "--cache",
    "caches",
    required=True,
    multiple=True,
    help="Cache directory (or URL) written by precompute; repeat to mix several caches.",
)
@click.option(
    "--cache-weights",
    default=None,
    help="Mixing weights of the --cache options, in order, e.g. 3,1 (default: by size).",
)
@click.option("--out", required=True, help="Output directory (checkpoints, metrics, model/).")
@click.option("--student", default=None, help="Hub id or directory of a pretrained student.")
@click.option(
    "--student-config",
    default=None,
    help="JSON/YAML transformers config (with model_type) for a student from scratch.",
)
@click.option(
    "--tokenizer", default=None, help="Tokenizer for a from-scratch student (default: the cache's)."
)
@click.option(
    "--extended-vocab",
    is_flag=True,
    default=False,
    help="Accept a student tokenizer that extends the cache's vocabulary.",
)
@click.option(
    "--loss",
    type=click.Choice(["forward-kl", "reverse-kl", "jsd", "tvd", "ce"]),
    default="forward-kl",
    show_default=True,
    help="ce = cross-entropy only (baseline).",
)
@click.option(
    "--tail",
    type=click.Choice(["renorm", "bucket", "label"]),
    default="bucket",
    show_default=True,
    help="Top-k caches: where the teacher's missing mass goes.",
)
@click.option(
    "--target",
    type=click.Choice(["auto", "counts", "probs"]),
    default="auto",
    show_default=True,
    help="Sampled caches: counts/N or the stored log-probs.",
)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option(
    "--alpha",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of cross-entropy on the true next token.",
)
@click.option("--beta", type=float, default=0.5, show_default=True, help="JSD mixture weight.")
@click.option("--steps", type=int, default=None, help="Optimizer steps.")
@click.option("--epochs", type=float, default=None, help="Epochs (default 1 without --steps).")
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Sequences per micro-batch per process.",
)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "wsd", "constant"]),
    default="cosine",
    show_default=True,
)
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--eval-every",
    type=int,
    default=0,
    show_default=True,
    help="Evaluate every N steps (0: at the end).",
)
@click.option(
    "--eval-fraction",
    type=float,
    default=0.02,
    show_default=True,
    help="Share of the cache held out by a stable hash of the sequence index.",
)
@click.option("--eval-sequences", type=int, default=256, show_default=True)
@click.option(
    "--online-teacher",
    default=None,
    help="Reference runs: distill from this in-memory teacher (full-vocabulary KL).",
)
@click.option(
    "--eval-cache",
    default=None,
    help="Evaluate on this separate cache (all of it) instead of a held-out split.",
)
@click.option(
    "--save-every",
    type=int,
    default=0,
    show_default=True,
    help="Checkpoint every N steps (0: at the end).",
)
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option(
    "--block-shards", type=int, default=4, show_default=True, help="Shuffle window in shards."
)
@click.option(
    "--chunk-size",
    type=int,
    default=1024,
    show_default=True,
    help="Rows per vocabulary chunk of the loss.",
)
@click.option(
    "--num-workers",
    type=int,
    default=1,
    show_default=True,
    help="DataLoader workers decoding shards.",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True
)
@click.option("--resume", is_flag=True, default=False, help="Continue from the latest checkpoint.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check each shard's sha256 when first opened.",
)
@click.option(
    "--local-cache",
    default=None,
    help="Remote caches: keep downloaded shards here (default $LOGITCACHE_HOME/shards).",
)
@click.option(
    "--local-cache-gb",
    type=float,
    default=None,
    help="Remote caches: size limit of the local shard cache (default 20 GB; LRU eviction).",
)
@click.option("--trust-remote-code", is_flag=True, default=False)
@click.option("--quiet", is_flag=True, default=False)
@click.option(
    "--lora-r", type=int, default=0, show_default=True, help="LoRA rank (0: train all weights)."
)
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank).")
@click.option(
    "--lora-targets",
    default=None,
    help="Modules given adapters, e.g. q_proj,v_proj (default: all linear but the LM head).",
)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option(
    "--merge-lora", is_flag=True, default=False, help="Also save the merged model (model-merged/)."
)
@click.option(
    "--fsdp", is_flag=True, default=False,
    help="Shard weights, gradients and optimizer state over the torchrun ranks (FSDP2).",
)  # fmt: skip
@click.option(
    "--gradient-checkpointing", is_flag=True, default=False,
    help="Rerun each layer's forward in backward: far fewer activations.",
)  # fmt: skip
@click.option(
    "--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default="adamw",
    show_default=True, help="adamw8bit: torchao's 8-bit AdamW (pip install torchao).",
)  # fmt: skip
@_expected_errors
def train(**kw: Any) -> None:
    """Train a student from a cache, with no teacher in memory."""
    from logitcache.train import train as run_train

    result = run_train(train_config(kw))
    if not kw["quiet"] and result.final_eval:
        ev = result.final_eval
        click.echo(
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.0f} s; "
            f"held-out CE {ev['eval_ce']:.4f}, KL to teacher {ev['eval_kl']:.4f}; "
            f"model in {result.model_dir}",
            err=True,
        )


def train_config(params: dict[str, Any]) -> Any:
    """The ``TrainConfig`` of the ``train`` command's parsed options."""
    from logitcache.train import TrainConfig

    kw = dict(params)
    caches, weights = kw.pop("caches"), kw.pop("cache_weights")
    kw["cache"], kw["mix_caches"] = caches[0], caches[1:]
    kw["cache_weights"] = _numbers("--cache-weights", weights) if weights else ()
    targets = kw.pop("lora_targets", None) or ""
    kw["lora_targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
    return TrainConfig(**kw)


def _numbers(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise LogitcacheError(f"{flag} {text}: expected numbers separated by commas") from None


# -- inspect / verify / merge -----------------------------------------------------------
def _summary(manifest: Any) -> dict[str, Any]:
    from logitcache.storage import FORMAT_VERSION

    spec = manifest.spec
    stats = manifest.stats()
    return {
        "format_version": FORMAT_VERSION,
        "cache_id": spec.cache_id,
        "complete": manifest.complete,
        "mode": spec.mode,
        "k": spec.k,
        "samples": spec.samples,
        "sampled_logprobs": spec.sampled_logprobs,
        "vocab_size": spec.vocab_size,
        "seq_len": spec.seq_len,
        "pack": spec.pack,
        "container": spec.container,
        "n_sequences": manifest.n_sequences,
        "n_tokens": manifest.n_tokens,
        "n_positions": manifest.n_positions,
        "n_entries": manifest.n_entries,
        "n_shards": len(manifest.shards),
        "bytes": manifest.bytes,
        "bytes_per_token": stats["bytes_per_token"],
        "bytes_per_entry": stats["bytes_per_entry"],
        "entries_per_position": stats["entries_per_position"],
        "mean_covered_mass": stats["mean_covered_mass"],
        "mean_entropy": stats["mean_entropy"],
        "teacher": dict(spec.teacher),
        "tokenizer_fingerprint": spec.tokenizer.get("fingerprint"),
        "corpus": dict(spec.corpus),
        "codecs": {k: v for k, v in spec.codecs.items()},
        "created_by": manifest.created_by,
    }


def _summary_text(manifest: Any, url: str) -> str:
    from logitcache.progress import human_bytes

    s = _summary(manifest)
    what = (
        f"top-{s['k']}"
        if s["mode"] == "topk"
        else f"sampled N={s['samples']}" + (" + log-probs" if s["sampled_logprobs"] else "")
    )
    corpus = s["corpus"]
    corpus_name = corpus.get("name") or ", ".join(f["path"] for f in corpus.get("files", [])[:3])
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return "\n".join(
        [
            f"cache       {url}  ({'complete' if s['complete'] else 'INCOMPLETE'}, "
            f"format v{s['format_version']}, id {s['cache_id']})",
            f"content     {s['n_sequences']:,} sequences, {s['n_tokens']:,} tokens in "
            f"{s['n_shards']} {s['container']} shards; seq_len {s['seq_len']}, "
            f"{'packed' if s['pack'] else 'unpacked'}",
            f"targets     {what} of vocab {s['vocab_size']:,}; "
            f"{fmt(s['entries_per_position'], '.1f')} entries/position",
            f"size        {human_bytes(s['bytes'])}: {fmt(s['bytes_per_token'], '.2f')} B/token, "
            f"{fmt(s['bytes_per_entry'], '.2f')} B/stored entry",
            f"quality     covered mass {fmt(s['mean_covered_mass'], '.4f')}, entropy of stored "
            f"part {fmt(s['mean_entropy'], '.3f')} nats",
            f"teacher     {s['teacher'].get('name_or_path')} (dtype {s['teacher'].get('dtype')}, "
            f"config {str(s['teacher'].get('config_sha256'))[:12]})",
            f"tokenizer   {str(s['tokenizer_fingerprint'])[:16]}",
            f"corpus      {corpus_name}",
        ]
    )


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_expected_errors
def inspect(cache: str, as_json: bool) -> None:
    """Summarize a cache (directory or URL): size, mode, teacher, tokenizer, corpus."""
    from logitcache.storage import Location, read_manifest

    manifest = read_manifest(Location(cache))
    if as_json:
        click.echo(json.dumps(_summary(manifest), indent=1))
    else:
        click.echo(_summary_text(manifest, cache))


@main.command()
@click.argument("cache")
@_expected_errors
def verify(cache: str) -> None:
    """Recompute every shard hash and decode every record; exit 1 naming bad shards.

    CACHE is a directory or a URL; a remote cache is fetched shard by shard through the local
    shard cache ($LOGITCACHE_HOME/shards).
    """
    from logitcache.storage import verify_cache

    manifest, problems = verify_cache(cache)
    for problem in problems:
        click.echo(f"BAD  {problem}", err=True)
    n = len(manifest.shards)
    if problems:
        click.echo(f"{len(problems)} of {n} shards failed verification", err=True)
        sys.exit(1)
    state = (
        "complete"
        if manifest.complete
        else "PARTIAL (a copy of part of a finished cache)"
        if manifest.n_sequences_total is not None
        else "INCOMPLETE (teacher pass not finished)"
    )
    click.echo(f"ok: {n} shards, {manifest.n_sequences} sequences verified; cache {state}")


@main.command()
@click.argument("cache")
@_expected_errors
def merge(cache: str) -> None:
    """Write the complete manifest of a cache (directory or URL) written by several workers."""
    from logitcache.storage import merge_parts

    manifest = merge_parts(cache)
    click.echo(f"merged: {len(manifest.shards)} shards, {manifest.n_sequences} sequences")


# -- push / pull ------------------------------------------------------------------------
_THREADS = click.option(
    "--threads", type=int, default=8, show_default=True, help="Shards transferred at once."
)


@main.command()
@click.argument("cache")
@click.argument("url")
@_THREADS
@click.option("--quiet", is_flag=True, default=False)
@_expected_errors
def push(cache: str, url: str, threads: int, quiet: bool) -> None:
    """Copy CACHE to URL (s3://, gs://, ... or a directory), checking every shard's hash.

    Resumable: shards already at URL with the right hash are skipped, and the manifest is
    written last. Credentials come from the environment (AWS_*, FSSPEC_S3, ...).
    """
    _transfer(cache, url, None, None, threads, quiet, verb="pushed")


@main.command()
@click.argument("url")
@click.argument("directory")
@click.option("--shards", default=None, help="Only these shard indices, e.g. 0-99,120.")
@click.option(
    "--max-tokens", type=int, default=None, help="Only the first shards holding this many tokens."
)
@_THREADS
@click.option("--quiet", is_flag=True, default=False)
@_expected_errors
def pull(
    url: str, directory: str, shards: str | None, max_tokens: int | None, threads: int, quiet: bool
) -> None:
    """Copy the cache at URL (or part of it) to DIRECTORY, checking every shard's hash.

    Resumable: shards already in DIRECTORY with the right hash are skipped; a partial
    download is never published.
    """
    _transfer(url, directory, shards, max_tokens, threads, quiet, verb="pulled")


def _transfer(src, dst, shards, max_tokens, threads, quiet, verb: str) -> None:
    from logitcache.progress import Reporter, human_bytes
    from logitcache.storage import copy_cache

    result = copy_cache(src, dst, shards=shards, max_tokens=max_tokens, threads=threads,
                        reporter=Reporter(enabled=not quiet))  # fmt: skip
    manifest = result.manifest
    state = "complete" if manifest is not None and manifest.complete else "partial"
    click.echo(
        f"{verb}: {result.copied} shards ({human_bytes(result.bytes_copied)}) copied, "
        f"{result.skipped} already there; {dst} now holds {len(manifest.shards) if manifest else 0}"
        f" shards ({state})"
    )


# -- bench ------------------------------------------------------------------------------
from logitcache.bench.commands import bench  # noqa: E402  (registered below)

main.add_command(bench)


def render_reference() -> str:
    """The README's command reference: every command's --help, in order."""
    parts = []
    for path in _command_paths(main, ["logitcache"]):
        ctx = click.Context(path[-1][1], info_name=path[-1][0], terminal_width=100,
                            max_content_width=100, help_option_names=["-h", "--help"])  # fmt: skip
        name = " ".join(p[0] for p in path)
        text = path[-1][1].get_help(ctx).replace(f"Usage: {path[-1][0]}", f"Usage: {name}", 1)
        parts.append(f"### `{name}`\n\n```\n{text}\n```\n")
    return "\n".join(parts)


def _command_paths(command: click.Command, prefix: list[str], trail=()) -> list:
    trail = (*trail, (prefix[-1], command))
    out = [list(trail)] if trail[1:] else []
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not sub.hidden:
                out += _command_paths(sub, [*prefix, name], trail)
    return out


@main.command(hidden=True)
def reference() -> None:
    """Print the command reference that README.md embeds."""
    click.echo(render_reference())


if __name__ == "__main__":
    main()
