"""A full disk, during the teacher pass and during training: the command fails with one clear
line, the last good state stays valid (the cache verifies, the checkpoint loads), and the
same command rerun after space is freed completes with the same bytes as a run that never
failed.

The disk fills by RLIMIT_FSIZE set inside the running command at a chosen point (writes past
the limit fail with EFBIG, as ENOSPC does on a full disk; no root needed); one test also
uses a real, small tmpfs when this machine lets it mount one (root), and is skipped if not.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from crashlab import Fault, refused, succeeded, tree_bytes

from logitcache.storage import verify_cache

SHARD_LIMIT = 8 << 10  # a manifest (5 kB) fits, a shard (15 kB) does not
CHECKPOINT_LIMIT = 16 << 10  # metrics and configs (< 3 kB) fit, weights (120 kB) do not
OPTIMIZER_LIMIT = 160 << 10  # weights fit, the optimizer state (260 kB, torch.save) does not
TRAIN_FLAGS = {"steps": 8, "save_every": 2, "eval_every": 4}


def check_cache_left(out, n_listed: int) -> None:
    manifest, problems = verify_cache(out)
    assert problems == [] and not manifest.complete
    assert [s.index for s in manifest.shards] == list(range(n_listed))
    assert not list(out.rglob(".tmp-*"))  # the partial write was discarded


@pytest.mark.parametrize(
    ("where", "fault", "n_listed"),
    [
        ("shard", Fault("publish:shards/", at=4, action="limit", arg=SHARD_LIMIT), 3),
        pytest.param(
            "manifest",
            Fault("publish:manifest.json", at=3, action="limit", arg=1000),
            2,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_disk_full_during_precompute(
    where, fault, n_listed, lab, precompute_args, reference_caches, tmp_path
):
    out = tmp_path / "cache"
    failed = lab.run(precompute_args(out, "topk"), fault)
    refused(failed, f"disk full while writing shard {n_listed} to {out}", "rerun")
    check_cache_left(out, n_listed)

    succeeded(lab.run(precompute_args(out, "topk")))
    assert tree_bytes(out) == tree_bytes(reference_caches["topk"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, lab, reference_caches, train_args):
    out = tmp_path_factory.mktemp("disk-full-reference") / "run"
    succeeded(lab.run(train_args(reference_caches["topk"], out, **TRAIN_FLAGS)))
    return out


def same_model(a, b) -> bool:
    return (a / "model" / "model.safetensors").read_bytes() == (
        b / "model" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("where", "fault", "message"),
    [
        (
            "checkpoint",
            Fault(
                "publish:checkpoints/latest",
                at=1,
                when="after",
                action="limit",
                arg=CHECKPOINT_LIMIT,
            ),
            ["out of disk while checkpointing step 4", "step-0000002) is intact", "--resume"],
        ),
        pytest.param(  # the weights (120 kB) fit, the optimizer state (260 kB) does not
            "optimizer",
            Fault(
                "publish:checkpoints/latest",
                at=1,
                when="after",
                action="limit",
                arg=OPTIMIZER_LIMIT,
            ),
            ["out of disk while checkpointing step 4", "step-0000002) is intact", "--resume"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "final-model",
            Fault(
                "publish:checkpoints/latest",
                at=4,
                when="after",
                action="limit",
                arg=CHECKPOINT_LIMIT,
            ),
            ["out of disk while saving the final model", "step-0000008", "--resume"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "metrics",
            Fault("step", at=3, action="limit", arg=500),
            ["out of disk while writing", "metrics.jsonl", "--resume"],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_disk_full_during_training(
    where, fault, message, lab, reference_caches, train_args, reference_run, tmp_path
):
    out, cache = tmp_path / "run", reference_caches["topk"]
    refused(lab.run(train_args(cache, out, **TRAIN_FLAGS), fault), *message)
    assert not list(out.rglob(".tmp-*")), "a partial checkpoint or model was left behind"
    assert not (out / "model").exists()

    succeeded(lab.run(train_args(cache, out, **TRAIN_FLAGS, resume=True)))
    assert same_model(out, reference_run)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 kB tmpfs (real ENOSPC), or a skip where this machine may not mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_really_full_tmpfs_during_precompute(small_tmpfs, lab, precompute_args, reference_caches):
    """A filler leaves room for about 3 shards; deleting it is the 'free space' step."""
    filler = small_tmpfs / "filler"
    filler.write_bytes(bytes(170 << 10))
    out = small_tmpfs / "cache"
    failed = lab.run(precompute_args(out, "topk"))
    line = refused(failed, "disk full while writing shard", "rerun")
    n_listed = int(line.split("writing shard ")[1].split()[0])
    assert 1 <= n_listed < 7
    check_cache_left(out, n_listed)

    filler.unlink()
    succeeded(lab.run(precompute_args(out, "topk")))
    assert tree_bytes(out) == tree_bytes(reference_caches["topk"])
