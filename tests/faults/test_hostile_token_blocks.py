"""Damaged token blocks (``precompute/blocks.py``): the second worker of a job array reads
the store the first one wrote, each case damaging one file of it. The run must stop with one
line that names the block and says to delete the store, no traceback, within the time limit,
its peak memory at most ``MAX_GROWTH_MB`` above its start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from crashlab import Fault, refused, succeeded, tree_bytes

MAX_GROWTH_MB = 256


@pytest.fixture(scope="module")
def half_done(tmp_path_factory, lab, precompute_args) -> Path:
    """Worker 0 of 2 has run: its shards and the corpus's one token block are written."""
    out = tmp_path_factory.mktemp("half") / "cache"
    succeeded(lab.run(precompute_args(out, "topk", "--num-workers", "2", "--worker-index", "0")))
    return out


def block(cache: Path, suffix: str) -> Path:
    (path,) = (cache / "tokens").glob(f"*/block-00000000{suffix}")
    return path


def resummarize(cache: Path, **fields) -> None:
    path = block(cache, ".json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def huge_declared_payload(cache: Path) -> str:
    tokens = 1 << 27  # 512 MiB of ids, on a file of a few hundred bytes
    resummarize(
        cache,
        tokens=tokens,
        tokenized=1,
        skipped_empty=0,
        documents=1,
        bytes=4 + 4 * tokens + tokens // 8,
    )
    return "does not match its summary's size and sha256"


def sparse_summary(cache: Path) -> str:
    with open(block(cache, ".json"), "r+b") as fh:
        fh.truncate(1 << 30)
    return "more than the 4,096 allowed"


def payload_fifo(cache: Path) -> str:
    path = block(cache, ".bin")
    path.unlink()
    os.mkfifo(path)
    return "is not a regular file"


def summary_dev_zero(cache: Path) -> str:
    path = block(cache, ".json")
    path.unlink()
    path.symlink_to("/dev/zero")
    return "is not a regular file"


def nested_summary(cache: Path) -> str:
    block(cache, ".json").write_text("[" * 4000)
    return "its summary is not JSON"


def negative_count(cache: Path) -> str:
    resummarize(cache, stream_tokens=-5)
    return "a count in its summary is not a size"


def ids_outside_the_vocabulary(cache: Path) -> str:
    """A payload whose size, hash and counts agree with its summary, holding id 2**31."""
    path = block(cache, ".bin")
    summary = json.loads(block(cache, ".json").read_text())
    data = bytearray(path.read_bytes())
    at = 4 * summary["tokenized"]  # the first id (not a document's last: counts stay equal)
    data[at : at + 4] = np.uint32(1 << 31).tobytes()
    path.write_bytes(bytes(data))
    resummarize(cache, sha256=hashlib.sha256(bytes(data)).hexdigest())
    return "holds token ids outside [0, 300)"


def lengths_past_the_ids(cache: Path) -> str:
    path = block(cache, ".bin")
    data = bytearray(path.read_bytes())
    data[0:4] = np.uint32(1 << 30).tobytes()
    path.write_bytes(bytes(data))
    resummarize(cache, sha256=hashlib.sha256(bytes(data)).hexdigest())
    return "its document lengths do not add up to its tokens"


def summary_of_another_store(cache: Path) -> str:
    resummarize(cache, key="0" * 16)
    return "its summary names another store or block"


CASES = [
    huge_declared_payload,
    sparse_summary,
    payload_fifo,
    summary_dev_zero,
    nested_summary,
    negative_count,
    ids_outside_the_vocabulary,
    lengths_past_the_ids,
    summary_of_another_store,
]


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_a_damaged_token_block_is_refused_in_one_line(
    tmp_path, lab, precompute_args, half_done, damage
):
    cache = tmp_path / "cache"
    shutil.copytree(half_done, cache, ignore=shutil.ignore_patterns(".locks"))
    needle = damage(cache)
    args = precompute_args(cache, "topk", "--num-workers", "2", "--worker-index", "1")
    outcome = lab.run(args, timeout=60)
    line = refused(outcome, "token block 0", needle, "delete", "and rerun")
    assert outcome.rss_growth_mb <= MAX_GROWTH_MB, (outcome.rss_growth_mb, line)


@pytest.mark.parametrize("when", ["torn", "after"])
def test_a_worker_killed_while_publishing_a_block_resumes(
    tmp_path, lab, precompute_args, reference_caches, when
):
    """Killed with a block's payload half written (torn) or written without its summary
    (after): the rerun makes the block again, and the two workers end with the one-process
    cache."""
    out = tmp_path / "cache"
    worker = [
        precompute_args(out, "topk", "--num-workers", "2", "--worker-index", str(w))
        for w in range(2)
    ]
    killed = lab.run(worker[0], Fault("publish:tokens/", when=when, keep=0.5))
    assert killed.killed, killed.output[-2000:]
    assert not list((out / "tokens").glob("*/block-*.json"))  # no summary: the block is not made
    succeeded(lab.run(worker[0]))
    succeeded(lab.run(worker[1]))
    assert not (out / "tokens").exists()  # the worker that completed the cache removed them
    want = tree_bytes(reference_caches["topk"])
    got = tree_bytes(out, skip=(".locks", "parts"))
    assert got == want
