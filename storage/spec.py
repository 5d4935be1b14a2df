"""What a manifest lists: the cache's spec, its shards' entries and its stored files.

In: the JSON objects of ``manifest.json``'s ``spec``, ``shards`` and ``tokenizer_files`` (or
the fields to build them). Out: frozen dataclasses, each checked on construction, that the
format versions (``storage.formats``), the records (``record.py``) and the manifest
(``format.py``) share; this module imports none of them, so they import it one way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ._values import check_int as _int
from ._values import check_relative_path
from .errors import CacheError

__all__ = [
    "MAX_ROW_ENTRIES",
    "MAX_TOKENIZER_FILE_BYTES",
    "MODES",
    "TOKENIZER_DIR",
    "TOKENIZER_FILE_NAMES",
    "CacheSpec",
    "ShardInfo",
    "StoredFile",
    "canonical_json",
    "diff_specs",
]

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
MAX_ROW_ENTRIES = 1 << 23
"""Entries one container row may hold (a sequence in format 1, a group in format 2): 32 MB
of 4-byte ids, so decoding a row (its blobs inflate to at most what the spec allows) stays
well under 256 MB; seq_len 32768 at k=256 fits (8,388,352)."""


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
    """Format 2: sequences per group (one container row, one blob per field); None: format 1
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
