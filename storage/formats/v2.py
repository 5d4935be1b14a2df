"""Format 2: a container row per batch of ``batch_sequences`` sequences (``batch.py``'s
``BatchCodec``), and one shard blob, the id table that maps ranks to ids.

Its chains are ``codecs.v2_codecs`` (byte-shuffled ranks, zstd level by mode). Minor
version 2.1 adds ``spec.tokenizer.fingerprint_full`` (2.0 already lists tokenizer files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from logitcache.identity import FULL_FINGERPRINT

from ..batch import BatchCodec, batch_fields, default_batch_sequences
from ..codecs import v2_codecs
from ..errors import CacheError, ShardCorruptError
from ..record import SequenceRecord, check_record
from .base import Mapper, Rows

if TYPE_CHECKING:
    from ..format import CacheSpec, Manifest, ShardInfo

__all__ = ["FormatV2"]


class FormatV2:
    """Shards of one format 2 spec: batches of sequences, ids as ranks of a per-shard table."""

    version = 2
    newest_minor = 1
    keeps_decoded = True

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.batches = BatchCodec(spec)
        self.fields = self.batches.fields
        """The container's columns."""
        self.sequences_per_row = self.batches.batch

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
        return batch_fields(spec)

    @staticmethod
    def batch_sequences(seq_len: int, shard_sequences: int) -> int:
        """The writers' ``batch_sequences`` (readers read the spec's)."""
        return default_batch_sequences(seq_len, shard_sequences)

    @staticmethod
    def format_minor(manifest: Manifest) -> int:
        """2.1 with ``fingerprint_full``, else 2.0."""
        return int(FULL_FINGERPRINT in manifest.spec.tokenizer)

    @staticmethod
    def version_label(minor: int) -> str:
        return f"2.{minor}" if minor else "2"

    # -- shards ---------------------------------------------------------------------------
    def rows(self, n_sequences: int) -> int:
        """Container rows of a shard of ``n_sequences``."""
        return -(-n_sequences // self.batches.batch)

    def encode_shard(
        self,
        records: Sequence[SequenceRecord],
        map_: Mapper = map,
    ) -> Rows:
        """(container rows, the first sequence index of each, shard-level blobs)."""
        codec = self.batches
        for r in records:
            check_record(self.spec, r, codec.record_fields, encoding=True)
        table = codec.make_table(records)
        rank_to_id = codec.expand_table(table)
        b = codec.batch
        batches = [records[i : i + b] for i in range(0, len(records), b)]
        rows = list(map_(lambda rs: codec.encode(rs, rank_to_id), batches))
        return rows, [rs[0].index for rs in batches], {"ids_table": codec.encode_table(table)}

    def shard_table(self, handle: Any, info: ShardInfo) -> np.ndarray:
        """[V] rank -> id of the shard ``handle`` (its stored id table, checked)."""
        blob = handle.shard_blobs.get("ids_table")
        if blob is None:
            raise ShardCorruptError(f"shard {info.path} has no id table")
        return self.batches.decode_table(blob, f"shard {info.path}")

    def decode_row(
        self, handle: Any, info: ShardInfo, row: int, table: Callable[[], np.ndarray]
    ) -> list[SequenceRecord]:
        """The sequences of batch ``row`` of the shard ``info``; ``table()``: its id table."""
        size = self.batches.batch
        first = info.first_sequence + row * size
        where = f"shard {info.path} batch {row}"
        stored_index, blobs = handle.read(row)
        if stored_index != first:
            raise ShardCorruptError(f"{where}: starts at sequence {stored_index}, expected {first}")
        try:
            records = self.batches.decode(first, blobs, table(), where)
        except ShardCorruptError:
            raise
        except CacheError as err:  # the bytes of a listed shard: damaged
            raise ShardCorruptError(str(err)) from None
        expected = min(size, info.n_sequences - row * size)
        if len(records) != expected:
            raise ShardCorruptError(f"{where}: holds {len(records)} sequences, expected {expected}")
        return records
