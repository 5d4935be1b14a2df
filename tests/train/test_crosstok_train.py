"""``logitcache train --cross-tokenizer``: a student of another tokenizer trains from a
cache end to end, resumes exactly, and reports bits per byte; without the flag the same
student is refused as before."""

from __future__ import annotations

import json

import pytest
from crosstok_tokenizers import build_sentencepiece_tokenizer


@pytest.fixture(scope="module")
def sp_student(tmp_path_factory, student_config):
    """A from-scratch student config sized to the SentencePiece-style tokenizer, and that
    tokenizer saved to a directory."""
    tokenizer = build_sentencepiece_tokenizer()
    root = tmp_path_factory.mktemp("sp-student")
    tokenizer.save_pretrained(root / "tokenizer")
    config = {**json.loads(student_config.read_text()), "vocab_size": len(tokenizer)}
    config["max_position_embeddings"] = 128
    (root / "student.json").write_text(json.dumps(config))
    return root


def cross_args(train_args, cache, out, student, **flags):
    flags = {"cross_tokenizer": "exact", "steps": 4, **flags}
    return train_args(
        cache,
        out,
        student_config=student / "student.json",
        tokenizer=student / "tokenizer",
        **flags,
    )


@pytest.mark.parametrize("method", ["exact", "prefix"])
def test_trains_and_reports_bits_per_byte(
    cli, train_args, metrics, topk_cache, sp_student, tmp_path, method
):
    out = tmp_path / "run"
    result = cli(
        cross_args(
            train_args, topk_cache, out, sp_student, cross_tokenizer=method, student_seq_len=48
        )
    )
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    evals = [r for r in rows if "eval_ce" in r]
    assert evals and evals[-1]["eval_bits_per_byte"] > 0 and evals[-1]["eval_bytes"] > 0
    assert "eval_kl" in evals[-1]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["cross_tokenizer"] == method and saved["fingerprint"]["cross_tokenizer"] == method
