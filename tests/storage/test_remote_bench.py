"""``logitcache bench remote`` runs end to end at toy size (its numbers are not checked)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from logitcache.cli import main


def test_bench_remote_plumbing(tmp_path):
    args = [
        "bench",
        "remote",
        "--shards",
        12,
        "--latency-ms",
        1,
        "--batches",
        2,
        "--json",
        "--work",
        tmp_path,
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    out = json.loads(result.stdout)
    assert out["n_shards"] == 12 and out["manifest_bytes"] > 12 * 300
    ranged, prefetch = out["rows"]
    assert (ranged["reading"], prefetch["reading"]) == ("ranged", "prefetch")
    for row in (ranged, prefetch):
        assert 0 < row["open_s"] <= row["first_batch_s"]
        assert row["requests_to_first_batch"] >= 2  # the manifest, then shards
    # shards of 4 sequences fit in the 64 KiB tail: one request per shard either way, but
    # prefetching fetches ahead (whole shards) and reads no shard twice
    shard_requests = prefetch["requests_total"] - 1
    assert shard_requests <= 12
