"""benchmarks/quality.py: every kind of student of the study trains, on tiny sizes."""

from pathlib import Path

import pytest


def test_quality_study_plumbing(tmp_path, tiny_teacher_dir, text_corpus):
    """Every kind of student of the study trains through the real commands, on tiny sizes."""
    from dataclasses import replace

    from quality import _gap, _Study, cache_variants, format_rows

    from logitcache import toy
    from logitcache.core.progress import Reporter
    from logitcache.demo import QUICK, precompute_config, run_cache, write_student_config

    budget = replace(
        QUICK,
        seq_len=32,
        slice_tokens=300,
        heldout_tokens=200,
        student_steps=2,
        student_batch=2,
        eval_every=1,
        student_hidden=16,
        student_heads=2,
        student_intermediate=32,
    )
    docs = [(f"d{i}", line) for i, line in enumerate(Path(text_corpus).read_text().splitlines())]
    slice_file = toy.write_jsonl(docs[:16], tmp_path / "slice.jsonl")
    held_file = toy.write_jsonl(docs[16:], tmp_path / "held.jsonl")
    held = tmp_path / "held-cache"
    run_cache(
        precompute_config(Path(tiny_teacher_dir), held_file, held, budget, 200, {"top_k": 16}),
        Reporter(enabled=False),
    )
    config = write_student_config(budget, Path(tiny_teacher_dir), tmp_path)
    study = _Study(
        "tiny",
        budget,
        tmp_path,
        Path(tiny_teacher_dir),
        slice_file,
        held,
        config,
        Reporter(enabled=False),
    )
    variants = [v for v in cache_variants(quick=True) if v[0] in ("top-8 bucket", "sampled N=16")]
    rows = study.regime(variants, budget.slice_tokens, "slice")
    names = [r.student for r in rows]
    assert names == ["CE only", "online full KD", "top-8 bucket", "sampled N=16"]
    assert rows[0].gap_closed == 0.0 or rows[0].gap_closed is None
    assert all(r.eval_ce > 0 and r.eval_kl >= 0 for r in rows)
    assert rows[2].bytes_per_token > 0 and rows[3].bytes_per_token > 0
    table = format_rows(rows)
    assert "sampled N=16" in table and "B/token" in table
    _gap(rows, rows[0], rows[1])
    assert rows[1].gap_closed == pytest.approx(1.0) or rows[1].gap_closed is None
