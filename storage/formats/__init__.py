"""The cache's format versions behind one interface, chosen once from the spec.

In: a ``CacheSpec`` (or the version a flag asks for). Out: the format of that version
(``v1.py``, ``v2.py``): its container columns, rows per shard, default codec chains,
manifest minor versions, and the encoding of a shard's records to container rows and back.
The writer (``cache.py``), the reader (``reader.py``) and ``convert`` call it and never
branch on the version. A new version is one module here and one entry in ``_FORMATS``.
Each version's module also holds its row codec and default chains (``v1.py``: ``RecordCodec``,
``v1_codecs``; ``v2.py``: ``GroupCodec``, ``v2_codecs``); what both share stays outside:
``SequenceRecord`` and ``check_record`` in ``record.py``, the codec classes, zstd framing and
bounded inflate in ``codecs.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CacheError
from .base import ShardFormat
from .v1 import FormatV1
from .v2 import FormatV2

if TYPE_CHECKING:
    from ..spec import CacheSpec

__all__ = [
    "FORMAT_MINOR",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "FormatV1",
    "FormatV2",
    "ShardFormat",
    "check_format_version",
    "codec_for",
    "default_codecs",
    "format_class",
]

_FORMATS: dict[int, type[ShardFormat]] = {1: FormatV1, 2: FormatV2}
FORMAT_VERSION = 2
"""The major version written by default; readers read ``READ_VERSIONS`` (docs/format.md)."""
READ_VERSIONS = tuple(sorted(_FORMATS))
"""The major versions this logitcache reads and writes: one per entry of the registry."""
FORMAT_MINOR = {version: _FORMATS[version].newest_minor for version in READ_VERSIONS}
"""The newest minor version of each major. A minor adds optional manifest keys that a reader
of the same major ignores: 1.1 ``tokenizer_files`` (2.0 has them); 1.2 and 2.1
``spec.tokenizer.fingerprint_full``. ``format_minor`` is written only when a manifest uses
one (``Manifest.format_minor``)."""


def format_class(version: Any) -> type[ShardFormat]:
    """The format of ``version``; any other is refused, naming the versions read."""
    try:
        found = _FORMATS.get(version)
    except TypeError:  # unhashable: not a version
        found = None
    if found is None:
        versions = " or ".join(map(str, READ_VERSIONS))
        raise CacheError(f"--format-version must be {versions}, got {version}")
    return found


def check_format_version(version: int) -> None:
    """Refuse a format version no writer writes (the ones readers read: ``READ_VERSIONS``)."""
    format_class(version)


def codec_for(spec: CacheSpec) -> ShardFormat:
    """The format of ``spec``'s shards, ready to encode and decode them."""
    return format_class(spec.format_version)(spec)


def default_codecs(
    vocab_size: int,
    *,
    logprobs: str = "lossy",
    step: float = 1 / 32,
    zstd_level: int | None = None,
    format_version: int = FORMAT_VERSION,
    mode: str = "sampled",
) -> dict[str, list[dict[str, Any]]]:
    """The codec chains for every field of ``format_version``, as manifest-ready configs.

    ``logprobs``: ``lossy`` (LogprobCodec at ``step``), ``float16`` or ``float32``;
    ``mode`` (``topk`` or ``sampled``) picks format 2's zstd level.
    """
    return format_class(format_version).default_codecs(
        vocab_size, logprobs=logprobs, step=step, zstd_level=zstd_level, mode=mode
    )
