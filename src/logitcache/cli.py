"""The ``logitcache`` command line: thin click commands over the library.

The options of ``precompute`` and ``train`` are made from their config dataclasses
(``logitcache.options``); ``--config`` reads the same settings from a recipe file
(``logitcache.recipes``). Expected errors (``LogitcacheError``: bad flags, files, models,
shards) print one line and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from logitcache.bench.commands import bench
from logitcache.errors import LogitcacheError, one_line_errors, sigterm_raises
from logitcache.options import build, click_options
from logitcache.precompute.config import PrecomputeConfig, read_recipe
from logitcache.precompute.defaults import DEFAULT_SAMPLES
from logitcache.recipes import recipe_options, recipe_yaml, resolve
from logitcache.train.config import RUN_RECORD_KEYS, TrainConfig

__all__ = ["main", "precompute_config", "render_reference", "train_config"]

_QUIET = click.option("--quiet", is_flag=True, default=False, help="No progress bars.")


class _Commands(click.Group):
    """The command group: every command's expected errors print one line (``one_line_errors``)."""

    def invoke(self, ctx: click.Context) -> Any:
        return one_line_errors(super().invoke, command=lambda: ctx.invoked_subcommand)(ctx)


_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_Commands, context_settings=_SETTINGS)
@click.version_option(package_name="logitcache")
def main() -> None:
    """Distill language models from an offline teacher-logit cache.

    A teacher runs once (`precompute`) and writes its sparse next-token distributions to a
    cache; students then train from the cache alone (`train`), as often as you like.
    """


main.add_command(bench)


# -- demo -------------------------------------------------------------------------------
@main.command()
@click.option("--quick", is_flag=True, help="Smaller everything (< 90 s), same code path.")
@click.option("--out", default="logitcache-demo", show_default=True,
              help="Where the cache, students, plot and summary go (the demo owns it: outputs "
              "of an earlier demo of another size are replaced).")  # fmt: skip
@click.option("--home", default=None,
              help="Where the teacher is kept and reused [default: $LOGITCACHE_HOME or "
              "~/.cache/logitcache].")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@_QUIET
def demo(quick: bool, out: str, home: str | None, seed: int, quiet: bool) -> None:
    """Teacher, cache, and a distilled student beating a CE-only one, on this CPU.

    Uses the Python standard library's own source as the corpus: no download. The first run
    pretrains a small teacher (a few minutes) and keeps it for later runs.
    """
    from pathlib import Path

    from logitcache.demo import FULL, QUICK, default_home, format_summary, run_demo
    from logitcache.progress import Reporter

    summary = run_demo(
        QUICK if quick else FULL,
        home=Path(home).expanduser() if home else default_home(),
        out=Path(out),
        reporter=Reporter(enabled=not quiet),
        seed=seed,
    )
    click.echo(format_summary(summary))


# -- precompute -----------------------------------------------------------------------
@main.command()
@click_options(PrecomputeConfig)
@_QUIET
@recipe_options
def precompute(recipe: str | None, dry_run: bool, quiet: bool, **params: Any) -> None:
    """Run a teacher over a corpus once and write the cache (resumable)."""
    from logitcache.describe import summary_line, summary_text
    from logitcache.precompute import run_precompute
    from logitcache.precompute.ranks import distributed_worker
    from logitcache.progress import Reporter

    config = precompute_config(params, click.get_current_context(), recipe)
    if dry_run:
        click.echo(recipe_yaml(config, "precompute"), nl=False)
        return
    rank, _ = distributed_worker()
    with sigterm_raises():  # preempted: the same line and cleanup as Ctrl-C (exit 143)
        result = run_precompute(config, Reporter(enabled=not quiet, rank=rank))
    if result.manifest is not None and result.manifest.complete and rank == 0:
        describe = summary_line if quiet else summary_text  # --quiet keeps one summary line
        click.echo(describe(result.manifest, config.out), err=True)


def precompute_config(
    params: dict[str, Any], ctx: click.Context | None = None, recipe: str | None = None
) -> PrecomputeConfig:
    """The ``PrecomputeConfig`` of parsed ``precompute`` options (over a recipe file).

    The two settings the command resolves itself: the cache mode (sampled with
    DEFAULT_SAMPLES draws unless --top-k or --samples says), and the worker split (the
    flags, else torchrun's ranks, else one worker).
    """
    from logitcache.precompute.ranks import resolve_worker

    flat = resolve(PrecomputeConfig, ctx, params, config=recipe, read=read_recipe)
    if flat.get("top_k") is None and flat.get("samples") is None:
        flat["samples"] = DEFAULT_SAMPLES
    flat["worker_index"], flat["num_workers"] = resolve_worker(
        flat.get("num_workers"), flat.get("worker_index")
    )
    return build(PrecomputeConfig, flat)


# -- train ----------------------------------------------------------------------------
@main.command()
@click_options(TrainConfig)
@recipe_options
def train(recipe: str | None, dry_run: bool, **params: Any) -> None:
    """Train a student from a cache, with no teacher in memory."""
    from logitcache.train import train as run_train
    from logitcache.train.preempt import reported_interrupts

    config = train_config(params, click.get_current_context(), recipe)
    if dry_run:
        click.echo(recipe_yaml(config, "train"), nl=False)
        return
    with reported_interrupts(config.out):  # SIGTERM / Ctrl-C: a checkpoint, or what is kept
        result = run_train(config)
    if not config.quiet and result.final_eval:
        ev = result.final_eval
        click.echo(
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.0f} s; "
            f"held-out CE {ev['eval_ce']:.4f}, KL to teacher {ev['eval_kl']:.4f}; "
            f"model in {result.model_dir}",
            err=True,
        )


def train_config(
    params: dict[str, Any], ctx: click.Context | None = None, recipe: str | None = None
) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``train`` options (over a recipe file)."""
    return build(TrainConfig, resolve(TrainConfig, ctx, params, config=recipe,
                                      ignore=RUN_RECORD_KEYS))  # fmt: skip


# -- inspect / verify / merge -----------------------------------------------------------
@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(cache: str, as_json: bool) -> None:
    """Summarize a cache (directory or URL): size, mode, teacher, tokenizer, corpus."""
    from logitcache.describe import cache_summary, summary_text
    from logitcache.storage import Location, read_manifest

    manifest = read_manifest(Location(cache))
    if as_json:
        click.echo(json.dumps(cache_summary(manifest), indent=1))
    else:
        click.echo(summary_text(manifest, cache))


@main.command()
@click.argument("cache")
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
    from logitcache.describe import cache_state

    state = cache_state(manifest)
    click.echo(f"ok: {n} shards, {manifest.n_sequences} sequences verified; cache {state}")


@main.command()
@click.argument("cache")
def merge(cache: str) -> None:
    """Write the complete manifest of a cache (directory or URL) written by several workers."""
    from logitcache.storage import merge_parts

    manifest = merge_parts(cache)
    click.echo(f"merged: {len(manifest.shards)} shards, {manifest.n_sequences} sequences")


@main.command()
@click.argument("cache")
@click.argument("out", required=False)
@click.option("--add", default=None, metavar="TOKENIZER",
              help="Store this tokenizer (directory or hub id) in a local CACHE written before "
              "caches carried theirs; refused unless it is the cache's.")  # fmt: skip
def tokenizer(cache: str, out: str | None, add: str | None) -> None:
    """Export the tokenizer stored in CACHE to the directory OUT (checked against its hashes
    and the cache's fingerprint), or store one in an older cache with --add."""
    from logitcache.identity import tokenizer_fingerprint
    from logitcache.precompute.teacher import load_tokenizer
    from logitcache.storage import add_tokenizer, fetch_tokenizer, read_manifest
    from logitcache.storage.location import Location

    if (out is None) == (add is None):
        raise LogitcacheError("give OUT (export the cache's tokenizer) or --add TOKENIZER")
    if add is not None:
        tok = load_tokenizer(add)
        manifest = add_tokenizer(cache, tok, tokenizer_fingerprint(tok), name=add)
        click.echo(f"stored {len(manifest.tokenizer_files)} tokenizer files in {cache}")
        return
    path = fetch_tokenizer(cache, out)
    expected = str(read_manifest(Location(cache)).spec.tokenizer.get("fingerprint"))
    found = tokenizer_fingerprint(load_tokenizer(str(path)))
    if found != expected:
        raise LogitcacheError(
            f"the tokenizer stored in {cache} (fingerprint {found[:16]}) is not the one the "
            f"cache was made with (fingerprint {expected[:16]}): an edited cache; {path} holds it"
        )
    click.echo(f"tokenizer written to {path}")


# -- push / pull ------------------------------------------------------------------------
_THREADS = click.option(
    "--threads", type=int, default=8, show_default=True, help="Shards transferred at once."
)


@main.command()
@click.argument("cache")
@click.argument("url")
@_THREADS
@click.option("--public", is_flag=True, default=False,
              help="hf:// only: create a missing repository public (default private).")  # fmt: skip
@_QUIET
def push(cache: str, url: str, threads: int, public: bool, quiet: bool) -> None:
    """Copy CACHE to URL (s3://, gs://, hf://datasets/ORG/NAME, ... or a directory), checking
    every shard's hash.

    Resumable: shards already at URL with the right hash are skipped, and the manifest is
    written last. To the Hub: batched commits, a dataset card. Credentials come from the
    environment (AWS_*, FSSPEC_S3, HF_TOKEN, ...).
    """
    _transfer(cache, url, None, None, threads, quiet, verb="pushed", private=not public)


@main.command()
@click.argument("url")
@click.argument("directory")
@click.option("--shards", default=None, help="Only these shard indices, e.g. 0-99,120.")
@click.option(
    "--max-tokens", type=int, default=None, help="Only the first shards holding this many tokens."
)
@_THREADS
@_QUIET
def pull(
    url: str, directory: str, shards: str | None, max_tokens: int | None, threads: int, quiet: bool
) -> None:
    """Copy the cache at URL (or part of it) to DIRECTORY, checking every shard's hash.

    Resumable: shards already in DIRECTORY with the right hash are skipped; a partial
    download is never published.
    """
    _transfer(url, directory, shards, max_tokens, threads, quiet, verb="pulled")


def _transfer(src, dst, shards, max_tokens, threads, quiet, verb: str, private=True) -> None:
    from logitcache.progress import ByteProgress, Reporter, human_bytes
    from logitcache.storage import copy_cache

    with ByteProgress(Reporter(enabled=not quiet)) as progress:
        result = copy_cache(src, dst, shards=shards, max_tokens=max_tokens, threads=threads,
                            progress=progress, private=private)  # fmt: skip
    manifest = result.manifest
    state = "complete" if manifest is not None and manifest.complete else "partial"
    click.echo(
        f"{verb}: {result.copied} shards ({human_bytes(result.bytes_copied)}) copied, "
        f"{result.skipped} already there; {dst} now holds {len(manifest.shards) if manifest else 0}"
        f" shards ({state})"
    )


def render_reference() -> str:
    """The README's command reference (``logitcache.reference``) of these commands."""
    from logitcache import reference

    return reference.render_reference(main)


@main.command(hidden=True)
def reference() -> None:
    """Print the command reference that README.md embeds."""
    click.echo(render_reference())


if __name__ == "__main__":
    main()
