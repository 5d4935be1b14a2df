"""Tests for ``logitcache precompute --bytes-per-token B`` (precompute/calibrate.py): N is the
largest whose cache, written for real on a sample of the corpus, fits B bytes per token.

The fixture corpus is 28 sequences at SEQ_LEN, fewer than the sample's size: calibration
writes the whole cache, so its N=chosen measurement must equal the finished cache's size.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from torchrun_launch import run_cli

from logitcache.cli import main
from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import Reporter
from logitcache.precompute import CorpusSpec, PrecomputeConfig, iter_sequences, run_precompute
from logitcache.precompute import calibrate as calibrate_module
from logitcache.precompute import run as run_module
from logitcache.storage import CacheReader, CacheWriter, Location, read_manifest

SEQ_LEN = 64
SHARD_SEQUENCES = 8  # 28 sequences: shards of 8, 8, 8, 4
BUDGET = 24.0  # B/token: N=15 here (23.76; N=16 24.06), inside 1..255


class Lines(Reporter):
    """A reporter that keeps its log lines (and draws no bars)."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def config(teacher: Path, data: Path, out: Path, **settings) -> PrecomputeConfig:
    settings.setdefault("shard_sequences", SHARD_SEQUENCES)
    corpus = CorpusSpec(data=(str(data),), seq_len=SEQ_LEN)
    return PrecomputeConfig(
        teacher=str(teacher), out=str(out), corpus=corpus, device="cpu", **settings
    )


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "shards").iterdir())}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def spy_on_calibrate(patch: pytest.MonkeyPatch) -> list[calibrate_module.Calibration]:
    """The Calibration of every teacher pass from now on, in order."""
    calibrations = []

    def spy(*args, **kwargs):
        calibrations.append(calibrate_module.calibrate(*args, **kwargs))
        return calibrations[-1]

    patch.setattr(run_module, "calibrate", spy)
    return calibrations


@pytest.fixture(scope="module")
def budget_cache(tmp_path_factory, sharp_teacher_dir, text_corpus):
    """A cache made with --bytes-per-token BUDGET: (path, the Calibration, its log lines)."""
    out = tmp_path_factory.mktemp("budget") / "cache"
    reporter = Lines()
    with pytest.MonkeyPatch.context() as patch:
        calibrations = spy_on_calibrate(patch)
        run_precompute(
            config(sharp_teacher_dir, text_corpus, out, bytes_per_token=BUDGET), reporter
        )
    (calibration,) = calibrations
    return out, calibration, reporter.lines


def test_the_chosen_n_is_the_largest_that_fits_and_the_cache_records_it(budget_cache):
    out, calibration, lines = budget_cache
    n, size = calibration.samples, dict(calibration.measured)
    assert 1 < n < 255  # the budget is inside the range: both neighbours were measured
    assert size[n] <= BUDGET < size[n + 1]
    assert all(b > BUDGET for m, b in size.items() if m > n)
    assert all(b <= BUDGET for m, b in size.items() if m < n)  # (monotone on this data)
    assert len(size) == 8  # bisection over 1..255
    manifest = read_manifest(Location(str(out)))
    assert manifest.complete and (manifest.spec.mode, manifest.spec.samples) == ("sampled", n)
    # The corpus is all calibration sequences: the calibration wrote this very cache.
    assert calibration.n_sequences == manifest.n_sequences_total == 28
    assert manifest.stats()["bytes_per_token"] == size[n]
    line = next(x for x in lines if x.startswith("--bytes-per-token"))
    assert re.fullmatch(
        rf"--bytes-per-token 24: calibrated on 28 of the first 28 sequences \([\d,]+ positions\) "
        rf"for shards of 8: N={n} -> "
        rf"{size[n]:.2f} B/token \(N={n + 1}: {size[n + 1]:.2f}\); --samples {n}",
        line,
    )


class Replay:
    """A teacher pass whose "records" of a sub-batch are the sub-batch itself (stored records
    replayed through ``predict_bytes``)."""

    def __init__(self, spec):
        self.spec = spec

    def records(self, part, logits):
        return part


def test_bytes_are_predicted_for_the_caches_shards_not_the_samples(budget_cache):
    """The 28 sequences written in shards of 14 overstate what they take as one shard of 28
    (a shard's fixed costs, and larger shards compress better); the line through shards of 14
    and 7, read at the one shard's 1/28 shards per sequence, lands much closer."""
    out, _, _ = budget_cache
    with CacheReader(str(out)) as reader:
        records, spec = list(reader), reader.manifest.spec
    _, whole = calibrate_module.measure(spec, records, 28)
    spec = replace(spec, shard_sequences=14, batch_sequences=7)
    _, halves = calibrate_module.measure(spec, records, 14)
    predicted = calibrate_module.predict_bytes(Replay(spec), [(records, None)], cache_x=1 / 28)
    assert whole < halves and abs(predicted - whole) < (halves - whole) / 10
    # Read at the pass's own layout, the prediction is the measurement, bit for bit.
    assert calibrate_module.predict_bytes(Replay(spec), [(records, None)], 2 / 28) == halves


@pytest.mark.parametrize(
    "settings, budget",
    [
        ({"format_version": 1, "sampled_logprobs": True}, 60.0),  # N=34 here
        ({"container": "zarr", "shard_sequences": 32}, 30.0),
    ],
)
def test_calibration_writes_in_the_configured_format_and_container(
    tmp_path, monkeypatch, sharp_teacher_dir, text_corpus, settings, budget
):
    calibrations = spy_on_calibrate(monkeypatch)
    out = tmp_path / "c"
    result = run_precompute(
        config(sharp_teacher_dir, text_corpus, out, bytes_per_token=budget, **settings)
    )
    (calibration,) = calibrations
    spec, size = result.manifest.spec, dict(calibration.measured)
    assert 1 < calibration.samples < 255 and spec.samples == calibration.samples
    assert spec.format_version == settings.get("format_version", 2)
    assert spec.container == settings.get("container", "arrow")
    assert spec.sampled_logprobs is settings.get("sampled_logprobs", False)
    assert result.manifest.stats()["bytes_per_token"] == size[calibration.samples] <= budget


@pytest.mark.parametrize(
    "limits, picked",
    [
        ({}, list(range(28))),  # the whole corpus: fewer than CALIBRATION_TOKENS // SEQ_LEN
        ({"CALIBRATION_TOKENS": 8 * SEQ_LEN}, [0, 3, 7, 10, 14, 17, 21, 24]),
        ({"CALIBRATION_TOKENS": 200}, [0, 9, 18]),  # 3 sequences of SEQ_LEN
        ({"CALIBRATION_TOKENS": 10}, [0]),  # at least one
        ({"CALIBRATION_TOKENS": 4 * SEQ_LEN, "CALIBRATION_WINDOW": 10}, [0, 2, 5, 7]),
    ],
)
def test_the_sample_is_spread_evenly_over_the_first_sequences(
    monkeypatch, tiny_tokenizer, tiny_teacher_dir, text_corpus, limits, picked
):
    for name, value in limits.items():
        monkeypatch.setattr(calibrate_module, name, value)
    budget = config(tiny_teacher_dir, text_corpus, Path("unused"), bytes_per_token=BUDGET)
    sample, window = calibrate_module.calibration_sequences(budget, tiny_tokenizer)
    assert [i for i, _ in sample] == picked
    assert window == limits.get("CALIBRATION_WINDOW", 28)
    every = list(iter_sequences(budget.corpus, tiny_tokenizer))  # the pass's own indices
    assert all((seq.input_ids == every[i].input_ids).all() for i, seq in sample)


def test_a_budget_cache_is_a_plain_samples_cache_and_its_recipe_remakes_it(tmp_path, budget_cache):
    out, calibration, _ = budget_cache
    recipe = yaml.safe_load(invoke("precompute", "--config", out, "--out", "x", "--dry-run").stdout)
    assert (recipe["samples"], recipe["bytes_per_token"]) == (calibration.samples, None)
    again = tmp_path / "again"
    result = invoke("precompute", "--config", out, "--out", again, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert shard_bytes(again) == shard_bytes(out)
    assert read_manifest(Location(str(again))).spec == read_manifest(Location(str(out))).spec


def test_a_budget_below_n1_fails_naming_the_smallest_size(tmp_path, sharp_teacher_dir, text_corpus):
    out = tmp_path / "c"
    with pytest.raises(LogitcacheError, match=r"N=1 takes (\d+\.\d\d) bytes per token") as err:
        run_precompute(config(sharp_teacher_dir, text_corpus, out, bytes_per_token=2.0))
    assert "--bytes-per-token 2 is below the smallest sampled cache" in str(err.value)
    assert float(re.search(r"takes (\S+) bytes", str(err.value)).group(1)) > 2.0
    assert not out.exists()  # refused before anything was written


def test_a_budget_for_an_output_holding_a_topk_cache_is_refused(
    tmp_path, tiny_teacher_dir, text_corpus
):
    out = tmp_path / "c"
    run_precompute(config(tiny_teacher_dir, text_corpus, out, top_k=4))
    with pytest.raises(
        LogitcacheError,
        match=r"already holds a top-k cache \(k=4\); "
        "--bytes-per-token makes a sampled one: use another --out",
    ):
        run_precompute(config(tiny_teacher_dir, text_corpus, out, bytes_per_token=BUDGET))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--bytes-per-token", "16", "--samples", "8"],
            "choose exactly one of --top-k K, --samples N or --bytes-per-token B",
        ),
        (["--bytes-per-token", "16", "--top-k", "8"], "choose exactly one of --top-k K"),
        (["--bytes-per-token", "0"], "--bytes-per-token must be > 0, got 0.0"),
        (["--bytes-per-token", "nan"], "--bytes-per-token: expected a finite number, got 'nan'"),
        (["--bytes-per-token", "8", "--top-k", "4", "--sampled-logprobs"], "choose exactly"),
        (
            ["--top-k", "4", "--sampled-logprobs"],
            "--sampled-logprobs needs --samples or --bytes-per-token",
        ),
    ],
)
def test_flag_conflicts_are_one_line_errors(flags, message):
    result = invoke("precompute", "--teacher", "t", "--data", "d", "--out", "o", *flags)
    assert message in one_line_error(result)


def test_bytes_per_token_alone_gets_no_default_samples(tiny_teacher_dir, text_corpus):
    result = invoke(
        "precompute",
        "--teacher",
        tiny_teacher_dir,
        "--data",
        text_corpus,
        "--out",
        "o",
        "--seq-len",
        "32",
        "--bytes-per-token",
        "16",
        "--sampled-logprobs",
        "--dry-run",
    )
    recipe = yaml.safe_load(result.stdout)
    assert (recipe["samples"], recipe["top_k"], recipe["bytes_per_token"]) == (None, None, 16.0)
    assert result.stdout.startswith("# logitcache precompute ")
    assert "--bytes-per-token 16.0 --sampled-logprobs" in result.stdout.splitlines()[0]


def test_an_interrupted_budget_cache_resumes_with_its_n_without_calibrating(
    tmp_path, monkeypatch, sharp_teacher_dir, text_corpus, budget_cache
):
    reference, calibration, _ = budget_cache
    out = tmp_path / "c"
    write_shard = CacheWriter.write_shard

    def interrupted(self, shard, records, stats=None):
        if shard == 2 and "logitcache-calibrate-" not in self.loc.url:  # the cache's own
            raise RuntimeError("interrupted")
        return write_shard(self, shard, records, stats)

    monkeypatch.setattr(CacheWriter, "write_shard", interrupted)
    budget = config(sharp_teacher_dir, text_corpus, out, bytes_per_token=BUDGET)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_precompute(budget)
    assert len(read_manifest(Location(str(out))).shards) == 2
    monkeypatch.undo()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(run_module, "calibrate", no_calibration)
    for already_complete in (False, True):
        reporter = Lines()
        result = run_precompute(budget, reporter)
        assert result.already_complete is already_complete
        n = calibration.samples
        assert (
            f"already holds a cache of --samples {n}; N={n} (no calibration)" in reporter.lines[0]
        )
    assert result.manifest.spec.samples == calibration.samples
    assert shard_bytes(out) == shard_bytes(reference)


def test_workers_share_the_n_and_a_disagreement_is_named(
    tmp_path, monkeypatch, sharp_teacher_dir, text_corpus, budget_cache
):
    """Worker 0 calibrates on a sample of 8 sequences (CALIBRATION_TOKENS patched);
    worker 1, started later, takes N from worker 0's part; a part of another N is refused."""
    monkeypatch.setattr(calibrate_module, "CALIBRATION_TOKENS", 8 * SEQ_LEN)
    out = tmp_path / "c"
    budget = config(sharp_teacher_dir, text_corpus, out, bytes_per_token=BUDGET, num_workers=2)
    first = Lines()
    assert run_precompute(budget, first).manifest is None  # worker 1 has not run yet
    assert "calibrated on 8 of the first 28 sequences" in first.lines[0]
    chosen = read_manifest(Location(str(out)), "parts/worker-00000-of-00002.json").spec.samples
    second = Lines()
    result = run_precompute(replace(budget, worker_index=1), second)
    assert f"N={chosen} (no calibration)" in second.lines[0]
    assert result.manifest.complete and result.manifest.spec.samples == chosen

    plain = config(sharp_teacher_dir, text_corpus, out, samples=chosen + 1, num_workers=2)
    with pytest.raises(
        LogitcacheError,
        match=rf"different N \({chosen + 1} here, {chosen} in "
        r"parts/worker-00000-of-00002.json\)",
    ):
        calibrate_module.check_workers_agree(plain)


@pytest.mark.slow
def test_two_torchrun_ranks_calibrate_alike_and_write_the_single_process_cache(
    tmp_path, sharp_teacher_dir, text_corpus, budget_cache
):
    """Both ranks start with no cache at --out, so each calibrates (unless the other has
    published a shard by then); they use the same N, and their cache is the single-process
    one byte for byte (~10 s: two processes import torch)."""
    single, calibration, _ = budget_cache
    out = tmp_path / "ranked"
    args = [
        "precompute",
        "--teacher",
        sharp_teacher_dir,
        "--data",
        text_corpus,
        "--out",
        out,
        "--seq-len",
        SEQ_LEN,
        "--shard-sequences",
        SHARD_SEQUENCES,
        "--bytes-per-token",
        BUDGET,
    ]
    proc = run_cli(args, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"; --samples {calibration.samples}\n") == 1  # rank 0 logs
    manifest = read_manifest(Location(str(out)))
    assert manifest.complete and manifest.spec == read_manifest(Location(str(single))).spec
    assert shard_bytes(out) == shard_bytes(single)
