"""``--out`` holds one run: another run there is refused unless ``--resume`` or
``--overwrite``; ``--resume`` compares paths by what they name, not as typed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from logitcache.train.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def args(topk_cache, train_args, student_config):
    return lambda out, **flags: train_args(
        topk_cache, out, **{"student_config": student_config, **flags}
    )


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    return line


def steps_kept(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_another_run_in_out_is_refused_and_left_as_it_was(cli, args, tmp_path):
    """The sequence of issue #14: before, the second run left step-3 and step-6 beside a
    ``latest`` naming the pruned step-2, and replaced model/, metrics.jsonl and the config."""
    out = tmp_path / "run"
    assert cli(args(out, steps=6, save_every=3)).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    line = one_error(cli(args(out, steps=2, save_every=1)))
    assert line == (
        f"error: --out {out} holds another run (train_config.json, metrics.jsonl, checkpoints, "
        "model): add --resume to continue it, --overwrite to replace it, or choose another --out"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_the_run_and_nothing_else(cli, args, metrics, tmp_path):
    out = tmp_path / "run"
    assert cli(args(out, steps=6, save_every=3)).exit_code == 0
    (out / "notes.txt").write_text("mine")

    result = cli(args(out, steps=2, save_every=1, overwrite=True))
    assert result.exit_code == 0, result.output
    assert steps_kept(out) == ["step-0000001", "step-0000002"]
    assert latest_checkpoint(str(out)).name == "step-0000002"
    assert max(row["step"] for row in metrics(out)) == 2
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 2
    assert saved["overwrite"] is False  # read back with --config, it replaces nothing unasked
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(cli, args, tmp_path):
    line = one_error(cli(args(tmp_path / "run", steps=2, resume=True, overwrite=True)))
    assert line == "error: give --resume or --overwrite, not both"


def test_resume_beside_a_missing_latest_checkpoint_takes_the_newest_complete_one(
    cli, args, tmp_path
):
    """What the sequence above left before the fix (a ``latest`` naming a pruned step beside
    others), and what deleting the newest step leaves: --resume says in one line what it
    skipped and continues from the newest complete checkpoint, which ``latest`` then names."""
    out = tmp_path / "run"
    assert cli(args(out, steps=6, save_every=3)).exit_code == 0
    (out / "checkpoints" / "latest").write_text("step-0000002")

    result = cli(args(out, steps=6, save_every=3, resume=True))
    assert result.exit_code == 0, result.output
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")] == [
        "warning: --resume: skipped step-0000002 (named by checkpoints/latest: missing); "
        "resuming from step-0000006"
    ]
    assert latest_checkpoint(str(out)).name == "step-0000006"


def test_resume_with_more_steps_keeps_the_last_learning_rate(cli, args, metrics, tmp_path):
    """Issue #26: a finished run of 4 steps resumed with --steps 8 went on along a cosine of
    8 steps (the rate jumped up from its end); now steps 5-8 keep step 4's rate, and one
    line says so. Fewer steps than the schedule's is refused."""
    out = tmp_path / "run"
    assert cli(args(out, steps=4, save_every=2)).exit_code == 0
    result = cli(args(out, steps=8, save_every=2, resume=True))
    assert result.exit_code == 0, result.output
    rates = {row["step"]: row["lr"] for row in metrics(out) if "lr" in row}
    assert sorted(rates) == list(range(1, 9))
    assert rates[1] > rates[2] > rates[3] > rates[4] > 0  # the cosine of 4 steps, decaying
    assert all(rates[step] == rates[4] for step in range(5, 9))
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert line == (
        "warning: --resume: this run trains to step 8, past the 4 steps of the schedule it "
        f"started with: steps after 4 keep its last learning rate ({rates[4]:.3g})"
    )

    line = one_error(cli(args(out, steps=6, save_every=2, resume=True)))
    assert line == (
        f"error: cannot resume {out}/checkpoints/step-0000008/state.json: the run is at step 8 "
        "of 8 and this run stops at step 6; give --steps 8 or more"
    )


def test_resume_takes_the_student_config_by_content_not_by_path(
    cli, args, student_config, tmp_path, monkeypatch
):
    """Relative then absolute --student-config is one run (refused before); the same file
    copied elsewhere too; an edited one is not."""
    out = tmp_path / "run"
    monkeypatch.chdir(student_config.parent)
    first = args(out, steps=2)
    first[first.index("--student-config") + 1] = student_config.name
    assert cli(first).exit_code == 0

    monkeypatch.chdir(tmp_path)
    result = cli(args(out, steps=4, resume=True))  # the absolute path
    assert result.exit_code == 0, result.output
    copy = tmp_path / "copy.json"
    shutil.copy(student_config, copy)
    assert cli(args(out, steps=5, resume=True, student_config=copy)).exit_code == 0

    copy.write_text(json.dumps({**json.loads(copy.read_text()), "num_hidden_layers": 2}))
    line = one_error(cli(args(out, steps=6, resume=True, student_config=copy)))
    assert line.endswith(
        f"settings differ from the run that wrote it: student_config ({copy} is not the file "
        "the run started with: its content differs)"
    )


def test_resume_of_a_checkpoint_holding_paths_as_typed(cli, args, student_config, tmp_path):
    """Checkpoints written before paths were resolved hold them as typed: one naming the
    same file by another spelling still resumes."""
    out = tmp_path / "run"
    assert cli(args(out, steps=2)).exit_code == 0
    state_file = out / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["student_config"] = str(student_config.parent / "." / student_config.name)
    state_file.write_text(json.dumps(state))

    result = cli(args(out, steps=3, resume=True))
    assert result.exit_code == 0, result.output
    assert latest_checkpoint(str(out)).name == "step-0000003"
