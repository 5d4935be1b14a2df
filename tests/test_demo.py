"""The demo end to end (--quick) and the command reference, docs/cli.md."""

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


def test_docs_cli_md_is_the_current_command_reference():
    """docs/cli.md is generated from the click commands, and the README links to it."""
    from logitcache.cli import render_reference

    root = Path(__file__).parent.parent
    assert (root / "docs" / "cli.md").read_text() == render_reference(), (
        "docs/cli.md is stale: rewrite it with `logitcache reference > docs/cli.md`"
    )
    assert "(docs/cli.md)" in (root / "README.md").read_text()
