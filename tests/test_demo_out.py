"""The demo owns its --out: a demo of another size replaces the earlier one's outputs (the
issue #14 sequence, ``demo --quick`` then ``demo``), and foreign files are refused in one line,
before any work. Budgets are shrunk to toy sizes and the corpus is the test corpus."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache import demo, toy
from logitcache.cli import main

TINY = dict(
    vocab_size=300,
    teacher_hidden=16,
    teacher_layers=1,
    teacher_heads=2,
    teacher_intermediate=32,
    teacher_steps=2,
    teacher_batch=2,
    slice_tokens=300,
    heldout_tokens=150,
    student_hidden=16,
    student_layers=1,
    student_heads=2,
    student_intermediate=32,
    student_steps=2,
    student_batch=2,
    eval_every=1,
    teacher_text_bytes=5_000,
)


@pytest.fixture
def tiny_demo(monkeypatch, text_corpus):
    """QUICK and FULL at toy sizes (different sequence lengths, so their caches conflict),
    on the test corpus instead of the standard library."""
    lines = Path(text_corpus).read_text().splitlines()
    docs = [(f"doc{i:03d}.py", "\n".join(lines[i % 20 : i % 20 + 4])) for i in range(60)]
    monkeypatch.setattr(toy, "stdlib_documents", lambda: docs)
    monkeypatch.setattr(demo, "QUICK", replace(demo.QUICK, seq_len=32, **TINY))
    monkeypatch.setattr(demo, "FULL", replace(demo.FULL, seq_len=48, **TINY))


def test_quick_then_full_demo_in_one_directory(tiny_demo, tmp_path):
    out, home = tmp_path / "demo", tmp_path / "home"
    args = ["--out", str(out), "--home", str(home)]
    # the third run is the same size again: its students train again into their own --out
    runs = [CliRunner().invoke(main, ["demo", *mode, *args]) for mode in (["--quick"], [], [])]
    for result in runs:
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert "Traceback" not in result.output
    assert "replacing the outputs of the earlier quick demo" in runs[1].output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"]["name"] == "full"
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["spec"]["seq_len"] == 48 and manifest["complete"]


def test_demo_refuses_an_out_it_did_not_write(tiny_demo, tmp_path):
    out = tmp_path / "mine"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "precious.txt").write_text("not the demo's")
    result = CliRunner().invoke(
        main, ["demo", "--quick", "--out", str(out), "--home", str(tmp_path / "home")]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --out {out} already holds cache, not written by a demo: choose an empty or "
        "new --out"
    ]
    assert (out / "cache" / "precious.txt").exists()
    assert not (tmp_path / "home").exists()  # refused before any work
