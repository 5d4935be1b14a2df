"""Fixtures of the fault campaign: a warm forkserver that runs commands (``crashlab.Lab``),
the commands' arguments at toy sizes, and uninterrupted reference caches and runs.

Caches: the fixture corpus at 32 tokens per sequence, 8 sequences per shard = 55 sequences in
7 shards (the last one short), teacher batches of 4 sequences = 14 forward passes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from crashlab import Lab, succeeded

MODES = {"topk": ["--top-k", "8"], "sampled": ["--samples", "16"]}


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="session")
def precompute_args(sharp_teacher_dir, text_corpus):
    """``logitcache precompute`` arguments writing ``out`` in ``mode`` (see MODES)."""

    def make(out: Path, mode: str = "topk", *extra: str) -> list[str]:
        return [
            "precompute",
            "--teacher",
            sharp_teacher_dir,
            "--data",
            text_corpus,
            "--out",
            out,
            "--seq-len",
            "32",
            "--shard-sequences",
            "8",
            "--batch-tokens",
            "128",
            "--device",
            "cpu",
            "--quiet",
            *MODES[mode],
            *extra,
        ]

    return make


@pytest.fixture(scope="session")
def reference_caches(tmp_path_factory, lab, precompute_args) -> dict[str, Path]:
    """One uninterrupted precompute per mode: what every interrupted run must end as."""
    root = tmp_path_factory.mktemp("reference")
    for mode in MODES:
        succeeded(lab.run(precompute_args(root / mode, mode)))
    return {mode: root / mode for mode in MODES}


@pytest.fixture
def copy_cache(reference_caches, tmp_path):
    """A private copy of a reference cache to damage."""

    def make(mode: str = "topk", name: str = "cache") -> Path:
        out = tmp_path / name
        shutil.copytree(reference_caches[mode], out, ignore=shutil.ignore_patterns(".locks"))
        return out

    return make


@pytest.fixture(scope="session")
def train_args(student_config, sharp_teacher_dir):
    """``logitcache train`` arguments for a from-scratch student; keywords override flags."""

    def make(cache: Path, out: Path, **flags) -> list[str]:
        settings = {
            "student_config": student_config,
            "tokenizer": sharp_teacher_dir,
            "batch_size": 4,
            "lr": 1e-2,
            "eval_fraction": 0.2,
            "loader_workers": 0,
            "steps": 12,
            **flags,
        }
        args = ["train", "--cache", cache, "--out", out, "--quiet"]
        for key, value in settings.items():
            if value is None or value is False:
                continue
            args.append("--" + key.replace("_", "-"))
            if value is not True:
                args.append(value)
        return args

    return make
