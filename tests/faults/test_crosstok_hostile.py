"""Hostile tokenizers met by ``train --cross-tokenizer``: a cache whose stored tokenizer
spells a token in 100 KB (a teacher made to ship it: the manifest vouches for it), or a
student tokenizer that does: one line, exit 1, bounded memory. And the prefix mapping over a
vocabulary of 1 KB tokens stays bounded by the student's longest token."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from crashlab import refused, succeeded

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from crosstok_tokenizers import build_sentencepiece_tokenizer

MAX_GROWTH_MB = 256
HUGE = 100_000  # bytes of the planted token (the limit is 1,024)


def plant_huge_token(directory: Path) -> None:
    """The last merge's token renamed to HUGE bytes of "x" (and the merge dropped, so the
    tokenizer still loads and never emits it): the vocabulary keeps its size."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    data["model"]["merges"] = [m for m in data["model"]["merges"] if "".join(m) != last]
    vocab["x" * HUGE] = vocab.pop(last)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def sp_student(tmp_path_factory, student_config) -> Path:
    root = tmp_path_factory.mktemp("sp-student")
    tokenizer = build_sentencepiece_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    config = {**json.loads(student_config.read_text()), "vocab_size": len(tokenizer)}
    (root / "student.json").write_text(json.dumps(config))
    return root


def cross_train(train_args, cache: Path, out: Path, student: Path, tokenizer: Path) -> list:
    return train_args(cache, out, student_config=student / "student.json", tokenizer=tokenizer,
                      cross_tokenizer="prefix", steps=2)  # fmt: skip


def test_a_cache_tokenizer_with_a_huge_token(
    lab, tmp_path, sharp_teacher_dir, text_corpus, train_args, sp_student
):
    teacher = tmp_path / "teacher"
    shutil.copytree(sharp_teacher_dir, teacher)
    plant_huge_token(teacher)
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    succeeded(lab.run([
        "precompute", "--teacher", teacher, "--data", text_corpus, "--out", cache,
        "--seq-len", "32", "--shard-sequences", "8", "--device", "cpu", "--quiet", "--top-k", "4",
    ]))  # fmt: skip
    t1 = time.perf_counter()
    outcome = lab.run(cross_train(train_args, cache, tmp_path / "run", sp_student,
                                  sp_student / "tokenizer"), timeout=120)  # fmt: skip
    line = refused(outcome, "the cache's tokenizer", f"{HUGE:,} bytes long", "more than 1024")
    print(f"\n{line} | peak RSS growth {outcome.rss_growth_mb:.0f} MB")
    print(f"precompute {t1 - t0:.1f} s, train {time.perf_counter() - t1:.1f} s")
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb


def test_a_student_tokenizer_with_a_huge_token(
    lab, tmp_path, reference_caches, train_args, sp_student
):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(sp_student / "tokenizer", tokenizer)
    plant_huge_token(tokenizer)
    outcome = lab.run(cross_train(train_args, reference_caches["topk"], tmp_path / "run",
                                  sp_student, tokenizer), timeout=120)  # fmt: skip
    line = refused(outcome, "the student's tokenizer", f"{HUGE:,} bytes long")
    print(f"\n{line} | peak RSS growth {outcome.rss_growth_mb:.0f} MB")
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb


def test_prefix_mapping_of_long_teacher_tokens_is_bounded_by_the_student():
    """20,000 teacher tokens of ~1 KB of "a" against a student with "a" * 1..64: each walk
    stops after the student's longest token (64 lookups, not 1,000)."""
    from logitcache.train.crosstok import map_ids
    from logitcache.train.token_bytes import TokenBytes

    pieces = tuple(b"a" * (1000 + i % 24) + i.to_bytes(2, "big") for i in range(20_000))
    teacher = TokenBytes(pieces, np.zeros(len(pieces), dtype=bool))
    student = TokenBytes(tuple(b"a" * n for n in range(1, 65)), np.zeros(64, dtype=bool))
    start = time.perf_counter()
    mapped, exact = map_ids(teacher, student, "prefix", {})
    assert time.perf_counter() - start < 10
    assert (mapped == 63).all() and not exact.any()  # "a" * 64, the longest
