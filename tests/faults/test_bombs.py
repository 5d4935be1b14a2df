"""Decompression bombs and other declared sizes in every file of a cache (issue #22, item 5).

Each case writes one hostile file of at most 1 MB (a sparse file counts its real bytes) into
a copy of a reference cache and, where a shard changed, makes the manifest vouch for its new
bytes, so the hash check is never what refuses it. ``verify`` and ``train`` (and ``inspect``
when the file is one it reads) must then exit 1 with one line naming the file, within 60 s,
their peak memory at most ``MAX_GROWTH_MB`` above their start: each bomb asks for 1 GiB or
more (the shape-2**31 zarr index asked 16 GB of zarr, the vlen chunk 32 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pyarrow as pa
import pytest
from crashlab import Outcome

from logitcache.storage.format import MANIFEST_BYTES

MAX_GROWTH_MB = 256
ZARR = ["--container", "zarr"]


@pytest.fixture(scope="session")
def zarr_reference(tmp_path_factory, lab, precompute_args) -> Path:
    out = tmp_path_factory.mktemp("zarr-reference") / "cache"
    outcome = lab.run(precompute_args(out, "topk", *ZARR))
    assert outcome.code == 0, outcome.output[-2000:]
    return out


@pytest.fixture(scope="session")
def gib_of_zeros() -> bytes:
    """One zstd frame (~33 kB) that declares and inflates to 1 GiB."""
    return bytes(numcodecs.Zstd(level=3).encode(np.zeros(1 << 30, dtype=np.uint8)))


def shard(cache: Path, j: int = 1) -> Path:
    (path,) = (cache / "shards").glob(f"shard-{j:06d}.*")
    return path


def digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256) as the manifest lists them, of a file or a zarr group."""
    if path.is_file():
        data = path.read_bytes()
        return len(data), hashlib.sha256(data).hexdigest()
    total, outer = 0, hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        data = file.read_bytes()
        total += len(data)
        name = file.relative_to(path).as_posix()
        outer.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return total, outer.hexdigest()


def vouch_for(cache: Path, j: int = 1) -> None:
    size, sha = digest(shard(cache, j))
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][j].update(bytes=size, sha256=sha)
    manifest["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    path.write_text(json.dumps(manifest, indent=1))


def rewrite_arrow(cache: Path, *, replace=None, metadata=None, options=None) -> None:
    """Shard 1 rewritten with its first batch's columns changed by ``replace(columns)``, its
    schema metadata by ``metadata``, written with IPC ``options``; then vouched for."""
    path = shard(cache)
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    schema, batches = table.schema, table.to_batches(max_chunksize=1)
    if metadata is not None:
        schema = schema.with_metadata({**schema.metadata, **metadata})
    columns = [batches[0].column(n) for n in schema.names]
    if replace is not None:
        schema, columns = replace(schema, columns)
    batches[0] = pa.record_batch(columns, schema=schema)
    with pa.ipc.new_file(str(path), schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(pa.record_batch(batch.columns, schema=schema))
    vouch_for(cache)


# -- manifests: read by verify, train and inspect ------------------------------------------
def manifest_over_its_bound(cache: Path, tmp: Path) -> str:
    with open(cache / "manifest.json", "r+b") as fh:  # sparse: no byte of it on disk
        fh.truncate(MANIFEST_BYTES + 1)
    return f"more than the {MANIFEST_BYTES:,} allowed"


def manifest_fifo(cache: Path, tmp: Path) -> str:
    (cache / "manifest.json").unlink()
    os.mkfifo(cache / "manifest.json")
    return "manifest.json is not a regular file"


def manifest_dev_zero(cache: Path, tmp: Path) -> str:
    (cache / "manifest.json").unlink()
    (cache / "manifest.json").symlink_to("/dev/zero")
    return "manifest.json is not a regular file"


def manifest_nested(cache: Path, tmp: Path) -> str:
    (cache / "manifest.json").write_text("[" * 400_000 + "]" * 400_000)
    return "manifest.json is not a manifest: JSON nested too deeply"


def manifest_spec_nested(cache: Path, tmp: Path) -> str:
    """900 levels inside the spec: json.loads reads them, the spec's hash (json.dumps) and
    comparisons recurse past Python's limit."""
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["spec"]["teacher"] = json.loads('{"a":' * 900 + "1" + "}" * 900)
    manifest.pop("cache_id")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json: JSON nested over 32 levels deep; refusing it"


def manifest_half_a_million_shards(cache: Path, tmp: Path) -> str:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"] = "SHARDS"
    text = json.dumps(manifest).replace('"SHARDS"', "[" + ",".join(["0"] * 500_000) + "]")
    (cache / "manifest.json").write_text(text)
    assert len(text) <= 1 << 20
    return "lists 500000 shards, more than the 262144 a manifest may hold"


def spec_lifts_the_bound(cache: Path, tmp: Path) -> str:
    """seq_len raised to 2**20 in the manifest and shard 1's metadata (the cache_id redone),
    so a 256 MB frame of ids would fit "what a record of this spec can hold"."""
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    spec = manifest["spec"] | {"seq_len": 1 << 20}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    cache_id = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    path.write_text(json.dumps(manifest | {"spec": spec, "cache_id": cache_id}, indent=1))
    table = pa.ipc.open_file(pa.BufferReader(shard(cache).read_bytes())).read_all()
    meta = json.loads(table.schema.metadata[b"logitcache"]) | {"spec": spec, "cache_id": cache_id}
    bomb = numcodecs.Zstd(level=3).encode(np.zeros(250 << 20, dtype=np.uint8))

    def replace(schema, columns):
        columns[schema.names.index("ids")] = pa.array([bytes(bomb)], pa.binary())
        return schema, columns

    rewrite_arrow(cache, replace=replace, metadata={b"logitcache": json.dumps(meta)})
    return (
        "manifest.json: cache spec: 8 sequence(s) of seq_len 1048576 at 8 entries per "
        "position is 67,108,800 entries in one row, more than the 8,388,608 a row may hold"
    )


MANIFEST_CASES = [
    manifest_over_its_bound,
    manifest_fifo,
    manifest_dev_zero,
    manifest_nested,
    manifest_spec_nested,
    manifest_half_a_million_shards,
    spec_lifts_the_bound,
]


# -- Arrow shards --------------------------------------------------------------------------
def arrow_ipc_compressed(cache: Path, tmp: Path) -> str:
    """A batch whose input_ids buffer is IPC-compressed 1 GiB of zeros (pyarrow inflates it
    to its declared size before any check of ours could see the blob)."""
    data = pa.py_buffer(np.zeros(1 << 30, dtype=np.uint8))
    offsets = pa.py_buffer(np.array([0, 1 << 30], dtype=np.int32))
    bomb = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, data])

    def replace(schema, columns):
        columns[schema.names.index("input_ids")] = bomb
        return schema, columns

    rewrite_arrow(cache, replace=replace, options=pa.ipc.IpcWriteOptions(compression="zstd"))
    assert shard(cache).stat().st_size <= 1 << 20
    return "compressed at the Arrow level"


def arrow_metadata_nested(cache: Path, tmp: Path) -> str:
    rewrite_arrow(cache, metadata={b"logitcache": "[" * 200_000 + "]" * 200_000})
    return "shard shards/shard-000001.arrow: its metadata is not valid JSON: nested too deeply"


def arrow_metadata_nested_spec(cache: Path, tmp: Path) -> str:
    meta = {"spec": json.loads('{"a":' * 900 + "1" + "}" * 900)}
    rewrite_arrow(cache, metadata={b"logitcache": json.dumps(meta)})
    return "its metadata: JSON nested over 32 levels deep"


def arrow_other_columns(cache: Path, tmp: Path) -> str:
    def replace(schema, columns):
        i = schema.names.index("ids")
        return schema.set(i, pa.field("ids", pa.large_binary())), [
            c.cast(pa.large_binary()) if j == i else c for j, c in enumerate(columns)
        ]

    rewrite_arrow(cache, replace=replace)
    return "not an int64 index and binary fields"


def arrow_directory(cache: Path, tmp: Path) -> str:
    path = shard(cache)
    path.unlink()
    path.mkdir()
    for j in range(1000):
        (path / f"f{j}").write_bytes(b"x")
    vouch_for(cache)
    return "shard shards/shard-000001.arrow is a directory of over 64 files"


ARROW_CASES = [
    arrow_ipc_compressed,
    arrow_metadata_nested,
    arrow_metadata_nested_spec,
    arrow_other_columns,
    arrow_directory,
]


# -- Zarr shards ---------------------------------------------------------------------------
def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def zarr_index_shape(cache: Path, tmp: Path) -> str:
    def edit(meta):
        meta["shape"] = [1 << 31]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [1 << 31]

    edit_json(shard(cache) / "index" / "zarr.json", edit)
    vouch_for(cache)
    return "its index array is not laid out as a shard's"


def zarr_index_chunk_bomb(cache: Path, tmp: Path, bomb: bytes) -> str:
    (shard(cache) / "index" / "c").mkdir(exist_ok=True)
    (shard(cache) / "index" / "c" / "0").write_bytes(bomb)
    vouch_for(cache)
    return "more than the 72 allowed"


def zarr_index_frame_lies(cache: Path, tmp: Path) -> str:
    """A 14-byte zstd frame header declaring 1 GiB (numcodecs allocates what it declares)."""
    (shard(cache) / "index" / "c").mkdir(exist_ok=True)
    header = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 30) + b"\1\0\0"
    (shard(cache) / "index" / "c" / "0").write_bytes(header)
    vouch_for(cache)
    return "index/c/0: its zstd frame declares 1073741824 bytes, not 8"


def zarr_field_chunk_bomb(cache: Path, tmp: Path, bomb: bytes) -> str:
    """A field's one blob is a 1 GiB zstd frame, stored as zarr stores it (hash, crc right)."""
    write_field_chunk(
        shard(cache) / "input_ids" / "c" / "0", struct.pack("<II", 1, len(bomb)) + bomb
    )
    vouch_for(cache)
    return "zstd frame declares 1073741824 bytes"


def zarr_vlen_count(cache: Path, tmp: Path) -> str:
    """A vlen-bytes chunk declaring 2**32 - 1 items (zarr would allocate 32 GB of slots)."""
    write_field_chunk(
        shard(cache) / "ids" / "c" / "0", struct.pack("<II", 0xFFFFFFFF, 0) + bytes(8)
    )
    vouch_for(cache)
    return "field 'ids' holds 4294967295 items"


def write_field_chunk(path: Path, chunk: bytes) -> None:
    index = struct.pack("<QQ", 0, len(chunk))
    crc = struct.pack("<I", google_crc32c.value(index))
    path.write_bytes(chunk + index + crc)


def zarr_codec(cache: Path, tmp: Path) -> str:
    def edit(meta):
        meta["codecs"][0]["configuration"]["codecs"] = [
            {"name": "vlen-bytes", "configuration": {}},
            {"name": "gzip", "configuration": {"level": 1}},
        ]

    edit_json(shard(cache) / "logprobs" / "zarr.json", edit)
    vouch_for(cache)
    return "its array 'logprobs' is not laid out as a shard's field"


def zarr_chunk_fifo(cache: Path, tmp: Path) -> str:
    chunk = shard(cache) / "ids" / "c" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    return "ids/c/0 is not a regular file"


def zarr_json_dev_zero(cache: Path, tmp: Path) -> str:
    meta = shard(cache) / "zarr.json"
    meta.unlink()
    meta.symlink_to("/dev/zero")
    return "zarr.json is not a regular file"


def zarr_json_nested(cache: Path, tmp: Path) -> str:
    (shard(cache) / "ids" / "zarr.json").write_text("[" * 30_000 + "]" * 30_000)
    vouch_for(cache)
    return "ids/zarr.json is not valid JSON: nested too deeply"


def zarr_other_chunk_key(cache: Path, tmp: Path) -> str:
    (shard(cache) / "ids" / "c" / "1").write_bytes(b"\0" * 64)
    vouch_for(cache)
    return "it holds 'ids/c/1', which a shard never has"


def zarr_many_files(cache: Path, tmp: Path) -> str:
    extra = shard(cache) / "ids" / "c" / "x"
    extra.mkdir()
    for j in range(2000):
        (extra / str(j)).write_bytes(b"")
    vouch_for(cache)
    return "shard shards/shard-000001.zarr is a directory of over 64 files"


ZARR_CASES = [
    zarr_index_shape,
    zarr_index_chunk_bomb,
    zarr_index_frame_lies,
    zarr_field_chunk_bomb,
    zarr_vlen_count,
    zarr_codec,
    zarr_chunk_fifo,
    zarr_json_dev_zero,
    zarr_json_nested,
    zarr_other_chunk_key,
    zarr_many_files,
]
FAST = {manifest_nested, arrow_ipc_compressed, zarr_index_shape, zarr_vlen_count}


def one_line(outcome: Outcome, needle: str) -> str:
    """Exit 1, no traceback, and exactly one printed problem line, naming ``needle``."""
    assert outcome.code == 1, (outcome.code, outcome.output[-3000:])
    assert "Traceback" not in outcome.output, outcome.output[-3000:]
    lines = [ln for ln in outcome.output.splitlines() if ln.startswith(("error:", "BAD "))]
    assert len(lines) == 1 and needle in lines[0], outcome.output[-3000:]
    assert outcome.rss_growth_mb <= MAX_GROWTH_MB, outcome.rss_growth_mb
    return lines[0]


def cases(group):
    return [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in group]


@pytest.mark.parametrize(
    "make", cases(MANIFEST_CASES + ARROW_CASES + ZARR_CASES), ids=lambda c: c.__name__
)
def test_bomb_is_refused(
    make, request, lab, reference_caches, zarr_reference, train_args, tmp_path
):
    source = zarr_reference if make in ZARR_CASES else reference_caches["topk"]
    cache = tmp_path / "cache"
    shutil.copytree(source, cache, ignore=shutil.ignore_patterns(".locks"))
    needs_bomb = make in (zarr_index_chunk_bomb, zarr_field_chunk_bomb)
    args = (request.getfixturevalue("gib_of_zeros"),) if needs_bomb else ()
    needle = make(cache, tmp_path, *args)
    commands = [["verify", cache], train_args(cache, tmp_path / "student")]
    if make in MANIFEST_CASES:
        commands.append(["inspect", cache])
    for args in commands:
        outcome = lab.run(args, timeout=60)
        line = one_line(outcome, needle)
        print(f"{make.__name__} {args[0]} [{outcome.rss_growth_mb:.0f} MB]: {line}")
    assert not (tmp_path / "student" / "model").exists()


def test_part_manifests_are_bounded(lab, reference_caches, tmp_path):
    """``merge`` reads every worker's part: a FIFO or deep nesting there is one line too."""
    for name, make in (("fifo", os.mkfifo), ("nested", None)):
        cache = tmp_path / name
        shutil.copytree(reference_caches["topk"], cache, ignore=shutil.ignore_patterns(".locks"))
        (cache / "parts").mkdir()
        part = cache / "parts" / "worker-00000-of-00002.json"
        if make is None:
            part.write_text("[" * 400_000 + "]" * 400_000)
        else:
            make(part)
        needle = "is not a regular file" if make else "nested too deeply"
        one_line(lab.run(["merge", cache], timeout=60), needle)


@pytest.mark.parametrize("kind", ["dangling-link", "fifo"])
def test_lock_file_is_never_followed(kind, lab, precompute_args, tmp_path):
    """``.locks/`` is in the cache too: a link there must not make ``precompute`` create a
    file outside the cache, nor a FIFO stand in for the lock."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / ".locks").mkdir(parents=True)
    lock = out / ".locks" / "worker-0-of-1.lock"
    lock.symlink_to(outside) if kind == "dangling-link" else os.mkfifo(lock)
    needle = "cannot take the lock" if kind == "dangling-link" else "is not a regular file"
    one_line(lab.run(precompute_args(out, "topk"), timeout=60), needle)
    assert not outside.exists() and not (out / "manifest.json").exists()
