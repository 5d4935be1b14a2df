"""The cache format, specified once: the manifest (its entries: ``spec.py``; versions:
``storage.formats``).

In: a ``manifest.json`` text (or the fields to build one). Out: frozen dataclasses that the
writer and the reader share. ``docs/format.md`` is the prose contract; this module and
``spec.py`` (``CacheSpec``, ``ShardInfo``, ``StoredFile``, re-exported here) mirror it field
for field; what differs between format versions is in ``storage.formats``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from ._values import check_int as _int
from ._values import check_json_depth, check_relative_path
from .errors import CacheError
from .formats import (
    FORMAT_MINOR,
    FORMAT_VERSION,
    READ_VERSIONS,
    check_format_version,
    format_class,
)
from .spec import (
    MAX_ROW_ENTRIES,
    MAX_TOKENIZER_FILE_BYTES,
    MODES,
    TOKENIZER_DIR,
    TOKENIZER_FILE_NAMES,
    CacheSpec,
    ShardInfo,
    StoredFile,
    canonical_json,
    diff_specs,
)

__all__ = [
    "FORMAT_MINOR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_BYTES",
    "MAX_ROW_ENTRIES",
    "MAX_SHARDS",
    "MAX_TOKENIZER_FILE_BYTES",
    "MODES",
    "READ_VERSIONS",
    "TOKENIZER_DIR",
    "TOKENIZER_FILE_NAMES",
    "CacheSpec",
    "Manifest",
    "ShardInfo",
    "StoredFile",
    "canonical_json",
    "check_format_version",
    "check_relative_path",
    "diff_specs",
]

FORMAT_NAME = "logitcache"
_MAX_TOKENIZER_FILES = 64  # a manifest's declared sizes are bounded (spec.py has the rest)
MAX_SHARDS = 1 << 18
"""Shards one manifest may list: 67M sequences at the default 256 per shard (137B tokens at
seq_len 2048); a larger corpus needs a larger --shard-sequences."""
_SHARD_ENTRY_BYTES = 512  # one shard's entry as to_json writes it: ~400 B at the largest
MANIFEST_BYTES = MAX_SHARDS * _SHARD_ENTRY_BYTES + (1 << 20)
"""The most bytes a ``manifest.json`` (or a worker's part) may hold: ``MAX_SHARDS`` entries
plus 1 MiB for the spec and the tokenizer files' list (a few kB in practice), 129 MiB in
all; a larger file is refused unread."""


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: the spec, the completed shards, and summary statistics."""

    spec: CacheSpec
    shards: tuple[ShardInfo, ...] = ()
    complete: bool = False
    """True once every sequence of the corpus is in a listed shard."""
    n_sequences_total: int | None = None
    """Known when the teacher pass has read the whole corpus."""
    created_by: str = ""
    tokenizer_files: tuple[StoredFile, ...] = ()
    """The tokenizer's files stored in the cache (optional: caches written before 0.2 lack
    them); their fingerprint is ``spec.tokenizer["fingerprint"]``."""

    @property
    def format_version(self) -> int:
        return self.spec.format_version

    @property
    def format_minor(self) -> int:
        """The minor version this manifest needs (``FORMAT_MINOR``): the newest whose keys it
        uses, 0 if none."""
        return format_class(self.format_version).format_minor(self.spec, bool(self.tokenizer_files))

    @property
    def version_label(self) -> str:
        """The version as written: "2.1", "2", "1.2", "1.1" (a stored tokenizer) or "1.0"."""
        return format_class(self.format_version).version_label(self.format_minor)

    @property
    def n_sequences(self) -> int:
        return sum(s.n_sequences for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_positions(self) -> int:
        return sum(s.n_positions for s in self.shards)

    @property
    def n_entries(self) -> int:
        return sum(s.n_entries for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def stats(self) -> dict[str, float | None]:
        n = self.n_positions
        return {
            "mean_covered_mass": sum(s.covered_mass for s in self.shards) / n if n else None,
            "mean_entropy": sum(s.entropy for s in self.shards) / n if n else None,
            "bytes_per_token": self.bytes / self.n_tokens if self.n_tokens else None,
            "bytes_per_entry": self.bytes / self.n_entries if self.n_entries else None,
            "entries_per_position": self.n_entries / n if n else None,
        }

    def check_listing(self, where: str) -> None:
        """A complete cache's manifest lists as many shards as its corpus has: without this,
        a shard dropped from the list (or a total edited) would be trained around unnoticed.
        (Each listed shard's content is checked against the shard itself when opened; a
        worker's part file lists only its own shards, so this is for manifest.json.)"""
        if not self.complete:
            return
        size, total = self.spec.shard_sequences, self.n_sequences_total
        n_shards = None if total is None else -(-total // size)
        if n_shards != len(self.shards):
            raise CacheError(
                f"{where}: marked complete with n_sequences_total {total} ({n_shards} shards of "
                f"{size}), but lists {len(self.shards)} shards; shards missing from the list, or "
                "an edited manifest"
            )

    def with_shard(self, info: ShardInfo) -> Manifest:
        others = [s for s in self.shards if s.index != info.index]
        return replace(self, shards=tuple(sorted([*others, info], key=lambda s: s.index)))

    def to_json(self) -> str:
        obj: dict[str, Any] = {"format": FORMAT_NAME, "format_version": self.format_version}
        if self.format_minor:  # else written as 1.0 (or 2.0) was
            obj["format_minor"] = self.format_minor
        obj |= {
            "cache_id": self.spec.cache_id,
            "created_by": self.created_by,
            "complete": self.complete,
            "n_sequences_total": self.n_sequences_total,
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens,
            "bytes": self.bytes,
            "stats": self.stats(),
            "spec": self.spec.to_dict(),
            "shards": [asdict(s) for s in self.shards],
        }
        if self.tokenizer_files:
            obj["tokenizer_files"] = [asdict(f) for f in self.tokenizer_files]
        return json.dumps(obj, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise CacheError(f"{where} is not valid JSON: {err}") from None
        except RecursionError:  # [[[[...]]]]: json.loads recurses once per level
            raise CacheError(f"{where} is not a manifest: JSON nested too deeply") from None
        check_json_depth(obj, where)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise CacheError(f"{where} is not a logitcache manifest (no 'format': '{FORMAT_NAME}')")
        version = obj.get("format_version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            if isinstance(version, int) and version > max(READ_VERSIONS):
                raise CacheError(
                    f"{where} has format version {version}, newer than this logitcache reads "
                    f"(versions {list(READ_VERSIONS)}); upgrade logitcache"
                )
            raise CacheError(
                f"{where} has unknown format version {version!r}; expected one of "
                f"{list(READ_VERSIONS)}"
            )
        try:
            spec = CacheSpec.from_dict(obj.get("spec"))
        except CacheError as err:
            raise CacheError(f"{where}: {err}") from None
        if spec.format_version != version:
            raise CacheError(
                f"{where}: format version {version} but a format {spec.format_version} spec; "
                "edited manifest?"
            )
        if obj.get("cache_id") not in (None, spec.cache_id):
            raise CacheError(f"{where}: cache_id does not match its spec (edited manifest?)")
        raw_shards = obj.get("shards", [])
        if not isinstance(raw_shards, list):
            raise CacheError(f"{where}: 'shards' must be a list")
        if len(raw_shards) > MAX_SHARDS:
            raise CacheError(
                f"{where}: lists {len(raw_shards)} shards, more than the {MAX_SHARDS} a "
                "manifest may hold"
            )
        shards = tuple(
            ShardInfo.from_dict(s, f"{where} shard #{i}") for i, s in enumerate(raw_shards)
        )
        _check_layout(shards, where)
        for key in ("n_sequences", "n_tokens", "bytes"):  # derived totals, as to_json writes
            listed = sum(getattr(s, key) for s in shards)
            if key in obj and obj[key] != listed:
                raise CacheError(
                    f"{where}: '{key}' = {obj[key]!r} disagrees with its shards ({listed}); "
                    "edited manifest?"
                )
        if not isinstance(obj.get("complete", False), bool):
            raise CacheError(f"{where}: 'complete' must be true or false")
        total = obj.get("n_sequences_total")
        if total is not None:
            _int(obj, "n_sequences_total", where)
        if "format_minor" in obj:
            _int(obj, "format_minor", where)  # any minor of this version reads
        return cls(
            tokenizer_files=_tokenizer_files(obj.get("tokenizer_files", []), where),
            spec=spec,
            shards=shards,
            complete=obj.get("complete", False),
            n_sequences_total=total,
            created_by=str(obj.get("created_by", "")),
        )


def _tokenizer_files(raw: Any, where: str) -> tuple[StoredFile, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_TOKENIZER_FILES:
        raise CacheError(f"{where}: 'tokenizer_files' must be a list of at most 64 files")
    files = tuple(
        StoredFile.from_dict(f, f"{where} tokenizer file #{i}") for i, f in enumerate(raw)
    )
    if len({f.path for f in files}) != len(files):
        raise CacheError(f"{where}: a tokenizer file is listed twice")
    return files


def _check_layout(shards: tuple[ShardInfo, ...], where: str) -> None:
    seen_paths: set[str] = set()
    for prev, cur in itertools.pairwise(shards):
        if cur.index <= prev.index:
            raise CacheError(f"{where}: shards are not in increasing index order")
        if cur.first_sequence < prev.first_sequence + prev.n_sequences:
            raise CacheError(f"{where}: shards {prev.index} and {cur.index} overlap")
    for s in shards:
        if s.path in seen_paths:
            raise CacheError(f"{where}: shard path {s.path!r} is listed twice")
        seen_paths.add(s.path)
