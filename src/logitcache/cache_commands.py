"""The commands that work on a cache that exists: inspect, verify, merge, tokenizer, push, pull,
convert.

In: a cache directory or URL (and, for push/pull/convert, where to write it). Out: what the
cache holds, whether every shard checks out, a checked copy, or a converted one. Thin click
commands over ``logitcache.storage``; ``cli.py`` adds them to the ``logitcache`` group (whose
handler prints expected errors as one line).
"""

from __future__ import annotations

import json
import sys

import click

from logitcache.core.errors import LogitcacheError
from logitcache.core.options import QUIET
from logitcache.core.untrusted import redact
from logitcache.storage import FORMAT_VERSION, READ_VERSIONS

__all__ = ["CACHE_COMMANDS"]


# -- inspect / verify / merge -----------------------------------------------------------
@click.command()
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
        click.echo(summary_text(manifest, redact(cache)))


@click.command()
@click.argument("cache")
def verify(cache: str) -> None:
    """Recompute every shard hash and decode every record; exit 1 naming bad shards.

    CACHE is a directory or a URL; a remote cache is fetched shard by shard through the local
    shard cache ($LOGITCACHE_HOME/shards).
    """
    from logitcache.storage import verify_cache

    manifest, problems = verify_cache(cache)
    for problem in problems:
        click.echo(f"BAD  {redact(problem)}", err=True)
    n = len(manifest.shards)
    if problems:
        click.echo(f"{len(problems)} of {n} shards failed verification", err=True)
        sys.exit(1)
    from logitcache.describe import cache_state

    state = cache_state(manifest)
    click.echo(f"ok: {n} shards, {manifest.n_sequences} sequences verified; cache {state}")


@click.command()
@click.argument("cache")
def merge(cache: str) -> None:
    """Write the complete manifest of a cache (directory or URL) written by several workers."""
    from logitcache.storage import merge_parts

    manifest = merge_parts(cache)
    click.echo(f"merged: {len(manifest.shards)} shards, {manifest.n_sequences} sequences")


@click.command()
@click.argument("cache")
@click.argument("out", required=False)
@click.option(
    "--add",
    default=None,
    metavar="TOKENIZER",
    help="Store this tokenizer (directory or hub id) in a local CACHE written before "
    "caches carried theirs; refused unless it is the cache's.",
)
def tokenizer(cache: str, out: str | None, add: str | None) -> None:
    """Export the tokenizer stored in CACHE to the directory OUT (checked against its hashes
    and the cache's fingerprint; OUT may be a student's model directory), or store one in an
    older cache with --add."""
    from logitcache.models import load_tokenizer
    from logitcache.storage import add_tokenizer, fetch_tokenizer
    from logitcache.storage.tokenizer import stored_tokenizer

    if (out is None) == (add is None):
        raise LogitcacheError("give OUT (export the cache's tokenizer) or --add TOKENIZER")
    if add is not None:
        manifest = add_tokenizer(cache, load_tokenizer(add), name=add)
        click.echo(f"stored {len(manifest.tokenizer_files)} tokenizer files in {redact(cache)}")
        return
    stored_tokenizer(cache)  # the check, before anything is written to OUT
    path = fetch_tokenizer(cache, out)
    click.echo(f"tokenizer written to {path}")


# -- push / pull ------------------------------------------------------------------------
_THREADS = click.option(
    "--threads", type=int, default=8, show_default=True, help="Shards transferred at once."
)


@click.command()
@click.argument("cache")
@click.argument("url")
@_THREADS
@click.option(
    "--public",
    is_flag=True,
    default=False,
    help="hf:// only: create a missing repository public (default private).",
)
@QUIET
def push(cache: str, url: str, threads: int, public: bool, quiet: bool) -> None:
    """Copy CACHE to URL (s3://, gs://, hf://datasets/ORG/NAME, ... or a directory), checking
    every shard's hash.

    Resumable: shards already at URL with the right hash are skipped, and the manifest is
    written last. To the Hub: batched commits, a dataset card. Credentials come from the
    environment (AWS_*, FSSPEC_S3, HF_TOKEN, ...).
    """
    _transfer(cache, url, None, None, threads, quiet, verb="pushed", private=not public)


@click.command()
@click.argument("url")
@click.argument("directory")
@click.option("--shards", default=None, help="Only these shard indices, e.g. 0-99,120.")
@click.option(
    "--max-tokens", type=int, default=None, help="Only the first shards holding this many tokens."
)
@_THREADS
@QUIET
def pull(
    url: str, directory: str, shards: str | None, max_tokens: int | None, threads: int, quiet: bool
) -> None:
    """Copy the cache at URL (or part of it) to DIRECTORY, checking every shard's hash.

    Resumable: shards already in DIRECTORY with the right hash are skipped; a partial
    download is never published.
    """
    _transfer(url, directory, shards, max_tokens, threads, quiet, verb="pulled")


def _transfer(src, dst, shards, max_tokens, threads, quiet, verb: str, private=True) -> None:
    from logitcache.core.progress import ByteProgress, Reporter, human_bytes
    from logitcache.storage import copy_cache

    with ByteProgress(Reporter(enabled=not quiet)) as progress:
        result = copy_cache(
            src,
            dst,
            shards=shards,
            max_tokens=max_tokens,
            threads=threads,
            progress=progress,
            private=private,
        )
    manifest = result.manifest
    state = "complete" if manifest is not None and manifest.complete else "partial"
    held = len(manifest.shards) if manifest else 0
    click.echo(
        f"{verb}: {result.copied} shards ({human_bytes(result.bytes_copied)}) copied, "
        f"{result.skipped} already there; {redact(dst)} now holds {held} shards ({state})"
    )


# -- convert ----------------------------------------------------------------------------
@click.command()
@click.argument("src")
@click.argument("dest")
@click.option(
    "--format-version",
    type=click.IntRange(min(READ_VERSIONS), max(READ_VERSIONS)),
    default=FORMAT_VERSION,
    show_default=True,
    help="Format of DEST: 2 (smaller, faster to read) or 1 (for readers that predate format 2).",
)
@click.option(
    "--shard-sequences",
    type=click.IntRange(min=1),
    default=None,
    help="Sequences per shard of DEST [default: as in SRC].",
)
@QUIET
def convert(
    src: str, dest: str, format_version: int, shard_sequences: int | None, quiet: bool
) -> None:
    """Rewrite the cache SRC at DEST in another format version or shard size: the same
    records, teacher, tokenizer and corpus, without running the teacher.

    SRC is a finished cache (directory or URL); DEST a new or empty directory or object store
    URL. Resumable: the same command again keeps the shards DEST already lists.
    """
    from logitcache.core.progress import ByteProgress, Reporter, human_bytes
    from logitcache.storage import convert_cache

    with ByteProgress(Reporter(enabled=not quiet), desc="convert") as progress:
        result = convert_cache(
            src,
            dest,
            format_version=format_version,
            shard_sequences=shard_sequences,
            progress=progress,
        )
    before, after = result.bytes_before, result.bytes_after
    kept = f", {result.skipped} already there" if result.skipped else ""
    click.echo(
        f"converted: {human_bytes(before)} -> {human_bytes(after)} ({after / before:.2f}x) in "
        f"format {result.manifest.version_label}, {len(result.manifest.shards)} shards "
        f"({result.written} written{kept}) at {redact(dest)}"
    )


CACHE_COMMANDS = (inspect, verify, merge, tokenizer, push, pull, convert)
