"""``logitcache precompute --dry-run``: the pass's checks before its first forward (the
teacher's tokenizer and config, --top-k and --seq-len against them, the corpus's files,
--out), with the run's own one-line refusals; no weights read, nothing written."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from logitcache.cli import main


def invoke(*args: object):
    return CliRunner().invoke(main, ["precompute", *map(str, args)])


def refused(result) -> str:
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in result.output
    return line


def test_dry_run_refuses_what_the_pass_refuses(tiny_teacher_dir, text_corpus, tmp_path):
    base = {
        "--teacher": tiny_teacher_dir,
        "--data": text_corpus,
        "--top-k": 8,
        "--seq-len": 32,
        "--device": "cpu",
        "--quiet": None,
    }
    cases = [
        ({"--data": tmp_path / "missing.txt"}, "no such file or directory"),
        ({"--top-k": 999}, "--top-k 999 is larger than the teacher's vocabulary (300)"),
        ({"--seq-len": 4096}, "exceeds the teacher's maximum positions (256)"),
        ({"--teacher": tmp_path / "nobody"}, "does not exist"),
    ]
    for change, needle in cases:
        args = [x for k, v in {**base, **change}.items() for x in (k, v) if x is not None]
        out = tmp_path / "out"
        dry = refused(invoke(*args, "--out", out, "--dry-run"))
        assert needle in dry
        assert dry == refused(invoke(*args, "--out", out)), change
        assert not out.exists()


def test_dry_run_reads_no_weights_and_writes_nothing(tiny_teacher_dir, text_corpus, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "model.safetensors").write_bytes(b"not weights")
    result = invoke(
        "--teacher",
        teacher,
        "--data",
        text_corpus,
        "--out",
        tmp_path / "out",
        "--top-k",
        "8",
        "--seq-len",
        "32",
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.stderr
    assert result.stdout.startswith("# logitcache precompute ")
    assert not (tmp_path / "out").exists()
