"""Fixtures of the trainer tests: a sharp tiny teacher, two small caches built once per
session (top-k and sampled), a from-scratch student config, and a CLI runner.

The caches hold 55 sequences of 32 tokens in 7 shards of 8 (the last one short), so batch
sizes rarely divide the count and every epoch ends on a partial batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

SEQ_LEN = 32
SHARD_SEQUENCES = 8
TOP_K = 8
SAMPLES = 16
N_SEQUENCES = 55  # what the fixture corpus packs into at SEQ_LEN (checked in the fixture)
# A random-init head gives logits of std ~0.1 (32 hidden x 0.02 init): a near-uniform
# teacher whose KL to any student is ~1e-4 nats. x30 gives std ~3, so the held-out KL of a
# fresh student starts near 2.5 nats and training visibly lowers it.
HEAD_SCALE = 30.0


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models are tiny; a second intra-op thread on 2 shared cores only slows them 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tiny_teacher_dir) -> Path:
    """``tiny_teacher_dir`` with its LM head scaled so its distributions are peaked."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharp-teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(path)
    for file in Path(tiny_teacher_dir).iterdir():  # the tokenizer's files, unchanged
        if not (path / file.name).exists():
            shutil.copy(file, path / file.name)
    return path


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
def student_config(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 1-layer Llama with the tokenizer's vocabulary, as a transformers config JSON."""
    path = tmp_path_factory.mktemp("student") / "student.json"
    config = {
        "model_type": "llama",
        "vocab_size": len(tiny_tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def train_args():
    """``logitcache train`` arguments: fast defaults overridden by keywords (True: a flag)."""

    def make(cache: Path, out: Path, **flags) -> list[str]:
        settings = {"batch_size": 4, "lr": 1e-2, "eval_fraction": 0.2, "num_workers": 0, **flags}
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
