"""Caches on an S3-compatible store (moto's server, through s3fs): writing with atomic
publication, reading, push / pull, Zarr, and the credential and network errors."""

from __future__ import annotations

import time

import pytest
from servers import aws_environment, closed_port, s3_keys
from storage_synth import assert_records_match, make_spec, shard_records, tree_bytes, write_cache

from logitcache.storage import (
    CacheError,
    CacheReader,
    CacheWriter,
    RemoteError,
    copy_cache,
    merge_parts,
    read_manifest,
    verify_cache,
)
from logitcache.storage.location import Location

pytestmark = pytest.mark.slow  # a moto server per session, and S3 round trips


def cache_files(root) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(root).items() if not k.startswith(".locks/")}


@pytest.mark.parametrize("container", ["arrow", "zarr"])
def test_write_to_s3_and_read_back(s3, container, remote_env):
    spec = make_spec(container=container, shard_sequences=3)
    url = f"{s3}/cache"
    records = write_cache(url, spec, 8)
    keys = s3_keys(url)
    assert "manifest.json" in keys and not [k for k in keys if ".tmp" in k]
    assert not [k for k in keys if k.startswith(".locks")]  # no local-disk locks on S3
    reader = CacheReader(url)
    for i in (7, 0, 4):  # random access: ranged reads (zarr: its own)
        assert_records_match(spec, reader.read(i), records[i])
    for got, want in zip(reader, records, strict=True):  # whole shards, checked on arrival
        assert_records_match(spec, got, want)
    assert verify_cache(url)[1] == []


def test_a_failed_upload_leaves_the_manifest_as_it_was(s3, monkeypatch):
    spec = make_spec(shard_sequences=2)
    url = f"{s3}/cache"
    with CacheWriter(url, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, 5))
    real = Location.publish_bytes

    def fail_shard_1(self, rel, data):
        if "shard-000001" in rel:
            raise OSError("connection reset while uploading")
        return real(self, rel, data)

    monkeypatch.setattr(Location, "publish_bytes", fail_shard_1)
    with CacheWriter(url, spec) as writer, pytest.raises(OSError, match="reset"):
        writer.write_shard(1, shard_records(spec, 1, 5))
    assert [s.index for s in read_manifest(Location(url)).shards] == [0]
    assert s3_keys(url) == ["manifest.json", "shards/shard-000000.arrow"]


def test_parallel_workers_on_s3_merge_into_one_cache(s3, tmp_path):
    spec = make_spec(shard_sequences=2)
    url = f"{s3}/cache"
    for worker in (1, 0):
        with CacheWriter(url, spec, worker=worker, num_workers=2) as writer:
            for j in range(worker, 3, 2):
                writer.write_shard(j, shard_records(spec, j, 5))
            merged = writer.finish(5)
    assert merged is not None and merged.complete  # the last worker to finish merged
    assert merge_parts(url).shards == merged.shards
    write_cache(tmp_path / "one", spec, 5)
    local = read_manifest(Location(tmp_path / "one"))
    assert [s.sha256 for s in merged.shards] == [s.sha256 for s in local.shards]


def test_push_pull_round_trip_and_resume(s3, tmp_path):
    spec = make_spec(shard_sequences=3)
    write_cache(tmp_path / "src", spec, 10)
    url = f"{s3}/shared"
    pushed = copy_cache(tmp_path / "src", url)
    assert (pushed.copied, pushed.skipped) == (4, 0)
    assert s3_keys(url) == ["manifest.json"] + [f"shards/shard-{j:06d}.arrow" for j in range(4)]
    again = copy_cache(tmp_path / "src", url)
    assert (again.copied, again.skipped) == (0, 4)
    assert verify_cache(url)[1] == []
    pulled = copy_cache(url, tmp_path / "dst", shards="0,3")
    assert pulled.copied == 2
    rest = copy_cache(url, tmp_path / "dst")
    assert (rest.copied, rest.skipped) == (2, 2)
    assert cache_files(tmp_path / "dst") == cache_files(tmp_path / "src")


def test_a_corrupted_object_on_s3_is_refused(s3, tmp_path, remote_env):
    import s3fs

    spec = make_spec(shard_sequences=3)
    write_cache(tmp_path / "src", spec, 10)
    url = f"{s3}/shared"
    copy_cache(tmp_path / "src", url)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    key = f"{url[5:]}/shards/shard-000002.arrow"
    fs.pipe_file(key, fs.cat_file(key)[:-3] + b"xyz")
    _, problems = verify_cache(url)
    assert len(problems) == 1 and f"{url}/shards/shard-000002.arrow arrived damaged" in problems[0]
    with pytest.raises(CacheError, match=r"shard-000002\.arrow is damaged"):
        copy_cache(url, tmp_path / "dst")
    assert [s.index for s in read_manifest(Location(tmp_path / "dst")).shards] == [0, 1, 3]


def test_missing_credentials_say_how_to_provide_them(moto_endpoint, monkeypatch, remote_env):
    aws_environment(monkeypatch, moto_endpoint, credentials=False)
    with pytest.raises(RemoteError, match=r"no credentials for s3://.*AWS_ACCESS_KEY_ID"):
        CacheReader("s3://some-bucket/cache")


def test_an_unreachable_endpoint_is_an_error_after_bounded_retries(monkeypatch, remote_env):
    aws_environment(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"cannot reach s3://bucket/cache/manifest\.json"):
        CacheReader("s3://bucket/cache")
    assert time.monotonic() - start < 15


def test_writing_to_a_bucket_that_does_not_exist(s3, tmp_path):
    spec = make_spec(shard_sequences=3)
    write_cache(tmp_path / "src", spec, 4)
    with pytest.raises(CacheError, match=r"cannot write s3://no-such-bucket-.*create the bucket"):
        copy_cache(tmp_path / "src", f"s3://no-such-bucket-{s3[-8:]}/cache")
