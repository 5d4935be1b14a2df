"""Plumbing of ``logitcache bench precompute`` and ``bench train`` on tiny models.

Each benchmark runs end to end and fills the fields it promises. Nothing here checks a
speed: the numbers are only required to exist and be finite.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from logitcache.bench.precompute import (
    format_precompute,
    precompute_as_dict,
    run_precompute_bench,
    synthetic_corpus,
    synthetic_tokenizer,
    synthetic_words,
)
from logitcache.bench.train import (
    VARIANTS,
    default_student_config,
    format_train,
    run_train_bench,
    train_as_dict,
)
from logitcache.cli import main
from logitcache.core.errors import LogitcacheError
from logitcache.toy import ToyModelSpec

TINY = ToyModelSpec(
    hidden=32,
    layers=2,
    heads=2,
    intermediate=64,
    max_positions=None,
    vocab_size=300,
    tie_embeddings=False,
    init_std=0.1,
)


def _finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_synthetic_tokenizer_and_corpus(tmp_path):
    tokenizer = synthetic_tokenizer(300)
    words = synthetic_words(297)
    assert len(tokenizer) == 300 and len(set(words)) == 297
    corpus = synthetic_corpus(tmp_path / "c.txt", words, 1000)
    ids = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) == 1000  # one token per word, none unknown
    assert tokenizer.unk_token_id not in ids


def test_precompute_bench_synthetic_teacher(tmp_path):
    r = run_precompute_bench(
        shape=TINY, seq_len=32, sequences=8, batch_tokens=64, top_k=8, workdir=str(tmp_path)
    )
    assert (r.tokens, r.sequences, r.shards, r.batches) == (256, 8, 4, 4)
    assert r.mode == "top-8" and r.vocab == 300 and r.teacher.startswith("synthetic")
    assert len(r.bare_forward_s) == 2
    assert _finite_positive(*r.bare_forward_s, r.bare_tokens_per_s, r.pipeline_s, r.ratio)
    assert _finite_positive(r.pipeline_tokens_per_s, r.bytes_per_token, r.teacher_busy_s)
    assert 0 <= r.writer_wait_share <= 1 and r.drain_s >= 0 and r.reader_wait_s >= 0
    assert "ratio b/a" in format_precompute(r)
    json.dumps(precompute_as_dict(r))
    assert list(tmp_path.iterdir()) == []  # the temporary cache and teacher are gone


def test_precompute_bench_given_teacher_sampled(tiny_teacher_dir, tmp_path):
    r = run_precompute_bench(
        teacher=str(tiny_teacher_dir),
        seq_len=32,
        sequences=4,
        batch_tokens=64,
        samples=4,
        workdir=str(tmp_path),
    )
    assert r.teacher == str(tiny_teacher_dir) and r.mode == "sampled N=4"
    assert r.tokens == 128 and _finite_positive(r.pipeline_tokens_per_s, r.bytes_per_token)


def test_cli_bench_precompute_json(tiny_teacher_dir):
    args = [
        "bench",
        "precompute",
        "--teacher",
        str(tiny_teacher_dir),
        "--seq-len",
        "32",
        "--sequences",
        "4",
        "--batch-tokens",
        "64",
        "--top-k",
        "4",
        "--threads",
        "0",
        "--json",
    ]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["tokens"] == 128 and data["mode"] == "top-4" and data["ratio"] > 0


def test_cli_bench_precompute_refuses_both_modes():
    out = CliRunner().invoke(main, ["bench", "precompute", "--top-k", "4", "--samples", "4"])
    assert out.exit_code == 1 and "one of --top-k" in out.output


def test_train_bench_in_process(tmp_path):
    r = run_train_bench(
        student_config=default_student_config(TINY),
        teacher_width=2,
        steps=2,
        warmup=1,
        batch_size=2,
        seq_len=32,
        top_k=8,
        isolate=False,
        workdir=str(tmp_path),
    )
    assert [v.variant for v in r.variants] == list(VARIANTS)
    for v in r.variants:
        assert len(v.step_s_all) == 2 and v.tokens_per_step == 64
        assert _finite_positive(v.step_s, v.tokens_per_s) and math.isfinite(v.final_loss)
        assert v.step_cpu_s >= 0
        assert v.peak_bytes is None  # CPU, in-process: not measurable
    assert r.teacher_params > r.student_params
    assert _finite_positive(r.time_b_over_a, r.time_c_over_b, r.cache_bytes_per_token)
    assert r.memory_b_over_a is None and "not measured" in r.memory_method
    assert "(c) online-kd" in format_train(r) and "(d) hf-trainer" in format_train(r)
    assert _finite_positive(r.time_d_over_b)
    json.dumps(train_as_dict(r))
    assert list(tmp_path.iterdir()) == []


def test_train_bench_refuses_bad_student_config(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(LogitcacheError, match="model_type"):
        run_train_bench(student_config=str(path))
    with pytest.raises(LogitcacheError, match="does not exist"):
        run_train_bench(student_config=str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_cli_bench_train_fresh_processes(tmp_path):
    """The CLI path: each variant in its own interpreter, with a CPU peak memory."""
    config = tmp_path / "student.json"
    config.write_text(json.dumps(default_student_config(TINY)))
    args = [
        "bench",
        "train",
        "--student-config",
        str(config),
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--top-k",
        "8",
        "--teacher-width",
        "2",
        "--threads",
        "0",
        "--json",
    ]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [v["variant"] for v in data["variants"]] == list(VARIANTS)
    for v in data["variants"]:
        assert isinstance(v["peak_bytes"], int) and v["peak_bytes"] >= 0
        assert v["step_s"] > 0 and v["tokens_per_step"] == 64
