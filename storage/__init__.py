"""The on-disk cache format: manifest, codecs, containers, writer and reader.

In: teacher distributions as ``SequenceRecord``s. Out: a cache directory or URL holding
``manifest.json`` and compressed shards; and back. ``docs/format.md`` is the contract.
"""

from .cache import CacheReader, CacheWriter, merge_parts, read_manifest, verify_cache
from .codecs import default_codecs
from .errors import CacheError, ShardCorruptError
from .format import FORMAT_VERSION, CacheSpec, Manifest, ShardInfo
from .location import Location
from .record import SequenceRecord

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "Location",
    "Manifest",
    "SequenceRecord",
    "ShardCorruptError",
    "ShardInfo",
    "default_codecs",
    "merge_parts",
    "read_manifest",
    "verify_cache",
]
