"""The cache format, specified once: the manifest dataclasses (versions: ``storage.formats``).

In: a ``manifest.json`` text (or the fields to build one). Out: frozen dataclasses that the
writer and the reader share. ``docs/format.md`` is the prose contract; this module mirrors
it field for field; what differs between format versions is in ``storage.formats``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
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
MODES = ("topk", "sampled")
TOKENIZER_DIR = "tokenizer"
"""Where a cache keeps its tokenizer's files (``save_pretrained`` output), since format 1.1."""
TOKENIZER_FILE_NAMES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)
"""The only files a cache's tokenizer may have: data that ``save_pretrained`` writes and the
loaders read (``tokenizers`` JSON, sentencepiece models, vocabularies), never code."""
MAX_TOKENIZER_FILE_BYTES = 1 << 27
"""128 MiB: a 256k-vocabulary tokenizer.json is ~33 MB; each file is read whole, checked."""

# Declared sizes above these are refused before anything is allocated: a manifest is
# read by people's machines, and a hostile one must not ask for terabytes.
_MAX_SEQUENCES_PER_SHARD = 1 << 24
_MAX_SHARD_BYTES = 1 << 40
_MAX_VOCAB = 1 << 24
_MAX_SEQ_LEN = 1 << 22
_MAX_TOKENIZER_FILES = 64
MAX_ROW_ENTRIES = 1 << 23
"""Entries one container row may hold (a sequence in format 1, a batch in format 2): 32 MB
of 4-byte ids, so decoding a row (its blobs inflate to at most what the spec allows) stays
well under 256 MB; seq_len 32768 at k=256 fits (8,388,352)."""
MAX_SHARDS = 1 << 18
"""Shards one manifest may list: 67M sequences at the default 256 per shard (137B tokens at
seq_len 2048); a larger corpus needs a larger --shard-sequences."""
_SHARD_ENTRY_BYTES = 512  # one shard's entry as to_json writes it: ~400 B at the largest
MANIFEST_BYTES = MAX_SHARDS * _SHARD_ENTRY_BYTES + (1 << 20)
"""The most bytes a ``manifest.json`` (or a worker's part) may hold: ``MAX_SHARDS`` entries
plus 1 MiB for the spec and the tokenizer files' list (a few kB in practice), 129 MiB in
all; a larger file is refused unread."""


def canonical_json(obj: Any) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class CacheSpec:
    """What identifies a cache: everything a reader needs to decode and trust a shard.

    Written into the manifest and into every shard's own metadata; two caches (or a cache
    and a stray shard) with different specs are never mixed.
    """

    mode: str
    """``topk`` (k most probable ids, log-probs) or ``sampled`` (distinct ids of N draws)."""
    vocab_size: int
    """Teacher vocabulary size V; every stored id is < V."""
    seq_len: int
    """Maximum tokens per sequence T (packed sequences have exactly T, except the last)."""
    pack: bool
    """True: documents concatenated with EOS; False: one document per sequence, unpadded."""
    container: str
    """``arrow`` (one IPC file per shard) or ``zarr`` (one v3 group per shard)."""
    codecs: Mapping[str, Any]
    """Per record field, the numcodecs chain configs (see storage.codecs)."""
    shard_sequences: int = 256
    """Sequences per shard S; shard j holds sequences [j * S, (j + 1) * S)."""
    k: int | None = None
    """Ids per position in topk mode."""
    samples: int | None = None
    """Draws per position N (1..255) in sampled mode."""
    sampled_logprobs: bool = False
    """Sampled mode: whether the exact log-probs of the drawn ids are stored too."""
    teacher: Mapping[str, Any] = field(default_factory=dict)
    """name_or_path, revision, weights_sha256, config_sha256, dtype."""
    tokenizer: Mapping[str, Any] = field(default_factory=dict)
    """fingerprint (rule 1: vocab, merges, special tokens), fingerprint_full (rule 2: all that
    changes ids or text; 1.2 / 2.1), name_or_path, vocab_size, eos_token_id."""
    corpus: Mapping[str, Any] = field(default_factory=dict)
    """Dataset name/config/split/revision or file hashes, text field."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The precompute settings that shape the content (seed, max_tokens, shard size, ...)."""
    batch_sequences: int | None = None
    """Format 2: sequences per batch (one container row, one blob per field); None: format 1
    (one row per sequence), and the key is absent from the spec's JSON."""

    def __post_init__(self) -> None:
        where = "cache spec"
        if self.mode not in MODES:
            raise CacheError(f"{where}: unknown mode {self.mode!r}; expected one of {MODES}")
        if self.container not in ("arrow", "zarr"):
            raise CacheError(f"{where}: unknown container {self.container!r}")
        for name in ("pack", "sampled_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise CacheError(
                    f"{where}: '{name}' must be true or false, got {getattr(self, name)!r}"
                )
        chains = self.codecs.values() if isinstance(self.codecs, Mapping) else None
        if chains is None or not all(
            isinstance(chain, (list, tuple)) and all(isinstance(c, Mapping) for c in chain)
            for chain in chains
        ):
            raise CacheError(f"{where}: 'codecs' must map field names to lists of codec configs")
        for name in ("teacher", "tokenizer", "corpus", "settings"):
            if not isinstance(getattr(self, name), Mapping):
                raise CacheError(f"{where}: '{name}' must be an object")
        d = self.to_dict()
        _int(d, "vocab_size", where, 1, _MAX_VOCAB)
        _int(d, "seq_len", where, 2, _MAX_SEQ_LEN)
        _int(d, "shard_sequences", where, 1, _MAX_SEQUENCES_PER_SHARD)
        if self.mode == "topk":
            _int(d, "k", where, 1, self.vocab_size)
        else:
            _int(d, "samples", where, 1, 255)
        if self.batch_sequences is not None:
            _int(d, "batch_sequences", where, 1, self.shard_sequences)
        per_position = self.k if self.mode == "topk" else min(self.samples, self.vocab_size)
        rows = self.batch_sequences or 1
        entries = rows * (self.seq_len - 1) * per_position
        if entries > MAX_ROW_ENTRIES:
            raise CacheError(
                f"{where}: {rows} sequence(s) of seq_len {self.seq_len} at "
                f"{per_position} entries per position is {entries:,} entries in one row, more "
                f"than the {MAX_ROW_ENTRIES:,} a row may hold; lower seq_len, k or samples"
            )

    @property
    def format_version(self) -> int:
        """The major version of the shards this spec describes (2 has batches)."""
        return 1 if self.batch_sequences is None else 2

    @property
    def entries_fixed(self) -> int | None:
        """Entries per position when constant (topk), else None."""
        return self.k if self.mode == "topk" else None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        if d["batch_sequences"] is None:  # format 1's spec (and so its cache_id) as 1.x wrote it
            del d["batch_sequences"]
        return d

    @classmethod
    def from_dict(cls, obj: Any) -> CacheSpec:
        if not isinstance(obj, Mapping):
            raise CacheError("manifest 'spec' must be an object")
        names = {f.name for f in fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise CacheError(f"manifest 'spec' has unknown keys: {sorted(unknown)}")
        try:
            return cls(**obj)
        except TypeError as err:
            raise CacheError(f"manifest 'spec' is malformed: {err}") from None

    @property
    def cache_id(self) -> str:
        """Short hash of the spec; shards carry it so a stray shard is never misread."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def diff_specs(old: CacheSpec, new: CacheSpec) -> list[str]:
    """Dotted names of the fields that differ, for 'refused: settings differ' messages."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(f"{prefix} ({a!r} -> {b!r})")

    walk(old.to_dict(), new.to_dict(), "")
    return out


@dataclass(frozen=True)
class ShardInfo:
    """One completed shard as listed in the manifest."""

    index: int
    """Shard number; shard i holds sequences [first_sequence, first_sequence + n_sequences)."""
    path: str
    """Relative to the cache root (POSIX separators, never outside the cache)."""
    first_sequence: int
    n_sequences: int
    n_tokens: int
    """Tokens stored (sum of sequence lengths T)."""
    n_positions: int
    """Positions with a stored teacher distribution (sum of T - 1)."""
    n_entries: int
    """Stored (id, value) entries in all positions."""
    bytes: int
    """Size on disk (for zarr: the sum of the group's files)."""
    sha256: str
    """Hex digest of the shard file (for zarr: of the sorted (name, file digest) list)."""
    covered_mass: float = 0.0
    """Sum over positions of the teacher mass covered by the stored ids (before quantization)."""
    entropy: float = 0.0
    """Sum over positions of the entropy (nats) of the stored part, -sum p log p over stored ids."""

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> ShardInfo:
        if not isinstance(obj, Mapping):
            raise CacheError(f"{where} must be an object")
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("index", "path", "first_sequence", "n_sequences") if n not in obj]
        if missing:
            raise CacheError(f"{where} lacks {missing}")
        unknown = set(obj) - names
        if unknown:
            raise CacheError(f"{where} has unknown keys: {sorted(unknown)}")
        _int(obj, "index", where)
        _int(obj, "first_sequence", where)
        _int(obj, "n_sequences", where, 1, _MAX_SEQUENCES_PER_SHARD)
        for key in ("n_tokens", "n_positions", "n_entries"):
            _int(obj, key, where)
        _int(obj, "bytes", where, 1, _MAX_SHARD_BYTES)
        for key in ("covered_mass", "entropy"):
            value = obj.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CacheError(f"{where}: '{key}' must be a number, got {value!r}")
        digest = obj.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64):
            raise CacheError(f"{where}: 'sha256' must be a 64-character hex digest")
        check_relative_path(obj["path"])
        return cls(**obj)


@dataclass(frozen=True)
class StoredFile:
    """A file the manifest lists besides shards (the tokenizer's), checked on every read."""

    path: str
    """Relative to the cache root, under ``tokenizer/`` (POSIX, never outside the cache)."""
    bytes: int
    sha256: str
    """Hex digest of the file."""

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> StoredFile:
        if not isinstance(obj, Mapping) or set(obj) != {"path", "bytes", "sha256"}:
            raise CacheError(f"{where} must be an object with exactly path, bytes, sha256")
        path = obj["path"]
        if not isinstance(path, str) or "\0" in path:
            raise CacheError(f"{where}: path {path!r} is not a file name; refusing it")
        path = check_relative_path(path)
        if not path.startswith(f"{TOKENIZER_DIR}/") or path.count("/") != 1:
            raise CacheError(f"{where}: {path!r} is not a file directly under {TOKENIZER_DIR}/")
        if path.split("/")[1] not in TOKENIZER_FILE_NAMES:
            raise CacheError(
                f"{where}: {path!r} is not a tokenizer data file (allowed: "
                f"{', '.join(sorted(TOKENIZER_FILE_NAMES))}); refusing it"
            )
        _int(obj, "bytes", where, 0, MAX_TOKENIZER_FILE_BYTES)
        digest = obj["sha256"]
        if not (isinstance(digest, str) and len(digest) == 64):
            raise CacheError(f"{where}: 'sha256' must be a 64-character hex digest")
        return cls(**obj)


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
        return format_class(self.format_version).format_minor(self)

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
