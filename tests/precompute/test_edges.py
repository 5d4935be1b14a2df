"""The teacher pass's rough edges (issue #14): each with the exact input and one clear line."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.core.errors import LogitcacheError, one_line_errors
from logitcache.core.progress import Reporter


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def precompute(teacher, data, out, *extra):
    return invoke(
        "precompute",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--seq-len",
        "64",
        "--shard-sequences",
        "64",
        "--top-k",
        "4",
        "--device",
        "cpu",
        *extra,
    )


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: "), result.stderr
    return err


@pytest.mark.parametrize("data", ["corpus.csv", "data/corpus.jsonl", "a/b/c", "train.txt"])
def test_a_missing_local_file_is_not_taken_for_a_hub_dataset(
    data, tiny_teacher_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    start = time.perf_counter()
    err = one_line_error(precompute(tiny_teacher_dir, data, tmp_path / "out", "--quiet"))
    assert time.perf_counter() - start < 10  # no 30 s of hub retries
    assert f"no such file or directory: '{data}'" in err and "not a Hugging Face" in err
    assert not (tmp_path / "out").exists()


def test_the_bar_the_summary_and_quiet(tiny_teacher_dir, text_corpus, tmp_path):
    loud = precompute(tiny_teacher_dir, text_corpus, tmp_path / "a")
    assert loud.exit_code == 0, loud.output
    last_bar = loud.stderr.rsplit("teacher pass", 1)[-1].split("\n", 1)[0]
    assert "cache 0 B" not in last_bar and "KB" in last_bar  # the bar's final state counts all
    assert "1 shard written" in loud.stderr and "1 shards" not in loud.stderr
    assert "in 1 arrow shard;" in loud.stderr
    quiet = precompute(tiny_teacher_dir, text_corpus, tmp_path / "b", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cache {tmp_path / 'b'}: complete, ")
    assert "1 shard, " in lines[0] and "B/token" in lines[0]


def test_an_empty_corpus_leaves_no_stub(tiny_teacher_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = one_line_error(precompute(tiny_teacher_dir, empty, tmp_path / "out", "--quiet"))
    assert "corpus is empty" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # a directory the user made stays, empty
    one_line_error(precompute(tiny_teacher_dir, empty, tmp_path / "kept", "--quiet"))
    assert list((tmp_path / "kept").iterdir()) == []


def test_an_error_starts_its_own_line_after_an_open_bar():
    import click

    @click.command()
    @one_line_errors
    def fails() -> None:
        bar = Reporter().bar(total=10, desc="working")
        bar.update(3)
        raise LogitcacheError("boom")

    result = CliRunner().invoke(fails, [])
    assert result.exit_code == 1
    assert "working" in result.stderr and result.stderr.endswith("\nerror: boom\n")
