"""Format 1: one container row per sequence (``record.py``'s ``RecordCodec``), no shard blobs.

Its ids are bit-planes sized to the vocabulary and every field is a zstd frame per sequence
(``codecs.v1_codecs``); the spec has no ``batch_sequences``. Minor versions: 1.1 lists the
tokenizer's files, 1.2 adds ``spec.tokenizer.fingerprint_full``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from logitcache.identity import FULL_FINGERPRINT

from ..codecs import v1_codecs
from ..errors import ShardCorruptError
from ..record import RecordCodec, SequenceRecord, record_fields
from .base import Mapper, Rows

if TYPE_CHECKING:
    from ..format import CacheSpec, Manifest, ShardInfo

__all__ = ["FormatV1"]


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
    def batch_sequences(seq_len: int, shard_sequences: int) -> None:
        """Format 1 has no batches: its spec has no ``batch_sequences``."""
        return None

    @staticmethod
    def format_minor(manifest: Manifest) -> int:
        """1.2 with ``fingerprint_full``, 1.1 with stored tokenizer files, else 1.0."""
        if FULL_FINGERPRINT in manifest.spec.tokenizer:
            return 2
        return int(bool(manifest.tokenizer_files))

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
