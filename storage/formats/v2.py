"""Format 2: several sequences per blob, ids as per-shard frequency ranks, sorted and gapped.

A container row per group of ``batch_sequences`` sequences (``GroupCodec``; the spec's key
keeps its first name), and one shard blob, the id table that maps ranks to ids. In: the
``SequenceRecord``s of one shard (writer), or one group's blobs and its shard's id table
(reader). Out: the shard's id table blob and, per group of consecutive sequences, one
codec-compressed blob per field; and back, as records.

What v2 changes against v1 (``v1.py``), measured on SmolLM2-135M caches in
docs/benchmarks.md ("Format v2"):
- one zstd frame per field per group of sequences (v1: per sequence), and one container row
  per group: per-sequence framing and zstd headers were ~3.5 B/token at seq_len 256;
- ids (stored and input) are stored as ranks: the shard's ``TABLE_SIZE`` most frequent
  stored ids get ranks 0.., every other id keeps its order after them (a 2 kB table per
  shard; ~2 B/token less at N=16 than raw BPE ids, whose order is only roughly by
  frequency);
- sampled mode: within a position the entries are sorted by rank and the ranks stored as
  gaps (the first as is), counts and log-probs permuted with them (sampled targets are a
  set; the loss does not depend on the order), and the last count of each position is not
  stored (N minus the others); topk keeps v1's order by log-prob, which its delta-coded
  log-probs need (sorting by id saves as many bytes on ids as it costs there);
- sampled mode without log-probs stores no tail mass (the counts target does not read it),
  and ``doc_starts`` / ``loss_mask`` are bit masks over the group's tokens.

Its chains are ``v2_codecs`` (byte-shuffled ranks, zstd level by mode), built from the
generic codecs of ``storage/codecs.py``. Minor version 2.1 adds
``spec.tokenizer.fingerprint_full`` (2.0 already lists tokenizer files). Writers and readers
reach ``FormatV2`` through ``storage.formats.codec_for``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from logitcache.core.identity import FULL_FINGERPRINT

from ..codecs import FieldCodec, FloatCodec, logprob_codec_config
from ..errors import CacheError, ShardCorruptError
from ..record import SequenceRecord, check_record
from .base import Mapper, Rows

if TYPE_CHECKING:
    from ..spec import CacheSpec, ShardInfo

__all__ = [
    "GROUP_TOKENS",
    "TABLE_SIZE",
    "FormatV2",
    "GroupCodec",
    "default_group_sequences",
    "group_fields",
    "id_dtype_for",
    "v2_codecs",
]


GROUP_TOKENS = 4096
"""Writers make groups of max(1, GROUP_TOKENS // seq_len) sequences (16 at seq_len 256): a
random read fetches and decodes one group (see docs/benchmarks.md for the trade-off)."""
TABLE_SIZE = 1024
"""Ids in a shard's rank table (fewer if the shard stores fewer distinct ids)."""


def default_group_sequences(seq_len: int, shard_sequences: int) -> int:
    """The ``batch_sequences`` a writer puts in a format 2 spec (readers read the spec's)."""
    return max(1, min(shard_sequences, GROUP_TOKENS // seq_len))


def id_dtype_for(vocab_size: int) -> str:
    """Format 2's stored dtype of ids and ranks below ``vocab_size``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def v2_codecs(
    vocab_size: int,
    *,
    mode: str = "sampled",
    logprobs: str = "lossy",
    step: float = 1 / 32,
    zstd_level: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The v2 codec chains of every field, manifest-ready (numcodecs' shuffle and zstd).

    zstd level (default) 15 for ``sampled``: 0.9 B/token (5 %) less than level 3 at N=16,
    mostly counts, at ~70-200k tokens/s per writer thread; 9 for ``topk``, where 15 saves
    only 1 % more and encodes at ~15k tokens/s at k=128 (docs/benchmarks.md, "Format v2").
    Decoding speed does not depend on the level."""
    if zstd_level is None:
        zstd_level = 15 if mode == "sampled" else 9
    zstd = {"id": "zstd", "level": zstd_level, "checksum": True}
    shuffle = {"id": "shuffle", "elementsize": np.dtype(id_dtype_for(vocab_size)).itemsize}
    lp = logprob_codec_config(logprobs, step)
    return {
        "lengths": [zstd],
        "input_ids": [shuffle, zstd],
        "loss_mask": [{"id": "packbits"}, zstd],
        "doc_starts": [{"id": "packbits"}, zstd],
        "ids": [shuffle, zstd],
        "counts": [zstd],
        "n_entries": [zstd],
        "logprobs": [lp, zstd],
        "tail_mass": [{"id": FloatCodec.codec_id, "dtype": "float16"}, zstd],
        "ids_table": [shuffle, zstd],
    }


def group_fields(spec: CacheSpec) -> tuple[str, ...]:
    """The fields a v2 group of this spec stores, in container column order."""
    names = ["lengths", "input_ids", "loss_mask", "doc_starts", "ids"]
    if spec.mode == "topk":
        return (*names, "logprobs", "tail_mass")
    names += ["counts", "n_entries"]
    return (*names, "logprobs", "tail_mass") if spec.sampled_logprobs else tuple(names)


class GroupCodec:
    """Encodes and decodes the groups of v2 shards of one spec, and checks their content."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.fields = group_fields(spec)
        if spec.batch_sequences is None:
            raise CacheError("a format 2 spec needs 'batch_sequences'")
        self.size = spec.batch_sequences
        self.record_fields = tuple(f for f in self.fields if f != "lengths")
        """The ``SequenceRecord`` fields a writer must give."""
        missing = [f for f in (*self.fields, "ids_table") if f not in spec.codecs]
        if missing:
            raise CacheError(f"cache spec has no codec for fields {missing}")
        per_position = spec.k if spec.mode == "topk" else min(spec.samples, spec.vocab_size)
        tokens = self.size * spec.seq_len
        entries = self.size * (spec.seq_len - 1) * per_position
        values = {
            "lengths": self.size,
            "ids_table": min(TABLE_SIZE, spec.vocab_size),
            "ids": entries,
            "counts": entries,
            "logprobs": entries,
        }
        id_dtype = id_dtype_for(spec.vocab_size)
        dtypes = {
            "lengths": "uint32",
            "input_ids": id_dtype,
            "loss_mask": "bool",
            "doc_starts": "bool",
            "ids": id_dtype,
            "counts": "uint8",
            "n_entries": "uint8",
            "logprobs": "float32",
            "tail_mass": "float32",
            "ids_table": id_dtype,
        }
        self.codecs = {
            f: FieldCodec(spec.codecs[f], dtypes[f], 64 + 4 * values.get(f, tokens))
            for f in (*self.fields, "ids_table")
        }

    # -- the shard's id table ---------------------------------------------------------------
    def make_table(self, records: Sequence[SequenceRecord]) -> np.ndarray:
        """[<= TABLE_SIZE] the shard's most frequent stored ids, most frequent first, ties by
        smaller id."""
        freq = np.bincount(
            np.concatenate([r.ids for r in records]).astype(np.int64),
            minlength=self.spec.vocab_size,
        )
        order = np.argsort(-freq, kind="stable")[:TABLE_SIZE]
        return order[freq[order] > 0].astype(np.uint32)

    def encode_table(self, table: np.ndarray) -> bytes:
        return self.codecs["ids_table"].encode(table)

    def decode_table(self, blob: Any, where: str) -> np.ndarray:
        """[V] uint32 rank -> id: the table's ids, then every other id in increasing order."""
        try:
            table = self.codecs["ids_table"].decode(blob).astype(np.int64)
        except CacheError as err:
            raise CacheError(f"{where}: id table: {err}") from None
        vocab = self.spec.vocab_size
        if table.size and (table.max() >= vocab or np.unique(table).size != table.size):
            raise CacheError(f"{where}: id table holds ids >= vocab_size {vocab} or repeats")
        return self.expand_table(table)

    def expand_table(self, table: np.ndarray) -> np.ndarray:
        """[V] uint32 rank -> id from a shard's table of distinct ids < V."""
        listed = np.zeros(self.spec.vocab_size, dtype=bool)
        listed[table] = True
        return np.concatenate([table, np.flatnonzero(~listed)]).astype(np.uint32)

    # -- groups ----------------------------------------------------------------------------
    def encode(self, records: Sequence[SequenceRecord], rank_to_id: np.ndarray) -> dict[str, bytes]:
        """One group (consecutive records of one shard) -> a blob per field."""
        id_to_rank = np.empty_like(rank_to_id)
        id_to_rank[rank_to_id] = np.arange(rank_to_id.size, dtype=rank_to_id.dtype)
        arrays = _concat(records)
        arrays["input_ids"] = id_to_rank[arrays["input_ids"]]  # frequent tokens: small codes
        ranks = id_to_rank[arrays["ids"]].astype(np.int64)  # [E]
        if self.spec.mode == "sampled":
            n = arrays["n_entries"]
            pos = np.repeat(np.arange(n.size), n)  # [E] position of each entry
            perm = np.lexsort((ranks, pos))
            ranks = ranks[perm]
            for name in ("counts", "logprobs"):
                if arrays.get(name) is not None:
                    arrays[name] = arrays[name][perm]
            gaps = np.diff(ranks, prepend=0)
            starts = np.cumsum(n) - n  # first entry of each position
            gaps[starts] = ranks[starts]
            ranks = gaps
            keep = np.ones(ranks.size, dtype=bool)
            keep[starts + n - 1] = False  # the last count of a position is N - the others
            arrays["counts"] = arrays["counts"][keep]
        arrays["ids"] = ranks
        # an empty field (counts when every position holds one id) is an empty blob: zstd
        # frames of nothing do not decode in numcodecs 0.16
        return {f: self.codecs[f].encode(arrays[f]) if arrays[f].size else b"" for f in self.fields}

    def decode(
        self, first_index: int, blobs: dict[str, Any], rank_to_id: np.ndarray, where: str
    ) -> list[SequenceRecord]:
        """One group's blobs -> its records (indices ``first_index``, ``first_index + 1``...)."""
        a = {}
        for name in self.fields:
            if name not in blobs:
                raise CacheError(f"{where}: field {name!r} missing")
            try:
                codec = self.codecs[name]
                blob = blobs[name]
                a[name] = codec.decode(blob) if len(blob) else np.zeros(0, codec.dtype)
            except CacheError as err:
                raise CacheError(f"{where}: field {name!r}: {err}") from None
        spec = self.spec
        lengths = a["lengths"].astype(np.int64)  # [B]
        if not 1 <= lengths.size <= self.size or lengths.min() < 2 or lengths.max() > spec.seq_len:
            raise CacheError(f"{where}: sequence lengths outside [2, seq_len={spec.seq_len}]")
        n_tok = int(lengths.sum())
        n_pos = n_tok - lengths.size
        if spec.mode == "topk":
            n = np.full(n_pos, spec.k, dtype=np.int32)
        else:
            n = a["n_entries"].astype(np.int32)
            if n.size != n_pos or (n.size and (n.min() < 1 or n.max() > spec.samples)):
                raise CacheError(f"{where}: entry counts disagree with {n_pos} positions")
        n_ent = int(n.sum())
        self._check_sizes(a, n_tok, n_pos, n_ent, where)
        if a["input_ids"].size and int(a["input_ids"].max()) >= spec.vocab_size:
            raise CacheError(f"{where}: input_ids holds a rank >= vocab_size {spec.vocab_size}")
        a["input_ids"] = np.take(rank_to_id, a["input_ids"])  # [T] uint32
        ranks = a["ids"]
        if spec.mode == "sampled":
            ranks = _ungap(ranks, n)
            a["counts"] = _last_counts(a["counts"], n, spec.samples, where)
        if ranks.size and int(ranks.max()) >= spec.vocab_size:
            raise CacheError(f"{where}: ids hold a rank >= vocab_size {spec.vocab_size}")
        a["ids"] = np.take(rank_to_id, ranks)  # [E] uint32 (take: 2x faster than [ranks])
        a["n_entries"] = n
        return _split(first_index, lengths, a, spec)

    def _check_sizes(self, a: dict, n_tok: int, n_pos: int, n_ent: int, where: str) -> None:
        expect = {
            "input_ids": n_tok,
            "loss_mask": n_tok,
            "doc_starts": n_tok,
            "ids": n_ent,
            "counts": n_ent - n_pos,
            "logprobs": n_ent,
            "tail_mass": n_pos,
        }
        for name, size in expect.items():
            if name in a and a[name].size != size:
                raise CacheError(f"{where}: {name} has {a[name].size} values, expected {size}")


def _concat(records: Sequence[SequenceRecord]) -> dict[str, np.ndarray]:
    """The group's fields, concatenated over its records (doc starts as a token mask)."""
    out: dict[str, Any] = {"lengths": np.array([r.n_tokens for r in records], dtype=np.uint32)}
    for name in ("input_ids", "loss_mask", "ids", "n_entries", "counts", "logprobs", "tail_mass"):
        parts = [getattr(r, name) for r in records]
        out[name] = None if any(p is None for p in parts) else np.concatenate(parts)
    mask = np.zeros(int(out["lengths"].sum()), dtype=bool)
    start = 0
    for r in records:
        starts = np.asarray(r.doc_starts, dtype=np.int64)
        if starts.size and (
            starts.min() < 0 or starts.max() >= r.n_tokens or (np.diff(starts) <= 0).any()
        ):
            raise CacheError(f"sequence {r.index}: doc_starts must increase and be < {r.n_tokens}")
        mask[start + starts] = True
        start += r.n_tokens
    out["doc_starts"] = mask
    return out


def _ungap(gaps: np.ndarray, n: np.ndarray) -> np.ndarray:
    """[E] ranks from their gaps within each position (n[p] entries, the first as is)."""
    total = np.cumsum(gaps, dtype=np.int64)  # [E]
    before = np.zeros(n.size, dtype=np.int64)
    ends = np.cumsum(n)
    before[1:] = total[ends[:-1] - 1] if total.size else 0  # sum of the earlier positions
    return total - np.repeat(before, n)


def _last_counts(stored: np.ndarray, n: np.ndarray, samples: int, where: str) -> np.ndarray:
    """[E] uint8 counts from all but the last of each position's (the last: N - the rest)."""
    last = np.cumsum(n) - 1  # [P]
    keep = np.ones(int(last[-1]) + 1, dtype=bool)
    keep[last] = False
    counts = np.zeros(keep.size, dtype=np.uint8)
    counts[keep] = stored
    derived = samples - np.add.reduceat(counts, last - n + 1, dtype=np.int64)  # [P]
    if derived.min() < 0:
        raise CacheError(f"{where}: counts do not add up to samples={samples}")
    counts[last] = derived
    return counts


def _split(
    first_index: int, lengths: np.ndarray, a: dict[str, np.ndarray], spec: CacheSpec
) -> list[SequenceRecord]:
    tok = np.concatenate([[0], np.cumsum(lengths)])  # token offsets of the sequences
    pos = tok - np.arange(lengths.size + 1)  # position offsets (T - 1 each)
    ent = np.concatenate([[0], np.cumsum(a["n_entries"], dtype=np.int64)])[pos]
    out = []
    for i in range(lengths.size):
        t0, t1, p0, p1, e0, e1 = tok[i], tok[i + 1], pos[i], pos[i + 1], ent[i], ent[i + 1]
        record = SequenceRecord(
            index=first_index + i,
            input_ids=a["input_ids"][t0:t1],
            loss_mask=a["loss_mask"][t0:t1],
            doc_starts=np.flatnonzero(a["doc_starts"][t0:t1]).astype(np.uint32),
            ids=a["ids"][e0:e1],
            n_entries=a["n_entries"][p0:p1],
            tail_mass=a["tail_mass"][p0:p1] if "tail_mass" in a else None,
            logprobs=a["logprobs"][e0:e1] if "logprobs" in a else None,
            counts=a["counts"][e0:e1] if "counts" in a else None,
        )
        out.append(record)
    return out


class FormatV2:
    """Shards of one format 2 spec: groups of sequences, ids as ranks of a per-shard table."""

    version = 2
    newest_minor = 1
    keeps_decoded = True

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.groups = GroupCodec(spec)
        self.fields = self.groups.fields
        """The container's columns."""
        self.sequences_per_row = self.groups.size

    # -- what a writer puts in a new spec and manifest ------------------------------------
    @staticmethod
    def default_codecs(
        vocab_size: int, *, logprobs: str, step: float, zstd_level: int | None, mode: str
    ) -> dict[str, list[dict[str, Any]]]:
        """Format 2's chains (``zstd_level`` None: the mode's default)."""
        level = {} if zstd_level is None else {"zstd_level": zstd_level}
        return v2_codecs(vocab_size, mode=mode, logprobs=logprobs, step=step, **level)

    @staticmethod
    def fields_for(spec: CacheSpec) -> tuple[str, ...]:
        """The container's columns for ``spec`` (``fields`` of a codec of it)."""
        return group_fields(spec)

    @staticmethod
    def group_sequences(seq_len: int, shard_sequences: int) -> int:
        """The writers' ``batch_sequences`` (readers read the spec's)."""
        return default_group_sequences(seq_len, shard_sequences)

    @staticmethod
    def format_minor(spec: CacheSpec, stores_tokenizer: bool) -> int:
        """2.1 with ``fingerprint_full``, else 2.0 (2.0 already has ``tokenizer_files``)."""
        return int(FULL_FINGERPRINT in spec.tokenizer)

    @staticmethod
    def version_label(minor: int) -> str:
        return f"2.{minor}" if minor else "2"

    # -- shards ---------------------------------------------------------------------------
    def rows(self, n_sequences: int) -> int:
        """Container rows of a shard of ``n_sequences``."""
        return -(-n_sequences // self.groups.size)

    def encode_shard(
        self,
        records: Sequence[SequenceRecord],
        map_: Mapper = map,
    ) -> Rows:
        """(container rows, the first sequence index of each, shard-level blobs)."""
        codec = self.groups
        fields = codec.record_fields
        list(map_(lambda r: check_record(self.spec, r, fields, encoding=True), records))
        table = codec.make_table(records)
        rank_to_id = codec.expand_table(table)
        b = codec.size
        groups = [records[i : i + b] for i in range(0, len(records), b)]
        rows = list(map_(lambda rs: codec.encode(rs, rank_to_id), groups))
        return rows, [rs[0].index for rs in groups], {"ids_table": codec.encode_table(table)}

    def shard_table(self, handle: Any, info: ShardInfo) -> np.ndarray:
        """[V] rank -> id of the shard ``handle`` (its stored id table, checked)."""
        blob = handle.shard_blobs.get("ids_table")
        if blob is None:
            raise ShardCorruptError(f"shard {info.path} has no id table")
        return self.groups.decode_table(blob, f"shard {info.path}")

    def decode_row(
        self, handle: Any, info: ShardInfo, row: int, table: Callable[[], np.ndarray]
    ) -> list[SequenceRecord]:
        """The sequences of group ``row`` of the shard ``info``; ``table()``: its id table."""
        size = self.groups.size
        first = info.first_sequence + row * size
        where = f"shard {info.path} group {row}"
        stored_index, blobs = handle.read(row)
        if stored_index != first:
            raise ShardCorruptError(f"{where}: starts at sequence {stored_index}, expected {first}")
        try:
            records = self.groups.decode(first, blobs, table(), where)
        except ShardCorruptError:
            raise
        except CacheError as err:  # the bytes of a listed shard: damaged
            raise ShardCorruptError(str(err)) from None
        expected = min(size, info.n_sequences - row * size)
        if len(records) != expected:
            raise ShardCorruptError(f"{where}: holds {len(records)} sequences, expected {expected}")
        return records
