"""The public data pieces with other loaders: torchdata's ``StatefulDataLoader`` resumes a
``CacheStream`` mid-epoch, ``CacheSampler`` gives a map-style ``CacheDataset`` the stream's
order, and ``DistributedSampler`` shards the dataset like any other."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from logitcache.train import CacheDataset, DistillCollator
from logitcache.train.sampler import CacheSampler

EVAL_FRACTION = 0.2  # 43 training sequences


@pytest.fixture(scope="module")
def data(topk_cache) -> CacheDataset:
    return CacheDataset(str(topk_cache), eval_fraction=EVAL_FRACTION, vocab_limit=300)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_the_stream(data, workers):
    """Checkpoint after 7 micro-batches (2 ranks, accumulation 2); a fresh loader loaded
    with that state yields the 12 the original loader yields next (across an epoch)."""
    tdl = pytest.importorskip("torchdata.stateful_dataloader")

    def loader():
        stream = data.stream(batch_size=3, rank=1, world_size=2, grad_accum=2, seed=5)
        return tdl.StatefulDataLoader(stream, batch_size=None, num_workers=workers)

    first = loader()
    it = iter(first)
    list(itertools.islice(it, 7))
    state = first.state_dict()
    assert "'stride'" in repr(state)  # our iterator's own state, not a fast-forward count
    want = list(itertools.islice(it, 12))
    again = loader()
    again.load_state_dict(state)
    got = list(itertools.islice(iter(again), 12))
    assert len(got) == 12 and all(same(a, b) for a, b in zip(got, want, strict=True))


def test_sampler_follows_the_stream(data):
    """Batches of 4 from the sampler are the stream's micro-batches of 4, epoch by epoch."""
    sampler = CacheSampler(data, seed=2, block_shards=2)
    stream = data.stream(batch_size=4, seed=2, block_shards=2, epochs=2)
    loader = DataLoader(data, batch_size=4, sampler=sampler, collate_fn=DistillCollator())
    from_stream = [b["index"].tolist() for b in stream]
    from_sampler = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        from_sampler += [b["index"].tolist() for b in loader]
    assert from_sampler == from_stream
    assert sorted(sampler) == list(range(len(data)))  # every position once per epoch


def test_distributed_sampler_shards_the_dataset(data):
    ranks = [
        list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 21 and not set(ranks[0]) & set(ranks[1])
    record = data[ranks[1][0]]
    assert record["input_ids"].dtype == torch.int64 and record["teacher_ids"].ndim == 2
