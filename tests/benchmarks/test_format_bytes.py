"""The format 1 vs 2 measuring tool (bench/format_bytes.py): a re-encoded copy holds the same
records, in the shard size asked for, and its components add up to the shard files' bytes."""

from __future__ import annotations

from format_bytes import components, reencode
from storage_synth import assert_records_match, make_spec, write_cache

from logitcache.storage import CacheReader


def test_reencode_reshards_and_keeps_every_record(tmp_path):
    spec = make_spec(mode="sampled", format_version=1, shard_sequences=3)
    records = write_cache(tmp_path / "v1", spec, 7)
    reencode(tmp_path / "v1", tmp_path / "v2", 2, shard_sequences=5)
    copy = CacheReader(str(tmp_path / "v2"))
    assert copy.manifest.version_label == "2"
    assert [s.n_sequences for s in copy.shards] == [5, 2]
    for got, want in zip(copy, records, strict=True):
        assert_records_match(copy.spec, got, want)
    parts = components(tmp_path / "v2")
    shard_bytes = sum((tmp_path / "v2" / s.path).stat().st_size for s in copy.shards)
    assert parts["bytes"] == shard_bytes
    summed = sum(parts["per_token"].values()) * parts["tokens"]
    assert abs(summed - shard_bytes) < 1e-6 * shard_bytes
