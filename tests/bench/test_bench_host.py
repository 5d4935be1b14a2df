"""``logitcache bench host`` at tiny sizes: it runs end to end through the CLI, fills its
stages, writes a cache of the records it timed, and refuses bad flags in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from click.testing import CliRunner

from logitcache.bench.host import MAIN_STAGES, WRITER_STAGES, run_host_bench, synthetic_head
from logitcache.cli import main


def test_bench_host_cli_sampled_json():
    args = ["bench", "host", "--vocab", "500", "--samples", "16", "--seq-len", "64"]
    out = CliRunner().invoke(main, [*args, "--sequences", "4", "--threads", "2", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["mode"] == "sampled" and result["tokens"] == 4 * 64
    assert set(result["stage_s"]) == {*MAIN_STAGES, *WRITER_STAGES}
    assert 1 < result["distinct_per_position"] <= 16 and result["bytes_per_token"] > 0
    assert math.isfinite(result["host_tokens_per_core_s"])
    assert set(result["pipelined_s"]) == {"1", "2"} and min(result["pipelined_s"].values()) > 0


def test_bench_host_topk_text():
    b = run_host_bench(vocab=300, samples=None, top_k=8, seq_len=32, sequences=3)
    assert b.distinct_per_position == 8 and b.shard_sequences == 1
    args = ["bench", "host", "--vocab", "300", "--top-k", "8", "--seq-len", "32"]
    out = CliRunner().invoke(main, [*args, "--sequences", "2"])
    assert out.exit_code == 0, out.output
    assert "host, all (one core)" in out.output and "top-8" in out.output


def test_bench_host_refuses_bad_flags():
    runner = CliRunner()
    for args, needle in (
        (["--top-k", "8", "--samples", "4"], "choose one of"),
        (["--samples", "256"], "--samples must be in 1..255"),
        (["--vocab", "100", "--top-k", "101"], "--top-k must be in 1..100"),
        (["--zstd-level", "0"], "--zstd-level must be in 1..22"),
        (["--vocab", str(1 << 31)], "--vocab must be in 2..1048576"),
        (["--seq-len", "0"], "--seq-len must be in 2..131072"),
        (["--seq-len", "2048", "--sequences", "4096"], "--sequences must be in 1..2048"),
    ):
        out = runner.invoke(main, ["bench", "host", *args])
        assert out.exit_code != 0 and needle in out.output, (args, out.output)
        assert "Traceback" not in out.output


def test_synthetic_logits_are_peaked_and_bfloat16():
    logits = synthetic_head(1000)(torch.zeros(256, 1))
    assert logits.dtype == torch.bfloat16 and logits.shape == (256, 1000)
    lp = torch.log_softmax(logits.float(), -1)
    entropy = float(-(lp.exp() * lp).sum(-1).mean())
    assert 0.5 < entropy < np.log(1000) - 1  # peaked, not uniform
