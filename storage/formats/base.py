"""What every format version provides: the ``ShardFormat`` interface of ``v1.py``, ``v2.py``.

In: a ``CacheSpec`` of the version (the constructor) or nothing (the static members, used
before a spec exists). Out: the container columns and rows of a shard, and its records
encoded to container rows and decoded back, each row's identity checked on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..record import SequenceRecord
    from ..spec import CacheSpec, ShardInfo

__all__ = ["Mapper", "Rows", "ShardFormat"]

Rows = tuple[list[dict[str, bytes]], list[int], dict[str, bytes]]
"""(container rows, the first sequence index of each row, the shard's own blobs)."""
Mapper = Callable[[Callable[[Any], dict[str, bytes]], Iterable[Any]], Iterator[Any]]
"""``map`` or an executor's ``map``: how rows are encoded (in threads by the writer)."""


class ShardFormat(Protocol):
    """One format version, for one spec (or, for the static members, for any)."""

    version: int
    """The major version (``manifest.json``'s ``format_version``)."""
    newest_minor: int
    """The newest minor version of this major that this logitcache writes."""
    spec: CacheSpec
    fields: tuple[str, ...]
    """The container's columns, in order."""
    sequences_per_row: int
    """Sequences in one container row (the last row of a shard may hold fewer)."""
    keeps_decoded: bool
    """Whether a reader keeps decoded rows for the row's other sequences (format 2's
    batches), or decodes each read anew (format 1: a row is one sequence)."""

    def __init__(self, spec: CacheSpec) -> None: ...

    # what a writer puts in a new spec and manifest
    @staticmethod
    def default_codecs(
        vocab_size: int, *, logprobs: str, step: float, zstd_level: int | None, mode: str
    ) -> dict[str, list[dict[str, Any]]]: ...

    @staticmethod
    def fields_for(spec: CacheSpec) -> tuple[str, ...]: ...

    @staticmethod
    def group_sequences(seq_len: int, shard_sequences: int) -> int | None: ...

    @staticmethod
    def format_minor(spec: CacheSpec, stores_tokenizer: bool) -> int: ...

    @staticmethod
    def version_label(minor: int) -> str: ...

    # shards
    def rows(self, n_sequences: int) -> int: ...

    def encode_shard(self, records: Sequence[SequenceRecord], map_: Mapper = map) -> Rows: ...

    def shard_table(self, handle: Any, info: ShardInfo) -> Any: ...

    def decode_row(
        self, handle: Any, info: ShardInfo, row: int, table: Callable[[], Any]
    ) -> list[SequenceRecord]: ...
