"""Hostile caches and checkpoints, made by someone who controls every byte (and so can make
the manifest's hashes vouch for anything): ``verify`` and ``train`` refuse each one with a
message naming the problem, execute nothing, allocate nothing unreasonable, and never hang.

Each command runs in a forked child (``crashlab``) with a 60 s limit; its peak resident
memory above its memory at fork is measured and must stay under 250 MB (a refused 1 GiB
allocation would show).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numcodecs
import numpy as np
import pyarrow as pa
import pytest
from crashlab import refused, succeeded

MAX_GROWTH_MB = 250  # measured: <= 55 MB for these commands; each bomb asks for 1 GiB


class Trap:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def shard(cache: Path, j: int = 1) -> Path:
    return cache / "shards" / f"shard-{j:06d}.arrow"


def edit_manifest(cache: Path, edit) -> None:
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def vouch_for(cache: Path, j: int = 1) -> None:
    """The manifest made to list shard j's current bytes (size, sha256, totals)."""
    data = shard(cache, j).read_bytes()

    def edit(manifest):
        manifest["shards"][j].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        manifest["bytes"] = sum(s["bytes"] for s in manifest["shards"])

    edit_manifest(cache, edit)


def rewrite_shard(cache: Path, *, metadata=None, input_ids: bytes | None = None) -> None:
    """Shard 1 rewritten as a valid Arrow file with other identity metadata or another first
    input_ids blob, then vouched for."""
    path = shard(cache)
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # not mapped
    schema = table.schema
    if metadata is not None:
        meta = json.loads(schema.metadata[b"logitcache"])
        meta.update(metadata)
        schema = schema.with_metadata({"logitcache": json.dumps(meta)})
    batches = table.to_batches(max_chunksize=1)
    if input_ids is not None:
        first = batches[0]
        columns = [first.column(n) for n in schema.names]
        columns[schema.names.index("input_ids")] = pa.array([input_ids], pa.binary())
        batches[0] = pa.record_batch(columns, schema=schema)
    with pa.ipc.new_file(str(path), schema) as writer:
        for batch in batches:
            writer.write_batch(batch.replace_schema_metadata(schema.metadata))
    vouch_for(cache)


def dotdot_path(cache: Path, marker: Path) -> str:
    shutil.copyfile(shard(cache), cache.parent / "outside.arrow")
    edit_manifest(cache, lambda m: m["shards"][1].update(path="../outside.arrow"))
    return "path outside the cache: '../outside.arrow'"


def absolute_path(cache: Path, marker: Path) -> str:
    outside = cache.parent / "outside.arrow"
    shutil.copyfile(shard(cache), outside)
    edit_manifest(cache, lambda m: m["shards"][1].update(path=str(outside)))
    return "path outside the cache"


def huge_shard_bytes(cache: Path, marker: Path) -> str:
    def edit(m):
        m["shards"][1]["bytes"] = 2**50
        m["bytes"] = sum(s["bytes"] for s in m["shards"])

    edit_manifest(cache, edit)
    return "'bytes' = 1125899906842624 is outside"


def huge_sequence_count(cache: Path, marker: Path) -> str:
    edit_manifest(cache, lambda m: m["shards"][1].update(n_sequences=10**12))
    return "'n_sequences' = 1000000000000 is outside"


def huge_seq_len(cache: Path, marker: Path) -> str:
    def edit(m):
        m["spec"]["seq_len"] = 10**12
        m.pop("cache_id")

    edit_manifest(cache, edit)
    return "'seq_len' = 1000000000000 is outside"


def huge_total(cache: Path, marker: Path) -> str:
    edit_manifest(cache, lambda m: m.update(n_sequences_total=10**15))
    return "marked complete with n_sequences_total 1000000000000000"


def zstd_bomb(cache: Path, marker: Path) -> str:
    """A 40 kB zstd frame that inflates to 1 GiB, as a record's input_ids."""
    bomb = numcodecs.Zstd(level=19).encode(np.zeros(1 << 30, dtype=np.uint8))
    rewrite_shard(cache, input_ids=bytes(bomb))
    return "zstd frame declares 1073741824 bytes"


def count_as_string(cache: Path, marker: Path) -> str:
    edit_manifest(cache, lambda m: m["shards"][1].update(n_sequences="8"))
    return "'n_sequences' must be an integer, got '8'"


def hash_as_number(cache: Path, marker: Path) -> str:
    edit_manifest(cache, lambda m: m["shards"][1].update(sha256=5))
    return "'sha256' must be a 64-character hex digest"


def k_as_string(cache: Path, marker: Path) -> str:
    def edit(m):
        m["spec"]["k"] = "8"
        m.pop("cache_id")

    edit_manifest(cache, edit)
    return "'k' must be an integer, got '8'"


def shards_as_object(cache: Path, marker: Path) -> str:
    edit_manifest(cache, lambda m: m.update(shards={"0": {}}))
    return "'shards' must be a list"


def newer_manifest(cache: Path, marker: Path) -> str:
    edit_manifest(cache, lambda m: m.update(format_version=3))
    return "upgrade logitcache"


def newer_shard(cache: Path, marker: Path) -> str:
    rewrite_shard(cache, metadata={"format_version": 3})
    return "shard shards/shard-000001.arrow has format version 3, expected 2"


def pickled_shard(cache: Path, marker: Path) -> str:
    shard(cache).write_bytes(pickle.dumps({"rows": [Trap(marker)]}))
    vouch_for(cache)
    return "shard shards/shard-000001.arrow is not a readable Arrow file"


def pickle_codec(cache: Path, marker: Path) -> str:
    def edit(m):
        m["spec"]["codecs"]["logprobs"] = [{"id": "pickle"}]
        m.pop("cache_id")

    edit_manifest(cache, edit)
    return "codec 'pickle' is not allowed in a cache"


def endless_shard(cache: Path, marker: Path) -> str:
    shard(cache).unlink()
    shard(cache).symlink_to("/dev/zero")
    return "shard-000001.arrow is not a regular file"


def fifo_shard(cache: Path, marker: Path) -> str:
    shard(cache).unlink()
    os.mkfifo(shard(cache))
    return "shard-000001.arrow is not a regular file"


CASES = [
    dotdot_path,
    absolute_path,
    huge_shard_bytes,
    huge_sequence_count,
    huge_seq_len,
    huge_total,
    zstd_bomb,
    count_as_string,
    hash_as_number,
    k_as_string,
    shards_as_object,
    newer_manifest,
    newer_shard,
    pickled_shard,
    pickle_codec,
    endless_shard,
    fifo_shard,
]
FAST = {dotdot_path, zstd_bomb, newer_shard, pickled_shard, endless_shard}


@pytest.mark.parametrize(
    "make",
    [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=lambda c: c.__name__,
)
def test_hostile_cache_is_refused(make, lab, copy_cache, train_args, tmp_path):
    cache = copy_cache("topk")
    marker = tmp_path / "executed"
    message = make(cache, marker)

    checked = lab.run(["verify", cache], timeout=60)
    assert checked.code == 1 and "Traceback" not in checked.output, checked.output
    assert message in checked.output, checked.output
    trained = lab.run(train_args(cache, tmp_path / "student"), timeout=60)
    refused(trained, message)
    assert not (tmp_path / "student" / "model").exists()

    assert not marker.exists(), "something in the cache was executed"
    for outcome in (checked, trained):
        assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb


@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors"])
def test_pickle_in_a_checkpoint_is_refused_on_resume(
    name, lab, reference_caches, train_args, tmp_path
):
    out = tmp_path / "run"
    cache = reference_caches["topk"]
    flags = {"steps": 2, "save_every": 1, "keep_checkpoints": 1}  # none to fall back to
    succeeded(lab.run(train_args(cache, out, **flags)))
    marker = tmp_path / "executed"
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    (latest / name).write_bytes(pickle.dumps({"state": Trap(marker)}))

    outcome = lab.run(train_args(cache, out, **{**flags, "steps": 4}, resume=True), timeout=60)
    refused(outcome, str(latest / name))
    assert not marker.exists(), "the checkpoint was unpickled"
