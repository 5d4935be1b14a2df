"""``train --dry-run`` on hostile inputs: a manifest that points outside its cache and a
student whose weights are a pickle are met the way a run meets them (refused in one line)
or not opened at all (a dry run reads no weights); nothing runs, memory stays small.

Each command runs in a forked child (``crashlab``); peak resident memory above the fork is
measured (MAX_GROWTH_MB, as tests/faults/test_hostile.py).
"""

from __future__ import annotations

import pickle

from crashlab import refused
from test_hostile import MAX_GROWTH_MB, Trap, dotdot_path


def test_a_manifest_pointing_outside_its_cache_is_refused(lab, copy_cache, train_args, tmp_path):
    cache = copy_cache("topk")
    message = dotdot_path(cache, tmp_path / "executed")
    outcome = lab.run([*train_args(cache, tmp_path / "run"), "--dry-run"], timeout=60)
    print(refused(outcome, message), f"rss growth: {outcome.rss_growth_mb:.0f} MB")
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb
    assert not (tmp_path / "run").exists()


def test_a_pickled_student_is_never_unpickled(
    lab, copy_cache, train_args, sharp_teacher_dir, tmp_path
):
    """pytorch_model.bin is a pickle that would run a command: the dry run reads the
    student's config and tokenizer only, and passes; the marker never appears."""
    import shutil

    student, marker = tmp_path / "student", tmp_path / "executed"
    shutil.copytree(sharp_teacher_dir, student)
    (student / "model.safetensors").unlink()
    (student / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    args = train_args(
        copy_cache("topk"), tmp_path / "run", student=student, student_config=None, tokenizer=None
    )
    outcome = lab.run([*args, "--dry-run"], timeout=60)
    assert outcome.code == 0, outcome.output[-3000:]
    assert "all checks passed" in outcome.output
    assert not marker.exists(), "the student's pickle was executed"
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb
    print(f"rss growth: {outcome.rss_growth_mb:.0f} MB")
