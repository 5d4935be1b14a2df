"""Reading a cache over HTTP: what opening fetches, ranged random access, the local shard
cache (checked on arrival, LRU, never a partial copy), prefetching, and the errors."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from servers import Served, closed_port
from storage_synth import assert_records_match, make_spec, write_cache

from logitcache.storage import (
    CacheError,
    CacheReader,
    CacheWriter,
    RemoteError,
    ShardCache,
    ShardCorruptError,
    copy_cache,
    verify_cache,
)
from logitcache.storage.format import MANIFEST_BYTES
from logitcache.storage.local_copies import Prefetcher
from logitcache.storage.location import Location

pytestmark = pytest.mark.usefixtures("remote_env")


def shard_gets(server, ranged: bool | None = None) -> list[str]:
    """Names of the shards the server was asked for (whole, ranged, or both)."""
    return [
        p.rsplit("/", 1)[-1]
        for m, p, rng in server.requests
        if m == "GET" and "/shards/" in p and (ranged is None or (rng is not None) == ranged)
    ]


def local_copies(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "shards" / "objects").glob("*/*"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- opening and random access ---------------------------------------------------------------


def test_opening_reads_the_manifest_and_nothing_else(served):
    server, url, spec = served.server, served.url, served.spec
    reader = CacheReader(url)
    (request,) = server.requests  # one GET, of at most MANIFEST_BYTES + 1 bytes
    assert request == ("GET", "/c/manifest.json", f"bytes=0-{MANIFEST_BYTES}")
    assert len(reader) == 10 and reader.spec == spec


@pytest.fixture
def big_shards(www):
    """Two format 1 shards of ~250 KB, much larger than the 64 KiB tail a ranged open fetches."""
    spec = make_spec(seq_len=300, k=64, shard_sequences=12, format_version=1)
    records = write_cache(www.root / "big", spec, 24)
    return Served(www, f"{www.url}/big", spec, records)


@pytest.fixture
def big_batches(www):
    """Two format 2 shards of 4 batches of 3 sequences, each shard ~4 x the 64 KiB tail."""
    spec = make_spec(seq_len=300, k=64, shard_sequences=12, batch_sequences=3, vocab_size=5000)
    records = write_cache(www.root / "big2", spec, 24)
    return Served(www, f"{www.url}/big2", spec, records)


def ranges(server) -> list[tuple[int, int]]:
    out = []
    for _, _, header in server.requests:
        first, last = header.removeprefix("bytes=").split("-")
        out.append((int(first), int(last) + 1))
    return out


def test_random_access_is_one_ranged_read_per_sequence(big_shards, remote_env):
    server, url, spec, records = (
        big_shards.server,
        big_shards.url,
        big_shards.spec,
        big_shards.records,
    )
    reader = CacheReader(url)
    size = reader.shards[1].bytes
    assert size > 3 * 65536
    server.clear()
    assert_records_match(spec, reader.read(13), records[13])
    # the shard's tail (footer, schema, identity metadata), then the one record batch
    (tail, row), *_ = [ranges(server)]
    assert tail == (size - 65536, size) and row[1] <= size - 65536
    assert shard_gets(server, ranged=False) == []
    server.clear()
    for i in (12, 14):  # rows 0 and 2 of shard 1, outside the tail
        assert_records_match(spec, reader.read(i), records[i])
    rows = [row, *ranges(server)]
    assert len(rows) == 3 and all(b - a < size / 3 for a, b in rows)  # one batch each
    assert 65536 + sum(b - a for a, b in rows) < size  # 3 of 12 sequences, not the shard
    assert local_copies(remote_env) == []  # nothing was downloaded whole


def test_ranged_read_still_catches_a_damaged_record(big_shards, remote_env):
    server, url, spec, records = (
        big_shards.server,
        big_shards.url,
        big_shards.spec,
        big_shards.records,
    )
    path = server.root / "big" / "shards" / "shard-000001.arrow"
    with pa.ipc.open_file(pa.memory_map(str(path))) as f:
        blob = f.get_batch(2).column("ids")[0].as_py()  # sequence 14's ids, zstd-compressed
    flip_byte(path, path.read_bytes().index(blob) + len(blob) // 2)
    reader = CacheReader(url)
    assert_records_match(spec, reader.read(13), records[13])  # its neighbours are fine
    with pytest.raises(CacheError, match=r"row 2: field 'ids'.*checksum"):  # zstd's own
        reader.read(14)


def test_random_access_to_format_2_is_one_ranged_read_per_batch(big_batches, remote_env):
    server, url, spec, records = (
        big_batches.server,
        big_batches.url,
        big_batches.spec,
        big_batches.records,
    )
    reader = CacheReader(url)
    size = reader.shards[1].bytes
    assert size > 3 * 65536
    server.clear()
    assert_records_match(spec, reader.read(13), records[13])  # group 0 of shard 1: 12..14
    (tail, row), *_ = [ranges(server)]
    assert tail == (size - 65536, size) and row[1] <= size - 65536
    server.clear()
    for i in (12, 14):  # the same batch: decoded once, no more reads
        assert_records_match(spec, reader.read(i), records[i])
    assert ranges(server) == []
    assert_records_match(spec, reader.read(16), records[16])  # group 1: one more read
    (other,) = ranges(server)
    assert other[1] <= row[0] or other[0] >= row[1]
    assert 65536 + (row[1] - row[0]) + (other[1] - other[0]) < size
    assert shard_gets(server, ranged=False) == [] and local_copies(remote_env) == []


def test_format_2_ranged_read_catches_a_damaged_batch(big_batches, remote_env):
    server, url, spec, records = (
        big_batches.server,
        big_batches.url,
        big_batches.spec,
        big_batches.records,
    )
    path = server.root / "big2" / "shards" / "shard-000001.arrow"
    with pa.ipc.open_file(pa.memory_map(str(path))) as f:
        blob = f.get_batch(1).column("ids")[0].as_py()  # sequences 15..17, zstd-compressed
    flip_byte(path, path.read_bytes().index(blob) + len(blob) // 2)
    reader = CacheReader(url)
    assert_records_match(spec, reader.read(13), records[13])  # another batch is fine
    with pytest.raises(ShardCorruptError, match=r"group 1: field 'ids'.*checksum"):
        reader.read(16)


# -- whole shards: the local shard cache -------------------------------------------------------


def test_iteration_fetches_each_shard_once_checked(served, remote_env):
    server, url, spec, records = served.server, served.url, served.spec, served.records
    got = list(CacheReader(url))
    for a, b in zip(got, records, strict=True):
        assert_records_match(spec, a, b)
    assert sorted(shard_gets(server)) == [f"shard-{j:06d}.arrow" for j in range(4)]
    reader = CacheReader(url)
    assert local_copies(remote_env) == sorted(f"{s.sha256}.arrow" for s in reader.shards)
    server.clear()
    assert [r.index for r in reader] == list(range(10))
    assert shard_gets(server) == []  # all from the local copies
    assert_records_match(spec, reader.read(4), records[4])  # local: no ranged read either
    assert shard_gets(server) == []


def test_a_damaged_local_copy_is_fetched_again(served, remote_env):
    server, url = served.server, served.url
    list(CacheReader(url))
    (copy,) = (remote_env / "shards" / "objects").glob(f"*/{CacheReader(url).shards[2].sha256}*")
    flip_byte(copy, 100)
    server.clear()
    got = list(CacheReader(url).iter_shard(2))
    assert [r.index for r in got] == [6, 7, 8]
    assert shard_gets(server) == ["shard-000002.arrow"]


def test_corrupted_object_is_named_and_refused(served, remote_env):
    server, url = served.server, served.url
    flip_byte(server.root / "c" / "shards" / "shard-000001.arrow", 200)
    reader = CacheReader(url)
    with pytest.raises(ShardCorruptError, match=r"c/shards/shard-000001\.arrow arrived damaged"):
        list(reader.iter_shard(1))
    assert all(str(s.sha256) not in " ".join(local_copies(remote_env)) for s in reader.shards[1:2])
    assert list((remote_env / "shards" / "tmp").iterdir()) == []
    _, problems = verify_cache(url)
    assert len(problems) == 1 and "shard-000001" in problems[0]


def test_a_cut_off_download_is_never_used(served, remote_env):
    server, url = served.server, served.url
    server.truncate["shard-000002.arrow"] = 2  # both attempts are cut off halfway
    reader = CacheReader(url)
    with pytest.raises(RemoteError, match=r"shard-000002\.arrow after 2 attempts"):
        reader.open_shard(2)
    assert local_copies(remote_env) == []
    assert list((remote_env / "shards" / "tmp").iterdir()) == []
    server.truncate["shard-000002.arrow"] = 1  # once: the retry succeeds
    assert [r.index for r in reader.iter_shard(2)] == [6, 7, 8]
    assert shard_gets(server).count("shard-000002.arrow") == 4


def test_least_recently_used_copies_are_evicted(served, tmp_path):
    url = served.url
    sizes = [s.bytes for s in CacheReader(url).shards]
    limit = sizes[0] + sizes[1] + sizes[2] + 1  # room for three shards
    reader = CacheReader(url, local_cache=tmp_path / "lc", local_cache_bytes=limit)
    cache = reader.shard_cache
    for pos in (0, 1, 2):
        reader.open_shard(pos)
    paths = [cache.object_path(s) for s in reader.shards]
    for age, pos in enumerate((1, 0, 2)):  # 1 least recently used, then 0, then 2
        os.utime(paths[pos], (1000 + age, 1000 + age))
    reader.open_shard(3)
    assert [p.exists() for p in paths] == [True, False, True, True]
    assert cache.total_bytes() <= limit


def test_partial_downloads_of_dead_processes_are_removed(tmp_path):
    cache = ShardCache(tmp_path / "lc", 10**6)
    dead = 2**22 + 17  # above the default pid_max: no such process
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    (cache.root / "tmp" / f"{'ab' * 32}.{dead}.0123abcd.part").write_bytes(b"half")
    mine = cache.root / "tmp" / f"{'cd' * 32}.{os.getpid()}.0123abcd.part"
    mine.write_bytes(b"in progress")
    ShardCache(tmp_path / "lc", 10**6)
    assert list((cache.root / "tmp").iterdir()) == [mine]


def test_concurrent_fetches_of_one_shard_download_it_once(tmp_path, monkeypatch):
    spec = make_spec(shard_sequences=3)
    write_cache(tmp_path / "src", spec, 6)
    source = Location(tmp_path / "src")
    info = CacheReader(tmp_path / "src").shards[0]
    calls = []
    real = Location.get_file

    def slow_get(self, rel, local):
        calls.append(rel)
        time.sleep(0.2)
        return real(self, rel, local)

    monkeypatch.setattr(Location, "get_file", slow_get)
    cache = ShardCache(tmp_path / "lc", 10**7)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.fetch(source, info))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [info.path] and len(set(results)) == 1 and results[0].exists()


# -- prefetching -----------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_prefetch_fetches_in_order_and_stays_within_its_window(served, remote_env):
    server, url, spec, records = served.server, served.url, served.spec, served.records
    reader = CacheReader(url, prefetch=1)
    reader.prefetch([3, 1, 0, 2])
    wait_for(lambda: len(local_copies(remote_env)) == 1)
    time.sleep(0.3)
    assert shard_gets(server) == ["shard-000003.arrow"]  # one ahead of the reader, no more
    assert_records_match(spec, reader.read(9), records[9])  # shard 3: the prefetched copy
    wait_for(lambda: len(local_copies(remote_env)) == 2)
    assert shard_gets(server) == ["shard-000003.arrow", "shard-000001.arrow"]
    assert_records_match(spec, reader.read(0), records[0])  # out of the window: ranged
    assert shard_gets(server, ranged=True) == ["shard-000000.arrow"]
    time.sleep(0.2)
    assert len(local_copies(remote_env)) == 2


def test_prefetch_sequences_orders_shards_by_first_use(served):
    url = served.url
    reader = CacheReader(url)
    seen = []
    reader.prefetch = lambda positions: seen.extend(positions)
    reader.prefetch_sequences(np.array([7, 8, 1, 9, 6, 0, 4]))
    assert seen == [2, 0, 3, 1]


def test_prefetcher_hands_errors_to_the_reader_that_waits():
    gate = threading.Event()

    def fetch(pos: int) -> Path:
        gate.wait(5)
        if pos == 2:
            raise ShardCorruptError("shard 2 is damaged")
        return Path(f"/copies/{pos}")

    prefetcher = Prefetcher(fetch, depth=2, threads=2)
    prefetcher.schedule([5, 2, 7, 9])
    assert prefetcher.pending(5) and prefetcher.pending(2) and not prefetcher.pending(7)
    assert prefetcher.wait(9) is None  # not scheduled inside the window: no waiting
    gate.set()
    assert prefetcher.wait(5) == Path("/copies/5")
    prefetcher.reached(5)
    with pytest.raises(ShardCorruptError, match="shard 2"):
        prefetcher.wait(2)
    prefetcher.close()


def test_a_forked_reader_starts_its_own_threads(served):
    url = served.url
    reader = CacheReader(url)
    reader.prefetch([0, 1])
    reader._pid = -1  # as a DataLoader worker sees it after fork
    reader.read(4)
    assert reader._prefetcher is None  # the parent's prefetcher was dropped, not used


# -- errors ---------------------------------------------------------------------------------


def test_unreachable_server_is_a_clear_error_after_bounded_retries():
    url = f"http://127.0.0.1:{closed_port()}/cache"
    start = time.monotonic()
    with pytest.raises(RemoteError, match=rf"cannot reach {url}/manifest\.json after 2 attempts"):
        CacheReader(url)
    assert time.monotonic() - start < 5


def test_a_server_that_never_answers_times_out(monkeypatch):
    monkeypatch.setenv("LOGITCACHE_TIMEOUT", "0.5")
    with socket.socket() as sock:  # accepts connections (the kernel does), never replies
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/cache"
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"cannot reach .*0\.5 s timeout each"):
            CacheReader(url)
        assert time.monotonic() - start < 5


def test_http_is_read_only(served):
    url, spec = served.url, served.spec
    with pytest.raises(CacheError, match=r"http.s. is read-only"):
        CacheWriter(url, spec)


def test_a_missing_remote_cache_says_so(www):
    with pytest.raises(CacheError, match=r"no manifest\.json at http://.*/nothing/manifest"):
        CacheReader(f"{www.url}/nothing")


@pytest.mark.parametrize(
    "name,value", [("LOGITCACHE_TIMEOUT", "soon"), ("LOGITCACHE_RETRIES", "0")]
)
def test_bad_remote_settings(www, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(CacheError, match="LOGITCACHE_"):
        CacheReader(f"{www.url}/c")


def test_a_server_without_range_support_still_serves_a_cache(tmp_path, remote_env):
    """``python -m http.server`` answers a ranged GET with the whole file: the reader
    notices and reads whole shards from then on."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Plain(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "plain"), **kwargs)

        def log_message(self, *args):
            pass

    spec = make_spec(seq_len=300, k=64, shard_sequences=12)  # shards of ~250 KB
    records = write_cache(tmp_path / "plain" / "c", spec, 36)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    httpd.handle_error = lambda *args: None  # clients that hang up after their range
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        reader = CacheReader(f"http://127.0.0.1:{httpd.server_address[1]}/c")
        for i in (13, 0, 30, 14):
            assert_records_match(spec, reader.read(i), records[i])
        assert reader.loc.ranges_ignored
        assert len(local_copies(remote_env)) == 3  # after the first read: whole shards
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_a_reader_dropped_without_close_stops_its_threads(served):
    import gc

    def prefetching() -> int:
        return sum(t.name == "prefetch" for t in threading.enumerate())

    before = prefetching()
    reader = CacheReader(served.url)
    reader.prefetch([0, 1, 2, 3])
    assert prefetching() == before + 4
    del reader
    gc.collect()
    wait_for(lambda: prefetching() == before)


def test_a_zarr_cache_over_http(www, tmp_path):
    """Zarr shards: random access through zarr's ranged reads; whole shards by listing the
    group (this server lists directories) and fetching file by file, checked on arrival."""
    spec = make_spec(container="zarr", shard_sequences=3)
    records = write_cache(www.root / "z", spec, 7)
    reader = CacheReader(f"{www.url}/z")
    assert_records_match(spec, reader.read(4), records[4])
    for got, want in zip(reader, records, strict=True):
        assert_records_match(spec, got, want)
    assert verify_cache(f"{www.url}/z")[1] == []
    copy_cache(f"{www.url}/z", tmp_path / "pulled")
    assert verify_cache(tmp_path / "pulled")[1] == []
