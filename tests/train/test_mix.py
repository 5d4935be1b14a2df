"""Several caches in one stream: weighted mixing, resume, the CLI, and epochs that end short.

The session's top-k and sampled caches share one teacher and tokenizer, so they mix.
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from logitcache.train import CacheDataset, CacheStream
from logitcache.train.order import epoch_order, mixture_order

EVAL_FRACTION = 0.2  # 43 training sequences per session cache


def orders_of(sizes, seed=0):
    """Own epoch orders of synthetic caches: cache c holds ids c*1000 .. c*1000+size-1."""
    shards = [[(c * 1000 + f, min(4, n - f)) for f in range(0, n, 4)] for c, n in enumerate(sizes)]
    return [lambda e, s=s: epoch_order(s, seed=seed, epoch=e, block_shards=2) for s in shards]


def test_one_cache_is_its_own_epoch_order():
    (order,) = orders_of([23])
    source, index = mixture_order([order], [23], [5.0], seed=0, epoch=3)
    assert (source == 0).all() and np.array_equal(index, order(3))


def test_mixture_follows_the_weights_and_each_cache_order():
    """Cache 0 (10 sequences) weighted 3:1 over cache 1 (30): cache 0 is repeated, each
    time round in a fresh full permutation; cache 1 is sampled down, never repeating early."""
    sizes, epochs = [10, 30], 4
    orders = orders_of(sizes)
    drawn = [mixture_order(orders, sizes, [3, 1], seed=7, epoch=e) for e in range(epochs)]
    source = np.concatenate([s for s, _ in drawn])
    index = np.concatenate([i for _, i in drawn])
    assert len(source) == epochs * sum(sizes)
    share = (source == 0).mean()
    assert 0.70 < share < 0.80, share
    for c, size in enumerate(sizes):
        mine = index[source == c]
        expected = np.concatenate([orders[c](e) for e in range(len(mine) // size + 1)])
        assert np.array_equal(mine, expected[: len(mine)])
    # Pure in (seed, epoch): recomputing epoch 2 alone gives the same draws.
    again = mixture_order(orders, sizes, [3, 1], seed=7, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, drawn[2]))
    other = mixture_order(orders, sizes, [3, 1], seed=8, epoch=2)
    assert not np.array_equal(other[0], drawn[2][0])


@pytest.fixture(scope="module")
def mixed(topk_cache, sampled_cache):
    data = CacheDataset(
        [str(topk_cache), str(sampled_cache)], eval_fraction=EVAL_FRACTION, vocab_limit=10_000
    )

    def make(**kw) -> CacheStream:
        settings = dict(batch_size=3, seed=1, block_shards=2, weights=[1, 2])
        return data.stream(**{**settings, **kw})

    return make


def pairs_of(batch) -> list[tuple[int, int]]:
    return list(zip(batch["source"].tolist(), batch["index"].tolist()))


def test_a_stream_over_two_caches(mixed):
    batches = list(mixed(epochs=1))
    pairs = [p for b in batches for p in pairs_of(b)]
    assert len(pairs) == 86  # one mixture epoch: 43 + 43 draws
    counts = np.bincount([c for c, _ in pairs])
    assert counts[1] > counts[0] > 10  # weight 2:1
    for b in batches:  # sampled rows carry no tail mass
        sampled = b["source"] == 1
        assert not b["teacher_tail"][sampled].any()


def test_a_mixed_stream_resumes_exactly(mixed):
    """state_dict() after 17 micro-batches; a new stream loaded with it yields the rest."""
    stream = mixed()
    it = iter(stream)
    full = [pairs_of(b) for b in itertools.islice(it, 17)]
    state = stream.state_dict()
    full += [pairs_of(b) for b in itertools.islice(it, 23)]
    resumed = mixed()
    resumed.load_state_dict(state)
    rest = [pairs_of(b) for b in itertools.islice(iter(resumed), 23)]
    assert rest == full[17:]


# -- through the CLI -----------------------------------------------------------------------
@pytest.fixture
def run_args(train_args, student_config, teacher_dir, tmp_path):
    def make(caches, **flags):
        args = train_args(
            caches[0],
            tmp_path / "run",
            student_config=student_config,
            tokenizer=teacher_dir,
            **flags,
        )
        for extra in caches[1:]:
            args += ["--cache", str(extra)]
        return args

    return make


@pytest.mark.parametrize("workers", [0, 2])
def test_train_from_two_caches(
    cli, run_args, metrics, topk_cache, sampled_cache, tmp_path, workers
):
    args = run_args(
        [topk_cache, sampled_cache],
        steps=3,
        cache_weights="1,3",
        save_every=1,
        loader_workers=workers,
    )
    result = cli(args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["mix_caches"] == [str(sampled_cache)] and config["cache_weights"] == [1, 3]
    assert len(config["fingerprint"]["mix_cache_ids"]) == 1
    assert len([r for r in metrics(tmp_path / "run") if "loss" in r]) == 3
    # Resuming with other weights is refused and names the change.
    more = run_args([topk_cache, sampled_cache], steps=4, cache_weights="1,1", resume=True)
    result = cli(more)
    assert result.exit_code == 1 and "cache_weights" in result.output, result.output
    # The same weights resume.
    same = run_args([topk_cache, sampled_cache], steps=4, cache_weights="1,3", resume=True)
    assert cli(same).exit_code == 0


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("1", "expected 2 positive numbers"),
        ("1,0", "expected 2 positive numbers"),
        ("a,b", "expected numbers separated by commas"),
    ],
)
def test_bad_weights(cli, run_args, topk_cache, sampled_cache, weights, message):
    result = cli(run_args([topk_cache, sampled_cache], steps=1, cache_weights=weights))
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_mixed_cache_with_another_tokenizer_is_refused(
    cli, run_args, topk_cache, sampled_cache, tmp_path
):
    other = tmp_path / "other"
    shutil.copytree(sampled_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["spec"]["tokenizer"]["fingerprint"] = "f" * 64
    manifest["spec"]["tokenizer"]["fingerprint_full"] = "f" * 64
    manifest.pop("cache_id", None)
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = cli(run_args([topk_cache, other], steps=1))
    assert result.exit_code == 1, result.output
    assert "another tokenizer" in result.output and str(other) in result.output


def test_every_epoch_ends_with_its_own_short_step(cli, run_args, metrics, topk_cache, tmp_path):
    """43 sequences in steps of 6: 8 steps an epoch (the last of 1), so 2 epochs are 16 steps
    (not ceil(86 / 6) = 15, which would drop the second epoch's last sequence)."""
    result = cli(run_args([topk_cache], epochs=2, batch_size=6))
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 16 and [r["epoch"] for r in rows] == [0] * 8 + [1] * 8
    assert rows[-1]["tokens"] == 2 * (42 * 32 + 9)
