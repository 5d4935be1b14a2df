"""A teacher split over ranks: ``--tensor-parallel N`` under torchrun (gloo on CPU) writes the
single-process cache; groups of N ranks are the workers; refusals off torchrun.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_distributed import N_SHARDS, precompute_args, shard_bytes, torchrun

from logitcache.cli import main
from logitcache.core.errors import LogitcacheError
from logitcache.precompute import ranks
from logitcache.precompute.tensor_parallel import group_of
from logitcache.storage import CacheReader, Location, read_manifest


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def positions_that_differ(a, b) -> tuple[int, int]:
    """(positions whose stored ids or counts differ, positions) of two caches of one corpus."""
    differ = total = 0
    for x, y in zip(CacheReader(a), CacheReader(b), strict=True):
        ends_x, ends_y = np.cumsum(x.n_entries), np.cumsum(y.n_entries)
        for p, (n_x, n_y) in enumerate(zip(x.n_entries, y.n_entries)):
            here_x, here_y = slice(ends_x[p] - n_x, ends_x[p]), slice(ends_y[p] - n_y, ends_y[p])
            same = np.array_equal(x.ids[here_x], y.ids[here_y]) and np.array_equal(
                x.counts[here_x], y.counts[here_y]
            )
            differ += not same
            total += 1
    return differ, total


@pytest.mark.slow
def test_tensor_parallel_groups_write_one_cache_for_any_number_of_groups(
    tmp_path, tiny_teacher_dir, text_corpus
):
    """2 ranks share one copy of the teacher (half of every split layer each): rank 0 writes,
    rank 1 runs the same forwards and writes nothing. With 4 ranks, groups {0, 1} and {2, 3}
    are workers 0 and 1 of 2 and all meet at the end: the same bytes as one group.

    Against one process the split sums round differently (float32 low bits), so a draw can
    land on the other side of a boundary: at most 1% of positions may differ (0 here;
    0.85% at N=64 on a peaked teacher, docs/distributed.md)."""
    one = tmp_path / "tp2"
    proc = torchrun(2, precompute_args(tiny_teacher_dir, text_corpus, one, "--tensor-parallel", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(Location(str(one)))
    assert manifest.complete and len(manifest.shards) == N_SHARDS
    assert not (one / "parts").exists()  # one group: one worker, its own manifest.json
    assert sorted(p.name for p in (one / ".locks").iterdir()) == ["worker-0-of-1.lock"]

    two = tmp_path / "tp2dp2"
    args = precompute_args(tiny_teacher_dir, text_corpus, two, "--tensor-parallel", 2)
    proc = torchrun(4, args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(Location(str(two))).complete
    assert sorted(p.name for p in (two / "parts").iterdir()) == [
        "worker-00000-of-00002.json",
        "worker-00001-of-00002.json",
    ]
    assert shard_bytes(two) == shard_bytes(one)

    single = tmp_path / "single"
    result = invoke(*precompute_args(tiny_teacher_dir, text_corpus, single, "--device", "cpu"))
    assert result.exit_code == 0, result.stderr
    differ, positions = positions_that_differ(single, one)
    assert positions > 1000 and differ <= positions // 100


@pytest.mark.slow
def test_a_refused_cache_stops_every_rank_of_the_group(tmp_path, tiny_teacher_dir, text_corpus):
    """The writing rank opens the cache; when it is refused (made with other settings), the
    other rank fails with the same line instead of waiting for forwards that never come."""
    out = tmp_path / "c"
    assert (
        invoke(*precompute_args(tiny_teacher_dir, text_corpus, out, "--device", "cpu")).exit_code
        == 0
    )
    proc = torchrun(
        2,
        precompute_args(tiny_teacher_dir, text_corpus, out, "--tensor-parallel", 2, "--seed", 1),
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a cache made with other settings") == 2


# ---------------------------------------------------------------------------------------
# Which group and worker this rank is (no processes started)


def test_groups_of_consecutive_ranks_are_the_workers(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert ranks.resolve_worker(None, None, 2) == (2, 4)
    assert ranks.resolve_worker(None, None, 8) == (0, 1)
    assert ranks.launched_as_ranks(2, 4, 2) and not ranks.launched_as_ranks(5, 8, 2)
    group = group_of(4)
    assert (group.rank, group.index, group.count, group.writes) == (1, 1, 2, False)
    with pytest.raises(LogitcacheError, match="the 4 tensor-parallel groups are the workers"):
        ranks.resolve_worker(8, 5, 2)
    with pytest.raises(LogitcacheError, match="--tensor-parallel 3 must divide torchrun's 8"):
        ranks.resolve_worker(None, None, 3)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun of one group: a job array's task
    monkeypatch.setenv("RANK", "3")
    assert ranks.resolve_worker(16, 7, 4) == (7, 16)
    assert not ranks.launched_as_ranks(7, 16, 4)  # no barrier: the last task merges
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 nodes of 2: a group of 4 spans nodes
    with pytest.raises(LogitcacheError, match="needs whole groups on each node"):
        group_of(4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tensor-parallel", 0], "--tensor-parallel must be >= 1, got 0"),
        (["--tensor-parallel", 2, "--device-map", "auto"], "each place the teacher: choose one"),
        (["--tensor-parallel", 2, "--bytes-per-token", 20], "then pass the --samples N it chose"),
        (["--tensor-parallel", 2], "--tensor-parallel 2 runs under torchrun, one process per"),
    ],
)
def test_tensor_parallel_refusals(
    monkeypatch, tmp_path, tiny_teacher_dir, text_corpus, extra, message
):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = precompute_args(tiny_teacher_dir, text_corpus, tmp_path / "c", *extra)
    if "--bytes-per-token" in extra:
        args = [a for a in args if a not in ("--samples", "16")]
    result = invoke(*args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "c").exists()


def test_loading_split_needs_the_group(tiny_teacher_dir):
    from logitcache.models import load_teacher

    with pytest.raises(LogitcacheError, match=r"torchrun --nproc-per-node 2 -m logitcache\.cli"):
        load_teacher(str(tiny_teacher_dir), tensor_parallel=2, device="cpu")


def test_a_teacher_without_a_plan_is_refused_with_what_to_use(tmp_path):
    from transformers import GPT2Config

    from logitcache.models import load_teacher

    GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)  # no base_model_tp_plan
    with pytest.raises(LogitcacheError, match="has no tensor-parallel plan in transformers: run"):
        load_teacher(str(tmp_path), tensor_parallel=2, device="cpu")


def test_a_split_that_cuts_through_heads_is_refused(tmp_path):
    """SmolLM2-135M's 9 query and 3 key-value heads split over 2 ranks would fail inside
    the forward with a reshape error; it is refused before loading, with the sizes that fit."""
    from transformers import LlamaConfig

    from logitcache.models import load_teacher

    LlamaConfig(hidden_size=72, num_attention_heads=9, num_key_value_heads=3).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        LogitcacheError, match=r"\(9 and 3 query and key-value heads\): use one of 1, 3$"
    ):
        load_teacher(str(tmp_path), tensor_parallel=2, device="cpu")


def test_dry_run_says_the_split_does_not_fit_without_torchrun(tmp_path, text_corpus):
    from transformers import LlamaConfig

    from logitcache.bench.precompute import synthetic_tokenizer

    LlamaConfig(
        hidden_size=72, num_attention_heads=9, num_key_value_heads=3, vocab_size=64
    ).save_pretrained(tmp_path)
    synthetic_tokenizer(64).save_pretrained(str(tmp_path))
    args = [
        "precompute",
        "--teacher",
        tmp_path,
        "--data",
        text_corpus,
        "--out",
        tmp_path / "c",
        "--tensor-parallel",
        4,
        "--dry-run",
    ]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "--tensor-parallel 4 must divide the teacher's attention heads" in result.stderr
