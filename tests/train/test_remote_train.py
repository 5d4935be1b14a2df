"""Training from a URL: shards fetched ahead into ``--local-cache``, and from a partial pull.

An HTTP server on 127.0.0.1 serves a copy of the session's top-k cache (7 shards).
"""

from __future__ import annotations

import shutil

import pytest

from logitcache.bench.http_server import StaticServer
from logitcache.storage import CacheReader


@pytest.fixture
def served(topk_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "home"))  # never the user's cache
    monkeypatch.setenv("LOGITCACHE_TIMEOUT", "5")
    shutil.copytree(topk_cache, tmp_path / "www" / "cache")
    with StaticServer(tmp_path / "www") as server:
        yield server


@pytest.fixture
def args(train_args, student_config, teacher_dir, tmp_path):
    def make(cache, **flags):
        return train_args(
            cache,
            tmp_path / "run",
            student_config=student_config,
            tokenizer=teacher_dir,
            **flags,
        )

    return make


@pytest.mark.parametrize("workers", [0, 1])
def test_train_from_http_fetches_shards_ahead(cli, args, served, topk_cache, tmp_path, workers):
    """One epoch touches every shard; the stream schedules them in order, so each arrives whole
    (checked against its sha256) in the local cache instead of as ranged reads."""
    local = tmp_path / "shards"
    result = cli(args(f"{served.url}/cache", local_cache=local, loader_workers=workers))
    assert result.exit_code == 0, result.output
    copies = sorted(p.name for p in (local / "objects").rglob("*.arrow"))
    expected = sorted(f"{s.sha256}.arrow" for s in CacheReader(topk_cache).shards)
    assert copies == expected
    assert not (tmp_path / "home").exists()  # --local-cache replaced the default place
    whole = [p for p in served.paths("GET") if "/shards/" in p]
    assert len(set(whole)) == len(expected)


def test_train_from_a_partial_pull(cli, args, served, tmp_path):
    """`pull --shards 0-2` keeps 3 of 7 shards; training uses those 24 sequences only."""
    copy = tmp_path / "part"
    pulled = cli(["pull", f"{served.url}/cache", copy, "--shards", "0-2", "--quiet"])
    assert pulled.exit_code == 0 and "(partial)" in pulled.output, pulled.output
    result = cli(args(copy, steps=2))
    assert result.exit_code == 0, result.output


def test_bad_local_cache_size(cli, args, topk_cache):
    result = cli(args(topk_cache, steps=1, local_cache_gb=0))
    assert result.exit_code == 1 and "--local-cache-gb must be > 0" in result.output


def test_a_map_style_dataset_reads_a_url_by_ranges(served, topk_cache, tmp_path):
    """``CacheDataset(url)[i]`` gives the local record and downloads no shard whole: every
    shard request is a byte range (what any sampler, DistributedSampler or Trainer does)."""
    import torch

    from logitcache.train import CacheDataset

    remote = CacheDataset(
        f"{served.url}/cache",
        vocab_limit=300,
        reader_options={"local_cache": str(tmp_path / "shards")},
    )
    local = CacheDataset(str(topk_cache), vocab_limit=300)
    assert len(remote) == len(local)
    for i in (0, 17, len(local) - 1):
        a, b = remote[i], local[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shard_gets = [(p, rng) for m, p, rng in served.requests if m == "GET" and "/shards/" in p]
    assert shard_gets and all(rng for _, rng in shard_gets)
    assert not list((tmp_path / "shards").rglob("*.arrow"))
