"""Fixtures of the trainer tests: a sharp tiny teacher, small caches built once per session
(top-k, sampled, sampled with log-probs), a from-scratch student config, and a CLI runner.

The caches hold 55 sequences of 32 tokens in 7 shards of 8 (the last one short), so batch
sizes rarely divide the count and every epoch ends on a partial batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SEQ_LEN = 32
SHARD_SEQUENCES = 8
TOP_K = 8
SAMPLES = 16
N_SEQUENCES = 55  # what the fixture corpus packs into at SEQ_LEN (checked in the fixture)


@pytest.fixture(scope="session")
def teacher_dir(sharp_teacher_dir) -> Path:
    """The sharp teacher (see tests/conftest.py): held-out KL visibly falls in training."""
    return sharp_teacher_dir


def _precompute(teacher: Path, corpus: Path, out: Path, **mode) -> Path:
    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute

    config = PrecomputeConfig(
        teacher=str(teacher),
        out=str(out),
        corpus=CorpusSpec(data=(str(corpus),), seq_len=SEQ_LEN),
        shard_sequences=SHARD_SEQUENCES,
        device="cpu",
        **mode,
    )
    manifest = run_precompute(config).manifest
    assert manifest is not None and manifest.complete
    assert manifest.n_sequences == N_SEQUENCES
    return out


@pytest.fixture(scope="session")
def topk_cache(tmp_path_factory, teacher_dir, text_corpus) -> Path:
    return _precompute(teacher_dir, text_corpus, tmp_path_factory.mktemp("c") / "topk", top_k=TOP_K)


@pytest.fixture(scope="session")
def sampled_cache(tmp_path_factory, teacher_dir, text_corpus) -> Path:
    out = tmp_path_factory.mktemp("c") / "sampled"
    return _precompute(teacher_dir, text_corpus, out, samples=SAMPLES)


@pytest.fixture(scope="session")
def sampled_logprobs_cache(tmp_path_factory, teacher_dir, text_corpus) -> Path:
    """Sampled, with the drawn ids' log-probs stored (the default lossy codec)."""
    out = tmp_path_factory.mktemp("c") / "sampled-lp"
    return _precompute(teacher_dir, text_corpus, out, samples=SAMPLES, sampled_logprobs=True)


@pytest.fixture(scope="session")
def train_args():
    """``logitcache train`` arguments: fast defaults overridden by keywords (True: a flag)."""

    def make(cache: Path, out: Path, **flags) -> list[str]:
        settings = {"batch_size": 4, "lr": 1e-2, "eval_fraction": 0.2, "loader_workers": 0, **flags}
        args = ["train", "--cache", str(cache), "--out", str(out), "--quiet"]
        for key, value in settings.items():
            if value is None or value is False:
                continue
            args.append("--" + key.replace("_", "-"))
            if value is not True:
                args.append(str(value))
        return args

    return make


@pytest.fixture(scope="session")
def cli():
    """Runs ``logitcache ARGS`` in-process; returns click's Result (stdout, stderr, exit_code)."""
    from click.testing import CliRunner

    from logitcache.cli import main

    return lambda args: CliRunner().invoke(main, [str(a) for a in args])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def metrics():
    """Reads OUT/metrics.jsonl as a list of dicts."""
    return read_metrics


@pytest.fixture(scope="session")
def flags(train_args, topk_cache, teacher_dir, student_config):
    """``logitcache train`` arguments for ``nproc`` processes with the same global batch
    (tests/train/elastic.py)."""

    def make(out: Path, nproc: int, steps: int, **extra) -> list[str]:
        return train_args(
            topk_cache,
            out,
            student_config=student_config,
            tokenizer=teacher_dir,
            steps=steps,
            batch_size=2,
            grad_accum=2 // nproc,
            eval_fraction=0.1,
            schedule="constant",
            eval_every=4,
            save_every=4,
            **extra,
        )

    return make


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cli, flags) -> Path:
    """One process, no FSDP, grad-accum 2, 16 steps uninterrupted (tests copy, never edit)."""
    from elastic import STEPS

    out = tmp_path_factory.mktemp("reference")
    result = cli(flags(out, nproc=1, steps=STEPS))
    assert result.exit_code == 0, result.output
    return out
