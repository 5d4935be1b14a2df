"""The Arrow IPC file layout of a shard, read by hand and checked before pyarrow reads it.

In: a shard's bytes, read at offsets (a memory map, a ranged remote file). Out: the footer's
record batch blocks, and for one block a check of its message header; or a one-line
``ShardCorruptError``.

pyarrow trusts what a file declares: a record batch whose header names a compression codec
has its buffers inflated to the sizes they declare (a 42 kB shard made a reader take 2 GB),
before any code of ours sees a byte. Our writer never compresses at the Arrow level (the
blobs are zstd frames already) and writes one row per record batch, int64 ``index`` then
binary columns, no dictionaries, no nulls; a file that declares anything else is refused
here. The flatbuffer tables read (``File.fbs``, ``Message.fbs``, ``Schema.fbs`` of the Arrow
format) are a few fields each: every offset is bounds-checked, so a forged header can only
be refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .errors import ShardCorruptError

__all__ = ["Block", "check_batch_header", "read_footer"]

_MAGIC = b"ARROW1"
_CONTINUATION = 0xFFFFFFFF
_RECORD_BATCH = 3  # MessageHeader union: Schema 1, DictionaryBatch 2, RecordBatch 3
_MAX_MESSAGE_BYTES = 1 << 16  # a record batch header of ours is ~300 B (12 columns)


class _Invalid(Exception):
    """A flatbuffer offset or value outside what it may be (caught and named by callers)."""


class _Table:
    """One flatbuffer table at ``pos`` of ``buf``: fields by their index in the schema."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - _get(buf, "<i", pos)
        self.vtable_len = _get(buf, "<H", self.vtable)

    def _field(self, i: int) -> int | None:
        slot = 4 + 2 * i
        if slot + 2 > self.vtable_len:
            return None
        offset = _get(self.buf, "<H", self.vtable + slot)
        return self.pos + offset if offset else None

    def has(self, i: int) -> bool:
        return self._field(i) is not None

    def scalar(self, i: int, fmt: str, default: int = 0) -> int:
        at = self._field(i)
        return default if at is None else _get(self.buf, fmt, at)

    def table(self, i: int) -> _Table | None:
        at = self._field(i)
        return None if at is None else _Table(self.buf, at + _get(self.buf, "<I", at))

    def structs(self, i: int, fmt: str) -> list[tuple]:
        """A vector of structs (``fmt`` each); empty if absent."""
        at = self._field(i)
        if at is None:
            return []
        start = at + _get(self.buf, "<I", at)
        count = _get(self.buf, "<I", start)
        size = struct.calcsize(fmt)
        if start + 4 + count * size > len(self.buf):
            raise _Invalid(f"a vector of {count} entries runs past its {len(self.buf)} bytes")
        return [struct.unpack_from(fmt, self.buf, start + 4 + j * size) for j in range(count)]


def _get(buf: bytes, fmt: str, pos: int) -> Any:
    if not 0 <= pos <= len(buf) - struct.calcsize(fmt):
        raise _Invalid(f"offset {pos} outside its {len(buf)} bytes")
    return struct.unpack_from(fmt, buf, pos)[0]


@dataclass(frozen=True)
class Block:
    """Where one record batch lies in the file (its header, then its body)."""

    offset: int
    header_bytes: int
    body_bytes: int


def read_footer(read_at: Any, size: int, where: str) -> list[Block]:
    """The record batch blocks of an IPC file of ``size`` bytes (``read_at(offset, n)``),
    each inside the file; refused if the footer lists dictionaries or is malformed."""
    if size < 8 + 10:
        raise ShardCorruptError(f"{where} is not a readable Arrow file: {size} bytes")
    tail = read_at(size - 10, 10)
    footer_len = int.from_bytes(tail[:4], "little", signed=True)
    if tail[4:] != _MAGIC or not 0 < footer_len <= size - 18:
        raise ShardCorruptError(f"{where} is not a readable Arrow file: no footer")
    footer = read_at(size - 10 - footer_len, footer_len)
    try:
        root = _Table(footer, _get(footer, "<I", 0))
        if root.structs(2, "<qi4xq"):
            raise _Invalid("it holds dictionary batches, which a shard never has")
        blocks = [Block(*b) for b in root.structs(3, "<qi4xq")]
    except _Invalid as err:
        raise ShardCorruptError(f"{where}: malformed Arrow footer: {err}") from None
    body_end = size - 10 - footer_len
    for j, b in enumerate(blocks):
        end = b.offset + b.header_bytes + b.body_bytes
        if b.offset < 8 or not 8 <= b.header_bytes <= _MAX_MESSAGE_BYTES or b.body_bytes < 0:
            raise ShardCorruptError(f"{where}: record batch {j} has a malformed block {b}")
        if end > body_end:
            raise ShardCorruptError(
                f"{where}: record batch {j} ends at byte {end}, past the data ({body_end} bytes)"
            )
    return blocks


def check_batch_header(read_at: Any, block: Block, n_columns: int, where: str) -> None:
    """Refuse a record batch whose header declares anything our writer never writes: Arrow
    compression, other than one row, other columns, nulls, or buffers outside its body."""
    data = read_at(block.offset, block.header_bytes)
    try:
        start = 8 if _get(data, "<I", 0) == _CONTINUATION else 4
        message = _Table(data, start + _get(data, "<I", start))
        if message.scalar(1, "<B") != _RECORD_BATCH:
            raise _Invalid("the message is not a record batch")
        if message.scalar(3, "<q") != block.body_bytes:
            raise _Invalid("its body length disagrees with the footer")
        batch = message.table(2)
        if batch is None:
            raise _Invalid("it has no record batch header")
        if batch.has(3):
            raise _Invalid("its buffers are compressed at the Arrow level, which a shard never is")
        if batch.has(4):
            raise _Invalid("it declares variadic buffers, which a shard never has")
        rows = batch.scalar(0, "<q")
        if rows != 1:
            raise _Invalid(f"it declares {rows} rows, not 1")
        nodes = batch.structs(1, "<qq")
        if len(nodes) != n_columns or any(node != (1, 0) for node in nodes):
            raise _Invalid(f"its columns are not {n_columns} columns of one non-null value")
        buffers = batch.structs(2, "<qq")
        if len(buffers) != 2 + 3 * (n_columns - 1):  # int64: validity, data; binary: + offsets
            raise _Invalid(f"it declares {len(buffers)} buffers for {n_columns} columns")
        for offset, length in buffers:
            if offset < 0 or length < 0 or offset + length > block.body_bytes:
                raise _Invalid(f"a buffer ({offset}, {length}) lies outside its body")
    except _Invalid as err:
        raise ShardCorruptError(f"{where}: {err}; refusing to read it") from None
