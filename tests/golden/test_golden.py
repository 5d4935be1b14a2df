"""Golden outputs: caches and a training run that must stay byte-identical across refactors.

The teacher pass writes eight caches (top-k and sampled, format 1 and 2, Arrow and Zarr)
with the tiny sharp teacher of tests/conftest.py, and a student trains 6 steps from one of
them; the sha256 of every file the cache holds, the losses and the final weights are
compared with ``golden.json``. A restructuring that changes none of the program's behaviour
leaves them all equal; a deliberate format or training change rewrites the file on purpose:

    LOGITCACHE_WRITE_GOLDEN=1 python -m pytest tests/golden -q

The teacher, corpus and caches live at fixed paths (a cache records its teacher's path), so
the hashes do not depend on pytest's temporary directories. They depend on the versions of
torch, zstd and pyarrow that wrote them: golden.json records those, and the test says so
when they differ rather than reporting a behaviour change.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden.json")
ROOT = Path(tempfile.gettempdir()) / "logitcache-golden"
WRITE = os.environ.get("LOGITCACHE_WRITE_GOLDEN") == "1"

CACHES = {
    f"{mode}-f{version}-{container}": dict(
        {"top_k": 8} if mode == "topk" else {"samples": 16},
        format_version=version,
        container=container,
    )
    for mode in ("topk", "sampled")
    for version in (1, 2)
    for container in ("arrow", "zarr")
}


def _versions() -> dict[str, str]:
    import numcodecs
    import pyarrow
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "numcodecs": numcodecs.__version__,
    }


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


@pytest.fixture(scope="module")
def workdir(sharp_teacher_dir, text_corpus):
    # one fixed path for every run (a cache records its teacher's path): two test sessions at
    # once (a developer's and a helper's) take turns instead of deleting each other's files
    with open(Path(tempfile.gettempdir()) / "logitcache-golden.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOT.exists():
            shutil.rmtree(ROOT)
        shutil.copytree(sharp_teacher_dir, ROOT / "teacher")
        (ROOT / "corpus").mkdir()
        shutil.copy(text_corpus, ROOT / "corpus" / "corpus.txt")
        yield ROOT
        shutil.rmtree(ROOT, ignore_errors=True)


def _outputs(workdir: Path, student_config: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute
    from logitcache.train import TrainConfig, train

    out: dict = {"versions": _versions(), "caches": {}}
    for name, settings in CACHES.items():
        cache = workdir / "caches" / name
        config = PrecomputeConfig(
            teacher=str(workdir / "teacher"),
            out=str(cache),
            corpus=CorpusSpec(data=(str(workdir / "corpus" / "corpus.txt"),), seq_len=32),
            shard_sequences=8,
            device="cpu",
            **settings,
        )
        run_precompute(config)
        out["caches"][name] = _tree_hashes(cache)
    shutil.copy(student_config, workdir / "student.json")
    run = workdir / "run"
    config = TrainConfig(
        cache=str(workdir / "caches" / "topk-f2-arrow"),
        out=str(run),
        student_config=str(workdir / "student.json"),
        steps=6,
        batch_size=4,
        lr=1e-3,
        eval_every=3,
        save_every=3,
        device="cpu",
        seed=0,
        quiet=True,
    )
    train(config)
    out["metrics"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in out["metrics"]:
        row.pop("elapsed_s", None)
        row.pop("tokens_per_s", None)
    weights = load_file(run / "model" / "model.safetensors")
    out["weights"] = {
        k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in sorted(weights.items())
    }
    return out


def test_outputs_are_byte_identical_to_golden(workdir, student_config):
    got = _outputs(workdir, student_config)
    if WRITE:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    if got["versions"] != want["versions"]:
        pytest.skip(f"golden.json was written with {want['versions']}, this is {got['versions']}")
    for name in CACHES:
        assert got["caches"][name] == want["caches"][name], f"cache {name} changed"
    assert got["metrics"] == want["metrics"], "training metrics changed"
    assert got["weights"] == want["weights"], "trained weights changed"
