"""``push`` / ``pull``: copying caches with verification, resuming, skipping, subsets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storage_synth import assert_records_match, tree_bytes

from logitcache.storage import (
    CacheError,
    CacheReader,
    RemoteError,
    copy_cache,
    read_manifest,
    verify_cache,
)
from logitcache.storage.location import Location
from logitcache.storage.transfer import parse_shard_list, select_shards

pytestmark = pytest.mark.usefixtures("remote_env")


def cache_files(root: Path) -> dict[str, bytes]:
    """manifest.json and shards/: what a copy must reproduce (not a writer's .locks/)."""
    return {k: v for k, v in tree_bytes(root).items() if not k.startswith(".locks/")}


def shard_gets(server) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in server.paths("GET") if "/shards/" in p]


def test_pull_copies_the_cache_exactly_and_a_second_pull_copies_nothing(served, tmp_path):
    server, url = served.server, served.url
    dest = tmp_path / "copy"
    result = copy_cache(url, dest)
    assert (result.copied, result.skipped) == (4, 0) and result.manifest.complete
    assert cache_files(dest) == cache_files(server.root / "c")
    server.clear()
    again = copy_cache(url, dest)
    assert (again.copied, again.skipped) == (0, 4)
    assert shard_gets(server) == []  # skipping costs no shard transfer
    assert cache_files(dest) == cache_files(server.root / "c")


def test_pull_part_of_a_cache_then_the_rest(served, tmp_path):
    server, url, spec, records = served.server, served.url, served.spec, served.records
    dest = tmp_path / "copy"
    result = copy_cache(url, dest, shards="1-2")
    partial = read_manifest(Location(dest))
    assert [s.index for s in partial.shards] == [1, 2]
    assert not partial.complete and partial.n_sequences_total == 10  # a subset, not unfinished
    reader = CacheReader(dest)
    assert [r.index for r in reader] == [3, 4, 5, 6, 7, 8]
    assert_records_match(spec, reader.read(5), records[5])
    assert result.copied == 2
    rest = copy_cache(url, dest)
    assert (rest.copied, rest.skipped) == (2, 2) and rest.manifest.complete
    assert cache_files(dest) == cache_files(server.root / "c")


def test_pull_max_tokens_takes_the_first_shards_holding_that_many(served, tmp_path):
    server, url = served.server, served.url
    shards = read_manifest(Location(server.root / "c")).shards
    budget = shards[0].n_tokens + 1  # one token more than shard 0 holds
    copy_cache(url, tmp_path / "copy", max_tokens=budget)
    assert [s.index for s in read_manifest(Location(tmp_path / "copy")).shards] == [0, 1]


def test_shard_lists():
    assert parse_shard_list("0-3,7, 5,2") == [0, 1, 2, 3, 5, 7]
    for bad in ("", "a", "3-1", "1-", "-2", "1,,2"):
        with pytest.raises(CacheError, match="--shards"):
            parse_shard_list(bad)


def test_selecting_shards_that_do_not_exist(served):
    server = served.server
    manifest = read_manifest(Location(server.root / "c"))
    with pytest.raises(CacheError, match=r"shards \[4, 9\] are not in the source"):
        select_shards(manifest, "2,4,9")
    assert select_shards(manifest, max_tokens=10**9) == list(manifest.shards)


def test_an_interrupted_pull_resumes_where_it_stopped(served, tmp_path):
    server, url = served.server, served.url
    dest = tmp_path / "copy"
    server.fail["shard-000002.arrow"] = 503
    with pytest.raises(RemoteError, match=r"shard-000002\.arrow after 2 attempts.*503"):
        copy_cache(url, dest, threads=1)
    listed = [s.index for s in read_manifest(Location(dest)).shards]
    assert listed == [0, 1]  # what arrived is listed; the rest was not attempted
    assert sorted(p.name for p in (dest / "shards").iterdir()) == [
        "shard-000000.arrow",
        "shard-000001.arrow",
    ]
    del server.fail["shard-000002.arrow"]
    server.clear()
    result = copy_cache(url, dest)
    assert (result.copied, result.skipped) == (2, 2)
    assert sorted(shard_gets(server)) == ["shard-000002.arrow", "shard-000003.arrow"]
    assert cache_files(dest) == cache_files(server.root / "c")


def test_a_corrupted_source_shard_is_named_and_refused(served, tmp_path):
    server, url = served.server, served.url
    path = server.root / "c" / "shards" / "shard-000001.arrow"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    dest = tmp_path / "copy"
    with pytest.raises(CacheError, match=r"1 of 4 shards were refused.*shard-000001\.arrow"):
        copy_cache(url, dest)
    assert [s.index for s in read_manifest(Location(dest)).shards] == [0, 2, 3]
    assert sorted(p.name for p in (dest / "shards").iterdir()) == [
        "shard-000000.arrow",
        "shard-000002.arrow",
        "shard-000003.arrow",
    ]  # no damaged copy, no temporary


def test_a_cut_off_transfer_leaves_no_partial_shard(served, tmp_path):
    server, url = served.server, served.url
    server.truncate["shard-000003.arrow"] = 2
    dest = tmp_path / "copy"
    with pytest.raises(RemoteError, match="shard-000003"):
        copy_cache(url, dest, threads=1)
    assert not (dest / "shards" / "shard-000003.arrow").exists()
    assert not [p for p in (dest / "shards").iterdir() if p.name.startswith(".tmp")]
    assert copy_cache(url, dest).copied == 1
    assert verify_cache(dest)[1] == []


def test_an_unlisted_shard_of_a_killed_pull_is_kept_if_right(served, tmp_path):
    server, url = served.server, served.url
    dest = tmp_path / "copy"
    copy_cache(url, dest, shards="0")
    (dest / "shards" / "shard-000001.arrow").write_bytes(
        (server.root / "c" / "shards" / "shard-000001.arrow").read_bytes()
    )  # published, but the run died before listing it
    (dest / "shards" / "shard-000002.arrow").write_bytes(b"half a shard")  # not listed, wrong
    server.clear()
    result = copy_cache(url, dest)
    assert (result.copied, result.skipped) == (2, 2)
    assert sorted(shard_gets(server)) == ["shard-000002.arrow", "shard-000003.arrow"]
    assert cache_files(dest) == cache_files(server.root / "c")


def test_push_to_a_directory_url_and_into_another_cache_is_refused(served, tmp_path):
    server = served.server
    local = server.root / "c"
    result = copy_cache(local, f"file://{tmp_path}/pushed")
    assert result.copied == 4 and cache_files(tmp_path / "pushed") == cache_files(local)
    from storage_synth import make_spec, write_cache

    write_cache(tmp_path / "other", make_spec(teacher="another-teacher"), 3)
    with pytest.raises(CacheError, match=r"holds another cache.*teacher"):
        copy_cache(local, tmp_path / "other")


def test_pull_to_http_is_refused(served):
    server = served.server
    with pytest.raises(CacheError, match="read-only"):
        copy_cache(server.root / "c", f"{server.url}/elsewhere")


PULL_SCRIPT = """
import sys
from logitcache.storage import copy_cache
copy_cache(sys.argv[1], sys.argv[2], threads=1)
"""


@pytest.mark.slow
def test_a_pull_killed_mid_transfer_resumes(served, tmp_path, remote_env):
    """A real interruption: the process is SIGKILLed while shards are arriving."""
    server, url = served.server, served.url
    server.latency = 0.4
    dest = tmp_path / "copy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, url, str(dest)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (dest / "shards" / "shard-000001.arrow").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (dest / "shards" / "shard-000003.arrow").exists()
    server.latency = 0.0
    server.clear()
    result = copy_cache(url, dest)
    assert result.skipped >= 2 and result.copied + result.skipped == 4
    assert "shard-000000.arrow" not in shard_gets(server)
    assert cache_files(dest) == cache_files(server.root / "c")
    assert verify_cache(dest)[1] == []


def test_progress_is_reported_through_a_plain_callback(served, tmp_path):
    calls: list[tuple[int, int, str | None]] = []
    result = copy_cache(served.url, tmp_path / "copy", progress=lambda *a: calls.append(a))
    done = [d for d, _, _ in calls]
    assert done[0] == 0 and done == sorted(done) and len(calls) == 1 + result.copied
    assert calls[-1][:2] == (result.bytes_copied, result.manifest.bytes)
    calls.clear()
    copy_cache(served.url, tmp_path / "copy", progress=lambda *a: calls.append(a))
    assert calls == [(0, 0, f"4 of 4 shards already at {tmp_path / 'copy'}")]
