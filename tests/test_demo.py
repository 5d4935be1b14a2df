"""The demo end to end (--quick) and the quality study's plumbing on tiny models."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The README's main job, small: artifacts exist, load, and the table is printed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--quick", "--quiet", "--out", str(out), "--home", str(tmp_path / "home")]
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "student, distilled (cache)" in result.output
    assert "logitcache precompute --teacher" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_tokens"] == summary["budget"]["slice_tokens"]
    trains = [c for c in summary["commands"] if c.startswith("logitcache train")]
    assert len(trains) == 2 and not any("--tokenizer" in c for c in trains)  # the cache's own
    for name in ("ce-only", "distilled"):
        model_dir = out / f"student-{name}" / "model"
        AutoModelForCausalLM.from_pretrained(model_dir)
        AutoTokenizer.from_pretrained(model_dir)
        assert summary["students"][name]["eval_ce"] > 0
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reuses the teacher (no pretraining message) and still succeeds.
    again = CliRunner().invoke(
        main, ["demo", "--quick", "--out", str(out), "--home", str(tmp_path / "home")]
    )
    assert again.exit_code == 0
    assert "reusing the teacher" in again.output


def test_quality_study_plumbing(tmp_path, tiny_teacher_dir, text_corpus):
    """Every kind of student of the study trains through the real commands, on tiny sizes."""
    from dataclasses import replace

    from logitcache import toy
    from logitcache.bench.quality import _gap, _Study, cache_variants, format_rows
    from logitcache.demo import QUICK, precompute_config, run_cache, write_student_config
    from logitcache.progress import Reporter

    budget = replace(QUICK, seq_len=32, slice_tokens=300, heldout_tokens=200, student_steps=2,
                     student_batch=2, eval_every=1, student_hidden=16, student_heads=2,
                     student_intermediate=32)  # fmt: skip
    docs = [(f"d{i}", line) for i, line in enumerate(Path(text_corpus).read_text().splitlines())]
    slice_file = toy.write_jsonl(docs[:16], tmp_path / "slice.jsonl")
    held_file = toy.write_jsonl(docs[16:], tmp_path / "held.jsonl")
    held = tmp_path / "held-cache"
    run_cache(precompute_config(Path(tiny_teacher_dir), held_file, held, budget, 200,
                                {"top_k": 16}), Reporter(enabled=False))  # fmt: skip
    config = write_student_config(budget, Path(tiny_teacher_dir), tmp_path)
    study = _Study("tiny", budget, tmp_path, Path(tiny_teacher_dir), slice_file, held, config,
                   Reporter(enabled=False))  # fmt: skip
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


def test_readme_embeds_the_current_command_reference():
    """The README's command reference is generated from the click commands."""
    from logitcache.cli import render_reference

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert render_reference() in readme, (
        "README.md's command reference is stale: replace it with `logitcache reference`"
    )
