"""What ``logitcache inspect`` (and the end of ``precompute``) says about a cache.

In: a cache's ``Manifest``. Out: a JSON-able summary (size, mode, teacher, tokenizer,
corpus) and the same as a few aligned lines of text.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cache_state", "cache_summary", "summary_line", "summary_text"]


def cache_summary(manifest: Any) -> dict[str, Any]:
    spec = manifest.spec
    stats = manifest.stats()
    return {
        "format_version": manifest.format_version,
        "format": manifest.version_label,
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
        "tokenizer_fingerprint": spec.tokenizer.get("fingerprint_full")
        or spec.tokenizer.get("fingerprint"),
        "tokenizer_stored": bool(manifest.tokenizer_files),
        "corpus": dict(spec.corpus),
        "codecs": {k: v for k, v in spec.codecs.items()},
        "created_by": manifest.created_by,
    }


def summary_text(manifest: Any, url: str) -> str:
    from logitcache.core.progress import human_bytes

    s = cache_summary(manifest)
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
            f"cache       {url}  ({cache_state(manifest)}, "
            f"format {s['format']}, id {s['cache_id']})",
            f"content     {s['n_sequences']:,} sequences, {s['n_tokens']:,} tokens in "
            f"{s['n_shards']} {s['container']} shard{'s' * (s['n_shards'] != 1)}; "
            f"seq_len {s['seq_len']}, "
            f"{'packed' if s['pack'] else 'unpacked'}",
            f"targets     {what} of vocab {s['vocab_size']:,}; "
            f"{fmt(s['entries_per_position'], '.1f')} entries/position",
            f"size        {human_bytes(s['bytes'])}: {fmt(s['bytes_per_token'], '.2f')} B/token, "
            f"{fmt(s['bytes_per_entry'], '.2f')} B/stored entry",
            f"quality     covered mass {fmt(s['mean_covered_mass'], '.4f')}, entropy of stored "
            f"part {fmt(s['mean_entropy'], '.3f')} nats",
            f"teacher     {s['teacher'].get('name_or_path')} (dtype {s['teacher'].get('dtype')}, "
            f"config {str(s['teacher'].get('config_sha256'))[:12]})",
            f"tokenizer   {str(s['tokenizer_fingerprint'])[:16]}; "
            + _tokenizer_state(manifest, url),
            f"corpus      {corpus_name}",
        ]
    )


def summary_line(manifest: Any, url: str) -> str:
    """What --quiet keeps: one line naming the cache, its state and its size."""
    from logitcache.core.progress import human_bytes

    n, bpt = len(manifest.shards), manifest.stats()["bytes_per_token"]
    return (
        f"cache {url}: {cache_state(manifest)}, {manifest.n_sequences:,} sequences in {n} "
        f"shard{'s' * (n != 1)}, {human_bytes(manifest.bytes)}"
        + (f" ({bpt:.1f} B/token)" if bpt is not None else "")
    )


def cache_state(manifest: Any) -> str:
    """complete, a partial copy of a finished cache, or an unfinished teacher pass."""
    if manifest.complete:
        return "complete"
    total = manifest.n_sequences_total
    if total is not None:
        n_shards = -(-total // manifest.spec.shard_sequences)
        return f"partial copy: {len(manifest.shards)} of {n_shards} shards"
    return "INCOMPLETE: teacher pass not finished"


def _tokenizer_state(manifest: Any, url: str) -> str:
    from logitcache.storage.tokenizer import missing_tokenizer_hint

    if manifest.tokenizer_files:
        return f"stored in the cache ({len(manifest.tokenizer_files)} files)"
    return "not stored: " + missing_tokenizer_hint(url, manifest).split("; ", 1)[-1]
