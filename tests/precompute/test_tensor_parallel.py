"""A teacher split over ranks: ``--tensor-parallel N`` under torchrun (gloo on CPU) writes the
single-process cache; groups of N ranks are the workers; refusals off torchrun.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_distributed import N_SHARDS, precompute_args, shard_bytes, torchrun

from logitcache.cli import main
from logitcache.errors import LogitcacheError
from logitcache.precompute import ranks
from logitcache.precompute.tensor_parallel import group_of
from logitcache.storage import Location, read_manifest


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_one_tensor_parallel_group_writes_the_single_process_cache(
    tmp_path, tiny_teacher_dir, text_corpus
):
    """2 ranks share one copy of the teacher (each holds half of every split layer): rank 0
    writes, rank 1 runs the same forwards and writes nothing; the cache is the one-process
    cache byte for byte (sampled, N=16: draws from float32 probabilities whose low bits may
    differ with the split sums, measured identical here; docs/distributed.md)."""
    single = tmp_path / "single"
    assert (
        invoke(*precompute_args(tiny_teacher_dir, text_corpus, single, "--device", "cpu")).exit_code
        == 0
    )
    split = tmp_path / "tp2"
    proc = torchrun(
        2, precompute_args(tiny_teacher_dir, text_corpus, split, "--tensor-parallel", 2)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(Location(str(split)))
    assert manifest.complete and len(manifest.shards) == N_SHARDS
    assert not (split / "parts").exists()  # one group: one worker, its own manifest.json
    assert sorted(p.name for p in (split / ".locks").iterdir()) == ["worker-0-of-1.lock"]
    assert shard_bytes(split) == shard_bytes(single)


@pytest.mark.slow
def test_two_groups_of_two_ranks_are_two_workers(tmp_path, tiny_teacher_dir, text_corpus):
    """4 ranks, --tensor-parallel 2: groups {0, 1} and {2, 3} are workers 0 and 1 of 2; ranks
    0 and 2 write; all meet at the end and rank 0 merges."""
    single = tmp_path / "single"
    assert (
        invoke(*precompute_args(tiny_teacher_dir, text_corpus, single, "--device", "cpu")).exit_code
        == 0
    )
    split = tmp_path / "tp2dp2"
    proc = torchrun(
        4,
        precompute_args(tiny_teacher_dir, text_corpus, split, "--tensor-parallel", 2),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(Location(str(split))).complete
    assert sorted(p.name for p in (split / "parts").iterdir()) == [
        "worker-00000-of-00002.json",
        "worker-00001-of-00002.json",
    ]
    assert shard_bytes(split) == shard_bytes(single)


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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 4 nodes of 2: a group of 4 spans nodes
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
