"""Several processes on one cache: two teacher passes into one directory (one wins, the
other refuses cleanly), readers verifying a cache while it is being written (they never see
a half shard), and four trainers reading a cache while ``logitcache push`` copies it.
"""

from __future__ import annotations

import time

import pytest
from crashlab import Fault, refused, succeeded, tree_bytes
from safetensors.torch import load_file

from logitcache.storage import verify_cache


@pytest.mark.parametrize("round_", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in (1, 2))])
def test_two_precomputes_into_one_directory(
    round_, lab, precompute_args, reference_caches, tmp_path
):
    """Both start at once; whichever takes the lock pauses at its first teacher forward
    until the other has exited, so the loser always meets a live writer."""
    out, release = tmp_path / "cache", tmp_path / "release"
    pause = Fault("forward", at=1, action="pause", arg=str(release))
    runs = [lab.start(precompute_args(out, "topk"), pause) for _ in range(2)]
    deadline = time.monotonic() + 60
    while not any(run.poll() for run in runs) and time.monotonic() < deadline:
        time.sleep(0.02)
    loser = next(run for run in runs if run.poll())
    winner = next(run for run in runs if run is not loser)
    refused(loser.wait(), "another process is writing worker 0 of 1 into", str(out))
    release.touch()
    succeeded(winner.wait())
    assert tree_bytes(out) == tree_bytes(reference_caches["topk"])


def test_readers_never_see_a_half_written_shard(lab, precompute_args, tmp_path):
    """verify, in a loop, while a teacher pass (one sequence per forward) writes the cache:
    every manifest it reads lists only whole shards, and it sees the cache grow."""
    out = tmp_path / "cache"
    writer = lab.start(precompute_args(out, "sampled", "--batch-tokens", "32"))
    seen = set()
    while not writer.poll():
        if (out / "manifest.json").exists():
            manifest, problems = verify_cache(out)
            assert problems == [], problems
            seen.add((len(manifest.shards), manifest.complete))
    succeeded(writer.wait())
    manifest, problems = verify_cache(out)
    assert problems == [] and manifest.complete
    assert len(seen) >= 3, seen  # the loop really read the cache mid-write
    print(f"cache states read mid-write, all clean: {len(seen)}")  # for docs/reliability.md


def test_four_trainers_read_a_cache_while_push_copies_it(
    lab, reference_caches, train_args, tmp_path
):
    source = reference_caches["sampled"]
    before = tree_bytes(source)
    trainers = [
        lab.start(train_args(source, tmp_path / f"student-{i}", steps=6, loader_workers=i % 2))
        for i in range(4)
    ]
    copies = []
    while not all(t.poll() for t in trainers) or not copies:  # push again until all are done
        copy = tmp_path / f"copy-{len(copies)}"
        succeeded(lab.run(["push", source, copy, "--quiet"]))
        copies.append(copy)
    for trainer in trainers:
        succeeded(trainer.wait())

    assert len(copies) >= 2, "the trainers finished before a second push"
    print(f"pushes while 4 trainers ran: {len(copies)}")  # for docs/reliability.md
    for copy in copies:
        manifest, problems = verify_cache(copy)
        assert problems == [] and manifest.complete
        assert tree_bytes(copy) == before
    assert tree_bytes(source) == before  # pushing never touches its source
    models = [load_file(tmp_path / f"student-{i}/model/model.safetensors") for i in range(4)]
    assert all(all((m[k] == models[0][k]).all() for k in m) for m in models[1:])
