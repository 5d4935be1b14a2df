"""Codecs for the arrays of one cached sequence, as numcodecs ``Codec`` subclasses.

In: the numpy arrays of a ``SequenceRecord``. Out: one compressed ``bytes`` blob per field,
identical for both containers. Each field has a chain (our codec, then zstd) whose configs
go into the manifest, so a cache names exactly how to decode itself.

Registered ids (prefix ``logitcache.``):
- ``logitcache.ids``: token ids as bit-planes sized to the vocabulary: whole byte planes
  plus one packed plane of 1, 2 or 4 bits (18 bits for 151,936 -> 2.25 B/id before zstd;
  9 bits for a 300-token vocab -> 1.125 B/id).
- ``logitcache.logprob``: lossy log-probabilities: uint16 codes round(-lp / step),
  delta-coded modulo 2**16 in stored order (consecutive sorted log-probs give small
  non-negative gaps), byte planes. |error| <= step / 2 per value; -inf round-trips exactly.
- ``logitcache.float``: lossless float32 or float16 (a cast), as byte planes.
Only these and numcodecs' ``zstd``, ``packbits`` and ``shuffle`` (format v2: byte planes) are
accepted from a manifest: a manifest can never name ``pickle`` or any other codec that
executes code. Each format's chains live with its version: ``v1_codecs`` in
``storage/formats/v1.py``, ``v2_codecs`` in ``storage/formats/v2.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numcodecs
import numpy as np
from numcodecs.abc import Codec

from .errors import CacheError

__all__ = [
    "ALLOWED_CODEC_IDS",
    "FieldCodec",
    "FloatCodec",
    "IdsCodec",
    "LogprobCodec",
    "bits_for_vocab",
    "logprob_codec_config",
    "zstd_declared_size",
]


def bits_for_vocab(vocab_size: int) -> int:
    """Bits needed for ids in [0, vocab_size)."""
    return max(1, int(vocab_size - 1).bit_length())


def _to_planes(data: np.ndarray) -> bytes:
    """Little-endian byte planes of an unsigned array: all low bytes, then the next, ..."""
    return np.ascontiguousarray(data.view(np.uint8).reshape(-1, data.itemsize).T).tobytes()


def _from_planes(buf: bytes | memoryview, dtype: np.dtype, n: int) -> np.ndarray:
    """Inverse of _to_planes; shift-or of contiguous planes (3x faster than a transpose)."""
    dtype = np.dtype(dtype)
    planes = np.frombuffer(buf, dtype=np.uint8, count=n * dtype.itemsize)
    planes = planes.reshape(dtype.itemsize, n)
    out = planes[0].astype(dtype)
    for j in range(1, dtype.itemsize):
        out |= planes[j].astype(dtype) << (8 * j)
    return out


def _header(n: int, tag: int = 0) -> bytes:
    return np.array([n, tag], dtype="<u8").tobytes()


def _read_header(buf: bytes | memoryview) -> tuple[int, int, memoryview]:
    view = memoryview(buf).cast("B")
    if len(view) < 16:
        raise CacheError("encoded field is truncated (no header)")
    n, tag = (int(x) for x in np.frombuffer(view[:16], dtype="<u8"))
    return n, tag, view[16:]


def _check_size(payload: memoryview, expected: int, what: str) -> None:
    if len(payload) != expected:
        raise CacheError(f"{what}: expected {expected} bytes, found {len(payload)}")


class IdsCodec(Codec):
    """Non-negative integer ids < 2**bits as byte planes plus one packed plane."""

    codec_id = "logitcache.ids"

    def __init__(self, bits: int) -> None:
        if not 1 <= int(bits) <= 32:
            raise CacheError(f"logitcache.ids: bits must be in 1..32, got {bits}")
        self.bits = int(bits)

    @property
    def _layout(self) -> tuple[int, int]:
        """(whole byte planes, bits in the packed plane: 0, 1, 2, 4 or 8)."""
        full, rest = divmod(self.bits, 8)
        rest = next(r for r in (0, 1, 2, 4, 8) if r >= rest)
        if rest == 8:
            full, rest = full + 1, 0
        return full, rest

    def encode(self, buf: Any) -> bytes:
        ids = np.asarray(buf).reshape(-1)
        if ids.size and (ids.min() < 0 or int(ids.max()) >> self.bits):
            raise CacheError(f"logitcache.ids: id out of range for {self.bits} bits")
        ids = ids.astype(np.uint32, copy=False)
        full, rest = self._layout
        parts = [_header(ids.size)]
        if full:
            low_dtype = {1: np.uint8, 2: np.uint16, 3: np.uint32, 4: np.uint32}[full]
            low = (ids & ((1 << (8 * full)) - 1)).astype(low_dtype)
            planes = np.ascontiguousarray(low.view(np.uint8).reshape(-1, low.itemsize).T[:full])
            parts.append(planes.tobytes())
        if rest:
            high = (ids >> (8 * full)).astype(np.uint8)
            per_byte = 8 // rest
            padded = np.zeros(-(-ids.size // per_byte) * per_byte, dtype=np.uint8)
            padded[: ids.size] = high
            grouped = padded.reshape(-1, per_byte)
            packed = np.zeros(grouped.shape[0], dtype=np.uint8)
            for j in range(per_byte):
                packed |= grouped[:, j] << (rest * j)
            parts.append(packed.tobytes())
        return b"".join(parts)

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        n, _, payload = _read_header(buf)
        full, rest = self._layout
        per_byte = 8 // rest if rest else 1
        _check_size(payload, n * full + (-(-n // per_byte) if rest else 0), "logitcache.ids")
        ids = np.zeros(n, dtype=np.uint32)
        if full:
            planes = np.frombuffer(payload[: n * full], dtype=np.uint8).reshape(full, n)
            for j in range(full):
                ids |= planes[j].astype(np.uint32) << (8 * j)
        if rest:
            packed = np.frombuffer(payload[n * full :], dtype=np.uint8)
            mask = (1 << rest) - 1
            high = np.empty((packed.size, per_byte), dtype=np.uint8)
            for j in range(per_byte):
                high[:, j] = (packed >> (rest * j)) & mask
            ids |= high.reshape(-1)[:n].astype(np.uint32) << (8 * full)
        return _into(ids, out)


class LogprobCodec(Codec):
    """Lossy log-probabilities: step-quantized codes, delta-coded modulo 2**16, byte planes.

    Codes are absolute (round(-lp / step), uint16), so errors never accumulate along a row;
    the deltas between consecutive stored values are the quantized gaps, small and
    non-negative within a position because its entries are sorted by probability (one large
    wrapped delta per position where the next row starts). Code 65535 is -inf; values below
    -65534 * step (-2048 nats at the default step 1/32, where float32 probabilities are
    already 0) are stored as -inf too. Decoding is one cumsum in uint16 and a table lookup.
    """

    codec_id = "logitcache.logprob"
    _NEG_INF = 0xFFFF

    def __init__(self, step: float) -> None:
        if not 0 < float(step) <= 1:
            raise CacheError(f"logitcache.logprob: step must be in (0, 1], got {step}")
        self.step = float(step)
        self._table: np.ndarray | None = None

    def encode(self, buf: Any) -> bytes:
        lp = np.asarray(buf, dtype=np.float32).reshape(-1)
        if np.isnan(lp).any() or (lp > 0).any():
            raise CacheError("logitcache.logprob: log-probabilities must be <= 0 and not NaN")
        with np.errstate(invalid="ignore", over="ignore"):
            codes = np.rint(-lp.astype(np.float64) / self.step)
        codes = np.where(codes > self._NEG_INF - 1, self._NEG_INF, codes).astype(np.int32)
        delta = (np.diff(codes, prepend=np.int32(0)) & 0xFFFF).astype(np.uint16)
        return _header(lp.size, 2) + _to_planes(delta)

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        n, width, payload = _read_header(buf)
        if width != 2:
            raise CacheError(f"logitcache.logprob: bad width tag {width}")
        _check_size(payload, n * 2, "logitcache.logprob")
        codes = np.cumsum(_from_planes(payload, np.uint16, n), dtype=np.uint16)
        if math.frexp(self.step)[0] == 0.5:  # a power of two (1/32): code * -step is exact
            # in float32, and 3 cheap passes beat a gather from a 65,536-entry table 2-3x
            lp = np.multiply(codes, np.float32(-self.step), dtype=np.float32)
            lp += np.float32(0.0)  # -0.0 -> 0.0, as the table has it
            lp[codes == self._NEG_INF] = -np.inf
            return _into(lp, out)
        if self._table is None:
            table = -np.arange(self._NEG_INF + 1, dtype=np.float64) * self.step
            table[0], table[self._NEG_INF] = 0.0, -np.inf
            self._table = table.astype(np.float32)
        return _into(np.take(self._table, codes), out)  # take: 2x faster than [codes]


class FloatCodec(Codec):
    """float32 values stored as float32 or float16 byte planes (float16 is a cast)."""

    codec_id = "logitcache.float"

    def __init__(self, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise CacheError(f"logitcache.float: dtype must be float32 or float16, got {dtype}")
        self.dtype = dtype

    def encode(self, buf: Any) -> bytes:
        values = np.asarray(buf).reshape(-1).astype(self.dtype)
        return _header(values.size) + _to_planes(values.view(f"u{values.itemsize}"))

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        n, _, payload = _read_header(buf)
        size = np.dtype(self.dtype).itemsize
        _check_size(payload, n * size, "logitcache.float")
        values = _from_planes(payload, np.dtype(f"u{size}"), n).view(self.dtype)
        return _into(values.astype(np.float32), out)


def _into(result: np.ndarray, out: Any) -> np.ndarray:
    if out is None:
        return result
    out = np.asarray(out).reshape(-1)
    out[...] = result
    return out


for _codec in (IdsCodec, LogprobCodec, FloatCodec):
    numcodecs.register_codec(_codec)

ALLOWED_CODEC_IDS = frozenset(
    {IdsCodec.codec_id, LogprobCodec.codec_id, FloatCodec.codec_id, "zstd", "packbits", "shuffle"}
)


_ZSTD_MAGIC = 0xFD2FB528


def zstd_declared_size(blob: Any) -> int | None:
    """The decompressed size a zstd frame's header declares; None if it declares none.

    A frame can declare any size (a 40 kB frame of zeros inflates to 1 GiB), and numcodecs
    allocates what the header says, or grows without bound when it says nothing.
    """
    view = memoryview(blob).cast("B")
    if len(view) < 6 or int.from_bytes(view[:4], "little") != _ZSTD_MAGIC:
        return None
    descriptor = view[4]
    single_segment = (descriptor >> 5) & 1
    size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    if size_bytes == 0 or len(view) < start + size_bytes:
        return None
    size = int.from_bytes(view[start : start + size_bytes], "little")
    return size + 256 if size_bytes == 2 else size


class FieldCodec:
    """A chain of codecs for one record field, ending in bytes; decodes to ``dtype``.

    ``max_bytes`` bounds what the outer zstd frame may inflate to (a record of the cache's
    spec never needs more); a frame declaring more, or nothing, is refused unread.
    """

    def __init__(
        self, configs: Sequence[Mapping[str, Any]], dtype: str, max_bytes: int | None = None
    ) -> None:
        self.configs = [dict(c) for c in configs]
        self.dtype = np.dtype(dtype)
        self.max_bytes = max_bytes
        self.codecs = []
        for config in self.configs:
            codec_id = config.get("id")
            if codec_id not in ALLOWED_CODEC_IDS:
                raise CacheError(
                    f"codec {codec_id!r} is not allowed in a cache (allowed: "
                    f"{sorted(ALLOWED_CODEC_IDS)})"
                )
            try:
                self.codecs.append(numcodecs.get_codec(dict(config)))
            except (TypeError, ValueError, KeyError) as err:
                raise CacheError(f"bad codec config {config}: {err}") from None

    def encode(self, array: np.ndarray) -> bytes:
        data: Any = np.ascontiguousarray(array, dtype=self.dtype)
        for codec in self.codecs:
            data = codec.encode(data)
        return bytes(data)

    def decode(self, blob: bytes) -> np.ndarray:
        data: Any = blob
        if self.max_bytes is not None and self.configs and self.configs[-1]["id"] == "zstd":
            declared = zstd_declared_size(blob)
            if declared is None:  # numcodecs would grow its output until the frame ends
                raise CacheError(
                    "not a zstd frame that declares its size (every frame a cache writes "
                    "does); refusing to inflate it"
                )
            if not 0 < declared <= self.max_bytes:
                raise CacheError(
                    f"zstd frame declares {declared} bytes, outside the 1..{self.max_bytes} a "
                    "record of this cache can hold; refusing to inflate it"
                )
        try:
            for codec in reversed(self.codecs):
                data = codec.decode(data)
        except CacheError:
            raise
        except Exception as err:  # zstd and friends raise assorted types on garbage
            raise CacheError(f"cannot decode field ({type(err).__name__}: {err})") from None
        if isinstance(data, np.ndarray) and data.dtype == self.dtype:
            return data.reshape(-1)
        if isinstance(data, np.ndarray) and data.dtype == np.uint8:  # shuffle's output: no copy
            if data.size % self.dtype.itemsize:
                raise CacheError(f"decoded field has {data.size} bytes, not whole {self.dtype}s")
            return data.reshape(-1).view(self.dtype)
        try:
            return np.frombuffer(bytes(data), dtype=self.dtype)
        except ValueError as err:  # a length that is not a whole number of values
            raise CacheError(f"cannot decode field ({err})") from None


def logprob_codec_config(logprobs: str, step: float) -> dict[str, Any]:
    """The log-prob codec config of both formats: ``lossy`` at ``step``, float16 or float32."""
    if logprobs == "lossy":
        return {"id": LogprobCodec.codec_id, "step": step}
    if logprobs in ("float16", "float32"):
        return {"id": FloatCodec.codec_id, "dtype": logprobs}
    raise CacheError(f"unknown logprob codec {logprobs!r}; use lossy, float16 or float32")
