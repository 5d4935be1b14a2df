"""Rewriting a cache in another format version or shard size: ``logitcache convert``.

In: a complete cache (path or URL) and a destination (a new or empty directory, or an object
store URL). Out: the same records (every codec decodes and re-encodes its values exactly:
the lossy log-prob codes at the same step, float16 casts, ids), the same teacher, corpus and
tokenizer files (copied byte for byte, each checked), in shards of the format version and
size asked for. The new spec differs from the source's only in ``codecs`` (the defaults of
the version written), ``batch_sequences`` and ``shard_sequences``, so its cache_id is new.
No teacher runs: a format 1 cache shrinks to format 2 at the cost of decoding and encoding.

Resumable: rerunning the same conversion into the same destination keeps the shards its
manifest lists (as a resumed teacher pass does) and writes the rest. Each shard's covered
mass and entropy are the source's (computed by the teacher pass before quantization): copied
when shards keep their size, apportioned by positions when resharding (totals unchanged).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .codecs import LogprobCodec
from .errors import CacheError
from .format import MANIFEST_BYTES, TOKENIZER_DIR, CacheSpec, Manifest, StoredFile, diff_specs
from .formats import FORMAT_VERSION, format_class
from .location import Location
from .reader import CacheReader
from .record import SequenceRecord
from .tokenizer_files import read_checked
from .transfer import Progress, no_progress
from .writer import MANIFEST, SHARDS, CacheWriter

__all__ = ["ConvertResult", "RecordEdit", "convert_cache", "converted_spec"]


_SCRATCH_BYTES = 4 * 10**9  # a remote source's shards fetched ahead and not yet converted


@dataclass
class ConvertResult:
    """What a conversion did."""

    manifest: Manifest
    """The destination's complete manifest."""
    written: int
    """Shards written by this run."""
    skipped: int
    """Shards an earlier run of the same conversion had written."""
    bytes_before: int
    """The source's shard bytes."""
    bytes_after: int
    """The destination's shard bytes."""
    write_cpu_s: float
    """CPU seconds (this process) spent encoding and publishing the shards of this run."""


@dataclass(frozen=True)
class RecordEdit:
    """A change of content made on the way (measuring tools: a top-k cache cut to a
    smaller k); a plain conversion makes none."""

    spec: Mapping[str, Any]
    """``CacheSpec`` fields to replace, e.g. ``{"k": 64}``."""
    record: Callable[[SequenceRecord], SequenceRecord]
    """Each source record -> the record written."""


def converted_spec(
    spec: CacheSpec,
    format_version: int = FORMAT_VERSION,
    *,
    shard_sequences: int | None = None,
    batch_sequences: int | None = None,
) -> CacheSpec:
    """``spec`` in ``format_version`` with ``shard_sequences`` per shard (default: the same).

    Format 2's ``batch_sequences``: as given, else the source's (a format 2 source whose
    batches fit the new shards), else the writers' default.
    """
    target = format_class(format_version)
    per_shard = spec.shard_sequences if shard_sequences is None else shard_sequences
    if per_shard < 1:
        raise CacheError(f"--shard-sequences must be at least 1, got {per_shard}")
    source = format_class(spec.format_version)
    if "tail_mass" in target.fields_for(spec) and "tail_mass" not in source.fields_for(spec):
        raise CacheError(
            f"format {target.version} stores each position's tail mass, which a format "
            f"{source.version} sampled cache without log-probs does not keep: keep format "
            f"{source.version} (upgrade the readers), or rerun the teacher pass with "
            f"--format-version {target.version}"
        )
    batch = None
    if target.group_sequences(spec.seq_len, per_shard) is not None:
        kept = spec.batch_sequences
        if kept is not None and kept > per_shard:
            kept = None
        batch = batch_sequences or kept or target.group_sequences(spec.seq_len, per_shard)
    logprobs, step = _logprob_codec(spec)
    codecs = target.default_codecs(
        spec.vocab_size, logprobs=logprobs, step=step, zstd_level=None, mode=spec.mode
    )
    return replace(spec, codecs=codecs, shard_sequences=per_shard, batch_sequences=batch)


def _logprob_codec(spec: CacheSpec) -> tuple[str, float]:
    """(``lossy`` / ``float16`` / ``float32``, step) of the source's log-prob chain: the new
    chain must quantize exactly as the old one did, so decoded values re-encode to themselves."""
    first = dict(spec.codecs["logprobs"][0]) if spec.codecs.get("logprobs") else {}
    if first.get("id") == LogprobCodec.codec_id:
        return "lossy", float(first["step"])
    if first.get("dtype") in ("float16", "float32"):
        return str(first["dtype"]), 1 / 32
    raise CacheError(f"cannot convert a cache whose log-prob codec is {first!r}")


def convert_cache(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    format_version: int = FORMAT_VERSION,
    shard_sequences: int | None = None,
    batch_sequences: int | None = None,
    src_options: dict[str, Any] | None = None,
    dest_options: dict[str, Any] | None = None,
    encode_threads: int = 2,
    progress: Progress | None = None,
    edit: RecordEdit | None = None,
) -> ConvertResult:
    """Write the records of the complete cache ``src`` as a ``format_version`` cache at
    ``dest`` (a new or empty directory or URL, or an unfinished run of this conversion to
    resume), ``shard_sequences`` per shard (default: the source's). See the module docstring.
    """
    source, target = Location(src, src_options), Location(dest, dest_options)
    if _place(source) == _place(target):
        raise CacheError(f"SRC and DEST are the same place ({source.shown}); choose a new DEST")
    target.check_writable()
    # a remote source's shards are read once: fetched ahead into a directory deleted after
    scratch_dir = nullcontext() if source.local else tempfile.TemporaryDirectory()
    with (
        scratch_dir as scratch,
        CacheReader(
            src, storage_options=src_options, local_cache=scratch, local_cache_bytes=_SCRATCH_BYTES
        ) as reader,
    ):
        manifest = reader.manifest
        if not manifest.complete and manifest.n_sequences_total is not None:
            raise CacheError(
                f"{source.url} is a partial pull ({len(manifest.shards)} shards of a finished "
                f"cache of {manifest.n_sequences_total} sequences): the cache is incomplete "
                "here. Finish the pull (`logitcache pull URL DIRECTORY` without --shards or "
                "--max-tokens; shards already there are skipped), or convert the cache at its "
                "source"
            )
        if not manifest.complete:
            raise CacheError(
                f"{source.shown} is not a finished cache (its manifest lists "
                f"{len(manifest.shards)} shards and is not complete): finish its teacher pass "
                "(rerun the same precompute), or convert a complete copy"
            )
        spec = converted_spec(
            manifest.spec,
            format_version,
            shard_sequences=shard_sequences,
            batch_sequences=batch_sequences,
        )
        if edit is not None:
            spec = replace(spec, **edit.spec)
        _check_destination(target, spec)
        with CacheWriter(
            dest, spec, storage_options=dest_options, encode_threads=encode_threads
        ) as writer:
            if manifest.tokenizer_files:
                writer.attach_tokenizer(_StoredTokenizer(source, manifest.tokenizer_files))
            return _convert(reader, writer, progress or no_progress, edit)


def _convert(
    reader: CacheReader, writer: CacheWriter, progress: Progress, edit: RecordEdit | None
) -> ConvertResult:
    """Write every destination shard the writer does not list yet, then finish."""
    source = reader.manifest
    total, per_shard = source.n_sequences_total, writer.shard_sequences
    assert total is not None  # a complete manifest knows it
    ranges = [range(first, min(first + per_shard, total)) for first in range(0, total, per_shard)]
    todo = [j for j in range(len(ranges)) if not writer.is_done(j)]
    skipped = len(ranges) - len(todo)
    done = source.bytes - _source_bytes(reader, (i for j in todo for i in ranges[j]))
    message = f"{skipped} of {len(ranges)} shards already at {writer.loc.shown}"
    progress(round(done), source.bytes, message if skipped else None)
    reader.prefetch_sequences([i for j in todo for i in ranges[j]])
    cpu_s = 0.0
    for j in todo:
        records = [reader.read(i) for i in ranges[j]]
        stats = None if edit is not None else _source_stats(reader, records)
        if edit is not None:
            records = [edit.record(r) for r in records]
        start = time.process_time()
        writer.write_shard(j, records, stats)
        cpu_s += time.process_time() - start
        done += _source_bytes(reader, ranges[j])
        progress(min(round(done), source.bytes), source.bytes, None)
    manifest = writer.finish(total)
    assert manifest is not None  # one worker: finish returns the complete manifest
    return ConvertResult(
        manifest=manifest,
        written=len(todo),
        skipped=skipped,
        bytes_before=source.bytes,
        bytes_after=manifest.bytes,
        write_cpu_s=cpu_s,
    )


def _source_bytes(reader: CacheReader, indices: Iterable[int]) -> float:
    """The source's bytes holding these sequences (each shard's bytes spread evenly)."""
    shards = reader.shards
    return sum(
        shards[pos].bytes / shards[pos].n_sequences
        for pos in (reader.locate(i)[0] for i in indices)
    )


def _source_stats(reader: CacheReader, records: Sequence[SequenceRecord]) -> dict[str, float]:
    """The covered mass and entropy of the source shards' part in ``records``: each source
    shard's sums times its share of positions (exactly the source's for a whole shard)."""
    positions: dict[int, int] = {}
    for r in records:
        pos = reader.locate(r.index)[0]
        positions[pos] = positions.get(pos, 0) + r.n_positions
    covered = entropy = 0.0
    for pos, n in positions.items():
        info = reader.shards[pos]
        share = n / info.n_positions
        covered += info.covered_mass * share
        entropy += info.entropy * share
    return {"covered_mass": covered, "entropy": entropy}


def _place(loc: Location) -> tuple[str, str]:
    return loc.protocol, os.path.realpath(loc.root) if loc.local else loc.root


def _check_destination(target: Location, spec: CacheSpec) -> None:
    """Refuse a destination holding anything but an earlier run of this conversion (its
    manifest has this spec) or the debris of one killed before its first manifest."""
    data = target.read_if_exists(MANIFEST, limit=MANIFEST_BYTES)
    if data is not None:
        old = Manifest.from_json(data, where=target.shown_of(MANIFEST))
        if old.spec.to_dict() != spec.to_dict():
            changes = "; ".join(diff_specs(old.spec, spec)[:4])
            raise CacheError(
                f"{target.shown} already holds another cache ({changes}); choose a "
                "new or empty DEST"
            )
        return
    debris = {".locks", SHARDS, TOKENIZER_DIR}
    if set(target.listdir("")) - debris:
        raise CacheError(f"{target.shown} exists and is not empty; choose a new or empty DEST")


class _StoredTokenizer:
    """The source's tokenizer files, for ``CacheWriter.attach_tokenizer``: ``save_pretrained``
    writes their bytes, each checked against the source manifest's sha256."""

    def __init__(self, source: Location, files: tuple[StoredFile, ...]) -> None:
        self.source, self.files = source, files

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        for entry in self.files:
            (Path(directory) / Path(entry.path).name).write_bytes(read_checked(self.source, entry))
