"""Format 1: one container row per sequence (``RecordCodec``), no shard blobs.

In: a ``SequenceRecord`` and the cache spec. Out: ``dict[str, bytes]``, one codec-compressed
blob per field (``record_fields``), which a container stores as one row; and back. Its ids
are bit-planes sized to the vocabulary and every field is a zstd frame per sequence
(``v1_codecs``, built from the generic codecs of ``storage/codecs.py``); the spec has no
``batch_sequences``. Minor versions: 1.1 lists the tokenizer's files, 1.2 adds
``spec.tokenizer.fingerprint_full``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from logitcache.core.identity import FULL_FINGERPRINT

from ..codecs import FieldCodec, FloatCodec, IdsCodec, bits_for_vocab, logprob_codec_config
from ..errors import CacheError, ShardCorruptError
from ..record import SequenceRecord, check_record
from .base import Mapper, Rows

if TYPE_CHECKING:
    from ..spec import CacheSpec, ShardInfo

__all__ = ["FIELD_DTYPES", "FormatV1", "RecordCodec", "record_fields", "v1_codecs"]

_ZSTD_LEVEL = 3


FIELD_DTYPES = {
    "input_ids": "uint32",
    "loss_mask": "bool",
    "doc_starts": "uint32",
    "ids": "uint32",
    "logprobs": "float32",
    "counts": "uint8",
    "n_entries": "uint8",
    "tail_mass": "float32",
}
"""The dtype each format 1 field is stored as and decodes to (``RecordCodec``)."""


def v1_codecs(
    vocab_size: int, *, logprobs: str = "lossy", step: float = 1 / 32, zstd_level: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Format 1's codec chains of every field, manifest-ready (``formats.default_codecs``
    picks a version's). ``logprobs``: ``lossy`` (LogprobCodec at ``step``), ``float16`` or
    ``float32``."""
    zstd_level = _ZSTD_LEVEL if zstd_level is None else zstd_level
    # A 4-byte checksum per frame (~32 B per sequence) makes a damaged blob fail to decode
    # even when a reader skips the shard hash (--no-verify).
    zstd = {"id": "zstd", "level": zstd_level, "checksum": True}
    ids = {"id": IdsCodec.codec_id, "bits": bits_for_vocab(vocab_size)}
    lp = logprob_codec_config(logprobs, step)
    return {
        "input_ids": [ids, zstd],
        "loss_mask": [{"id": "packbits"}, zstd],
        "doc_starts": [{"id": IdsCodec.codec_id, "bits": 32}, zstd],
        "ids": [ids, zstd],
        "logprobs": [lp, zstd],
        "counts": [zstd],
        "n_entries": [zstd],
        "tail_mass": [{"id": FloatCodec.codec_id, "dtype": "float16"}, zstd],
    }


def record_fields(spec: CacheSpec) -> tuple[str, ...]:
    """The fields a record of this spec stores, in container column order."""
    names = ["input_ids", "loss_mask", "doc_starts", "ids", "tail_mass"]
    if spec.mode == "topk":
        names.append("logprobs")
    else:
        names += ["counts", "n_entries"] + (["logprobs"] if spec.sampled_logprobs else [])
    return tuple(names)


def _max_field_bytes(spec: CacheSpec, name: str) -> int:
    """Most bytes a field of one record can encode to before zstd: a 16-byte header and at
    most 4 bytes per value (seq_len 2048, k=64: 524 kB for ids)."""
    per_position = spec.k if spec.mode == "topk" else min(spec.samples, spec.vocab_size)
    values = {
        "ids": (spec.seq_len - 1) * per_position,
        "logprobs": (spec.seq_len - 1) * per_position,
        "counts": (spec.seq_len - 1) * per_position,
    }.get(name, spec.seq_len)
    return 64 + 4 * values


class RecordCodec:
    """Encodes and decodes records of one spec; also validates decoded content."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.fields = record_fields(spec)
        if "ids_table" in spec.codecs:  # format 2's chains would misread format 1 rows
            raise CacheError("cache spec has format 2 codecs but no 'batch_sequences'")
        missing = [f for f in self.fields if f not in spec.codecs]
        if missing:
            raise CacheError(f"cache spec has no codec for fields {missing}")
        self.codecs = {
            f: FieldCodec(spec.codecs[f], FIELD_DTYPES[f], _max_field_bytes(spec, f))
            for f in self.fields
        }

    def encode(self, record: SequenceRecord) -> dict[str, bytes]:
        check_record(self.spec, record, self.fields, encoding=True)
        out = {}
        for name in self.fields:
            out[name] = self.codecs[name].encode(getattr(record, name))
        return out

    def decode(self, index: int, blobs: dict[str, bytes], where: str) -> SequenceRecord:
        arrays = {}
        for name in self.fields:
            if name not in blobs:
                raise CacheError(f"{where}: field {name!r} missing")
            try:
                arrays[name] = self.codecs[name].decode(blobs[name])
            except CacheError as err:
                raise CacheError(f"{where}: field {name!r}: {err}") from None
        n_positions = arrays["input_ids"].shape[0] - 1
        if self.spec.mode == "topk":
            arrays["n_entries"] = np.full(max(n_positions, 0), self.spec.k, dtype=np.int32)
        else:
            arrays["n_entries"] = arrays["n_entries"].astype(np.int32)
        record = SequenceRecord(index=index, **arrays)
        check_record(self.spec, record, self.fields, where=where)
        return record


class FormatV1:
    """Shards of one format 1 spec: a row per sequence, each row's index checked on read."""

    version = 1
    newest_minor = 2
    keeps_decoded = False

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.records = RecordCodec(spec)
        self.fields = self.records.fields
        """The container's columns."""
        self.sequences_per_row = 1

    # -- what a writer puts in a new spec and manifest ------------------------------------
    @staticmethod
    def default_codecs(
        vocab_size: int, *, logprobs: str, step: float, zstd_level: int | None, mode: str
    ) -> dict[str, list[dict[str, Any]]]:
        """Format 1's chains (the same for both modes)."""
        return v1_codecs(vocab_size, logprobs=logprobs, step=step, zstd_level=zstd_level)

    @staticmethod
    def fields_for(spec: CacheSpec) -> tuple[str, ...]:
        """The container's columns for ``spec`` (``fields`` of a codec of it)."""
        return record_fields(spec)

    @staticmethod
    def group_sequences(seq_len: int, shard_sequences: int) -> None:
        """Format 1 has no batches: its spec has no ``batch_sequences``."""
        return None

    @staticmethod
    def format_minor(spec: CacheSpec, stores_tokenizer: bool) -> int:
        """1.2 with ``fingerprint_full``, 1.1 with stored tokenizer files, else 1.0."""
        if FULL_FINGERPRINT in spec.tokenizer:
            return 2
        return int(stores_tokenizer)

    @staticmethod
    def version_label(minor: int) -> str:
        return f"1.{minor}"

    # -- shards ---------------------------------------------------------------------------
    def rows(self, n_sequences: int) -> int:
        """Container rows of a shard of ``n_sequences``."""
        return n_sequences

    def encode_shard(
        self,
        records: Sequence[SequenceRecord],
        map_: Mapper = map,
    ) -> Rows:
        """(container rows, the first sequence index of each, shard-level blobs)."""
        return list(map_(self.records.encode, records)), [r.index for r in records], {}

    def shard_table(self, handle: Any, info: ShardInfo) -> None:
        """Format 1 shards have no shard-level blobs."""
        return None

    def decode_row(
        self, handle: Any, info: ShardInfo, row: int, table: Callable[[], Any]
    ) -> list[SequenceRecord]:
        """The sequence in container row ``row`` of the shard ``info`` (``table`` unused)."""
        stored_index, blobs = handle.read(row)
        where = f"shard {info.path} row {row}"
        if stored_index != info.first_sequence + row:
            raise ShardCorruptError(
                f"{where}: holds sequence {stored_index}, expected {info.first_sequence + row}"
            )
        return [self.records.decode(stored_index, blobs, where)]
