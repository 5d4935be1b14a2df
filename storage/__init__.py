"""The on-disk cache format: manifest, codecs, containers, writer and reader; and rewriting a
cache in another format version or shard size (``convert_cache``).

In: teacher distributions as ``SequenceRecord``s. Out: a cache directory or URL holding
``manifest.json`` and compressed shards; and back. ``docs/format.md`` is the contract.
"""

from .convert import ConvertResult, convert_cache
from .errors import CacheError, NoTokenizerError, RemoteError, ShardCorruptError, TokenizerError
from .format import CacheSpec, Manifest, ShardInfo, StoredFile
from .formats import FORMAT_VERSION, READ_VERSIONS, default_codecs
from .local_copies import DEFAULT_LOCAL_CACHE_BYTES, ShardCache, default_local_cache
from .location import Location
from .reader import CacheReader, verify_cache
from .record import SequenceRecord
from .tokenizer import add_tokenizer, fetch_tokenizer
from .transfer import TransferResult, copy_cache
from .writer import CacheWriter, merge_parts, read_manifest

__all__ = [
    "DEFAULT_LOCAL_CACHE_BYTES",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "CacheError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "ConvertResult",
    "Location",
    "Manifest",
    "NoTokenizerError",
    "RemoteError",
    "SequenceRecord",
    "ShardCache",
    "ShardCorruptError",
    "ShardInfo",
    "StoredFile",
    "TokenizerError",
    "TransferResult",
    "add_tokenizer",
    "convert_cache",
    "copy_cache",
    "default_codecs",
    "default_local_cache",
    "fetch_tokenizer",
    "merge_parts",
    "read_manifest",
    "verify_cache",
]
