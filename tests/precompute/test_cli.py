"""Tests for the teacher-pass commands: ``logitcache precompute``, ``inspect``, ``verify``
and ``merge``, in process with click's runner, and in a subprocess where one is killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from logitcache.cli import main
from logitcache.core.identity import tokenizer_fingerprint
from logitcache.storage import (
    FORMAT_VERSION,
    CacheReader,
    Location,
    read_manifest,
)

SEQ_LEN = 64
SHARD_SEQUENCES = 4
TOP_K = 8
N_SEQUENCES = 28  # the fixture text corpus at SEQ_LEN
N_SHARDS = 7


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def precompute_args(
    teacher: Path, data: Path, out: Path, *extra: object, shard_sequences: int = SHARD_SEQUENCES
) -> list[str]:
    args = [
        "precompute",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--seq-len",
        SEQ_LEN,
        "--shard-sequences",
        shard_sequences,
        "--device",
        "cpu",
        *extra,
    ]
    return [str(a) for a in args]


def assert_one_line_error(result: Result, pattern: str) -> str:
    """Exit 1, no traceback, stderr exactly one ``error: ...`` line matching pattern."""
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "shards").iterdir())}


def listed_hashes(cache: Path) -> dict[int, str]:
    return {s.index: s.sha256 for s in read_manifest(Location(str(cache))).shards}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher_dir, text_corpus) -> Path:
    """Top-8 of the tiny teacher over the text corpus, written by the CLI: 7 shards of 4."""
    out = tmp_path_factory.mktemp("cli") / "cache"
    result = invoke(*precompute_args(tiny_teacher_dir, text_corpus, out, "--top-k", TOP_K))
    assert result.exit_code == 0, result.stderr
    assert "complete" in result.stderr  # the closing summary
    return out


@pytest.fixture
def cache_copy(tmp_path, cache) -> Path:
    """A private copy (mtimes kept) for tests that rerun precompute or damage a shard."""
    return Path(shutil.copytree(cache, tmp_path / "cache"))


# ---------------------------------------------------------------------------------------
# inspect / verify


def test_inspect_json_describes_the_cache(cache, tiny_teacher_dir, tiny_tokenizer):
    result = invoke("inspect", cache, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    records = list(CacheReader(cache))
    n_tokens = sum(r.n_tokens for r in records)
    n_bytes = sum(p.stat().st_size for p in (cache / "shards").iterdir())
    assert info["format_version"] == FORMAT_VERSION
    assert (info["mode"], info["k"], info["vocab_size"]) == ("topk", TOP_K, len(tiny_tokenizer))
    assert info["n_sequences"] == len(records) == N_SEQUENCES
    assert info["n_tokens"] == n_tokens
    assert info["n_shards"] == N_SHARDS == len(list((cache / "shards").iterdir()))
    assert info["bytes"] == n_bytes
    assert info["bytes_per_token"] == pytest.approx(n_bytes / n_tokens)
    assert info["teacher"]["name_or_path"] == str(tiny_teacher_dir)
    assert len(info["teacher"]["weights_sha256"]) == 64
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer)


def test_verify_passes_and_names_a_shard_with_a_flipped_byte(cache_copy):
    result = invoke("verify", cache_copy)
    assert result.exit_code == 0, result.stderr
    assert f"ok: {N_SHARDS} shards, {N_SEQUENCES} sequences verified" in result.stdout

    shard = cache_copy / "shards" / "shard-000003.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = invoke("verify", cache_copy)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    bad = [line for line in result.stderr.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "shards/shard-000003.arrow" in bad[0]
    assert f"1 of {N_SHARDS} shards failed verification" in result.stderr


# ---------------------------------------------------------------------------------------
# Rerunning into an existing cache


def test_rerun_on_a_complete_cache_touches_nothing(cache_copy, tiny_teacher_dir, text_corpus):
    before = mtimes(cache_copy)
    result = invoke(*precompute_args(tiny_teacher_dir, text_corpus, cache_copy, "--top-k", TOP_K))
    assert result.exit_code == 0, result.stderr
    assert "already complete" in result.stderr
    assert mtimes(cache_copy) == before


def test_rerun_with_other_settings_is_refused(cache_copy, tiny_teacher_dir, text_corpus):
    before = mtimes(cache_copy)
    result = invoke(*precompute_args(tiny_teacher_dir, text_corpus, cache_copy, "--top-k", 4))
    assert_one_line_error(result, r"other settings: k \(8 -> 4\)")
    assert mtimes(cache_copy) == before


# ---------------------------------------------------------------------------------------
# Two workers


def worker_args(teacher: Path, data: Path, out: Path, index: int) -> list[str]:
    return precompute_args(
        teacher, data, out, "--top-k", TOP_K, "--num-workers", 2, "--worker-index", index
    )


def test_one_of_two_workers_leaves_no_manifest_and_merge_refuses(
    tmp_path, tiny_teacher_dir, text_corpus
):
    out = tmp_path / "split"
    result = invoke(*worker_args(tiny_teacher_dir, text_corpus, out, 0))
    assert result.exit_code == 0, result.stderr
    assert not (out / "manifest.json").exists()
    assert sorted(shard_bytes(out)) == [f"shard-{j:06d}.arrow" for j in (0, 2, 4, 6)]
    assert_one_line_error(
        invoke("merge", out),
        r"cannot merge yet: 3 shards missing \(first: \[1, 3, 5\], owned by worker 1 of 2\)",
    )
    assert not (out / "manifest.json").exists()
    assert invoke("inspect", out).exit_code == 1  # no manifest: nothing to describe yet


def test_two_workers_in_turn_write_the_single_worker_cache(
    tmp_path, cache, tiny_teacher_dir, text_corpus
):
    out = tmp_path / "split"
    for index in (0, 1):
        result = invoke(*worker_args(tiny_teacher_dir, text_corpus, out, index))
        assert result.exit_code == 0, result.stderr
    manifest = read_manifest(Location(str(out)))
    assert manifest.complete and manifest.n_sequences == N_SEQUENCES
    assert listed_hashes(out) == listed_hashes(cache)
    assert shard_bytes(out) == shard_bytes(cache)

    result = invoke("merge", out)
    assert result.exit_code == 0, result.stderr
    assert f"merged: {N_SHARDS} shards, {N_SEQUENCES} sequences" in result.stdout
    assert invoke("verify", out).exit_code == 0


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit 1, no traceback


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_teacher_dir) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("")
    blank_rows = [{"text": ""}, {"text": "   "}, {"text": "\n\t \n"}]
    (root / "blank.jsonl").write_text("".join(json.dumps(r) + "\n" for r in blank_rows))
    (root / "no-field.jsonl").write_text(json.dumps({"title": "t", "body": "b"}) + "\n")
    no_eos = Path(shutil.copytree(tiny_teacher_dir, root / "no-eos-teacher"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(no_eos)
    assert AutoTokenizer.from_pretrained(no_eos).eos_token_id is None
    return {"root": root, "no_eos_teacher": no_eos}


BAD_INPUTS = {  # case: (options replacing the test's defaults; None drops one, error pattern)
    "empty-corpus": ({"--data": "{root}/empty.txt"}, r"corpus is empty"),
    "blank-documents": (
        {"--data": "{root}/blank.jsonl"},
        r"corpus is empty.*3 documents read, 3 empty",
    ),
    "missing-text-field": (
        {"--data": "{root}/no-field.jsonl"},
        r"text field 'text' not found in .*no-field\.jsonl row 0; fields: title, body",
    ),
    "top-k-0": ({"--top-k": 0}, r"--top-k must be >= 1, got 0"),
    "top-k-above-vocab": ({"--top-k": 301}, r"--top-k 301 is larger than .*vocabulary \(300\)"),
    "samples-0": ({"--top-k": None, "--samples": 0}, r"--samples must be in 1\.\.255, got 0"),
    "samples-256": (
        {"--top-k": None, "--samples": 256},
        r"--samples must be in 1\.\.255, got 256",
    ),
    "seq-len-above-positions": (
        {"--seq-len": 257},
        r"--seq-len 257 exceeds the teacher's maximum positions \(256\)",
    ),
    "missing-teacher": (
        {"--teacher": "{root}/no-such-teacher"},
        r"no-such-teacher' does not exist",
    ),
    "tokenizer-without-eos": (
        {"--teacher": "{no_eos_teacher}"},
        r"tokenizer has no EOS token; packing needs one.*--no-pack",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, tmp_path, bad_inputs, tiny_teacher_dir, text_corpus):
    overrides, pattern = BAD_INPUTS[case]
    options = {
        "--teacher": tiny_teacher_dir,
        "--data": text_corpus,
        "--out": tmp_path / "out",
        "--seq-len": SEQ_LEN,
        "--top-k": TOP_K,
        "--device": "cpu",
    }
    options.update(
        {k: v if v is None else str(v).format(**bad_inputs) for k, v in overrides.items()}
    )
    args = [part for k, v in options.items() if v is not None for part in (k, v)]
    assert_one_line_error(invoke("precompute", "--quiet", *args), pattern)


# ---------------------------------------------------------------------------------------
# Resume after a kill (subprocess)


@pytest.fixture
def long_corpus(tmp_path, text_corpus) -> Path:
    """The text corpus three times over (~5k tokens): ~80 one-sequence shards at SEQ_LEN,
    ~3 s of shard publishing to interrupt (the first shard comes ~10 s after the start)."""
    lines = text_corpus.read_text().splitlines()
    path = tmp_path / "long.txt"
    path.write_text("".join(f"Copy {c}. {line}\n" for c in range(3) for line in lines))
    return path


def n_listed(cache: Path) -> int:
    """Shards listed in the manifest so far (it is published by rename: never partial)."""
    path = cache / "manifest.json"
    return len(json.loads(path.read_text())["shards"]) if path.exists() else 0


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_cache(
    tmp_path, tiny_teacher_dir, long_corpus
):
    def args(out: Path) -> list[str]:
        return precompute_args(
            tiny_teacher_dir, long_corpus, out, "--top-k", TOP_K, shard_sequences=1
        )

    out = tmp_path / "killed"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "logitcache.cli", *args(out)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while n_listed(out) == 0:
                assert proc.poll() is None, f"precompute exited early:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no shard after 120 s"
                time.sleep(0.02)
        finally:
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted = read_manifest(Location(str(out)))
    assert not interrupted.complete
    done = len(interrupted.shards)
    assert done >= 1
    kept = {s.path: (out / s.path).stat().st_mtime_ns for s in interrupted.shards}

    result = invoke(*args(out))
    assert result.exit_code == 0, result.stderr
    assert f"resuming: {done} shards" in result.stderr
    assert {path: (out / path).stat().st_mtime_ns for path in kept} == kept  # not redone
    reference = tmp_path / "uninterrupted"
    assert invoke(*args(reference)).exit_code == 0
    assert read_manifest(Location(str(out))).complete
    assert len(listed_hashes(out)) > done + 50  # the kill came early: most work was left
    assert listed_hashes(out) == listed_hashes(reference)
    assert shard_bytes(out) == shard_bytes(reference)  # no temporaries left behind either
    result = invoke("verify", out)
    assert result.exit_code == 0, result.stderr
