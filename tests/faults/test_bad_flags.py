"""Bad flags and inputs across every command: each is one ``error:`` line that says what to
fix, exit status 1, and no traceback (a traceback would mean the input reached code that
did not expect it).
"""

from __future__ import annotations

import pytest
import torch
from crashlab import run_here


@pytest.fixture
def inputs(tmp_path, sharp_teacher_dir, text_corpus, student_config, reference_caches):
    """Paths the cases refer to by name."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    return {
        "teacher": sharp_teacher_dir,
        "corpus": text_corpus,
        "student": student_config,
        "cache": reference_caches["topk"],
        "sampled": reference_caches["sampled"],
        "file": a_file,
        "bad_json": bad_json,
        "out": tmp_path / "out",
        "dir": tmp_path,
    }


def precompute(i, *flags):
    return [
        "precompute",
        "--teacher",
        i["teacher"],
        "--data",
        i["corpus"],
        "--out",
        i["out"],
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--quiet",
        *flags,
    ]


def train(i, *flags):
    return [
        "train",
        "--cache",
        i["cache"],
        "--out",
        i["out"],
        "--student-config",
        i["student"],
        "--tokenizer",
        i["teacher"],
        "--loader-workers",
        "0",
        "--steps",
        "1",
        "--quiet",
        *flags,
    ]


CASES = {  # name: (arguments, what the one line must say)
    "precompute --top-k 0": (lambda i: precompute(i, "--top-k", "0"), "--top-k must be >= 1"),
    "precompute --samples 300": (
        lambda i: precompute(i, "--samples", "300"),
        "--samples must be in 1..255",
    ),
    "precompute --top-k and --samples": (
        lambda i: precompute(i, "--top-k", "8", "--samples", "4"),
        "exactly one of --top-k",
    ),
    "precompute --top-k above the vocabulary": (
        lambda i: precompute(i, "--top-k", "100000"),
        "larger than the teacher's vocabulary",
    ),
    "precompute --seq-len above the teacher's": (
        lambda i: precompute(i, "--seq-len", "100000"),
        "exceeds the teacher's maximum",
    ),
    "precompute --shard-sequences 0": (
        lambda i: precompute(i, "--shard-sequences", "0"),
        "--shard-sequences must be >= 1",
    ),
    "precompute --worker-index out of range": (
        lambda i: precompute(i, "--num-workers", "2", "--worker-index", "5"),
        "0..1",
    ),
    "precompute --tensor-parallel -3": (
        lambda i: precompute(i, "--tensor-parallel", "-3"),
        "--tensor-parallel must be >= 1, got -3",
    ),
    "precompute --tensor-parallel without torchrun": (
        lambda i: precompute(i, "--tensor-parallel", str(2**53)),
        "runs under torchrun, one process per GPU of the teacher",
    ),
    "precompute --logprob-step 2": (
        lambda i: precompute(i, "--logprob-step", "2"),
        "--logprob-step must be in (0, 1]",
    ),
    "precompute --max-tokens 0": (
        lambda i: precompute(i, "--max-tokens", "0"),
        "max_tokens must be >= 1",
    ),
    "precompute --device tpu9": (lambda i: precompute(i, "--device", "tpu9"), "not a device"),
    "precompute --data missing": (
        lambda i: precompute(i, "--data", i["dir"] / "missing.txt"),
        "missing.txt",
    ),
    "precompute --teacher missing": (
        lambda i: [*precompute(i)[:1], "--teacher", i["dir"] / "no-teacher", *precompute(i)[3:]],
        "no-teacher",
    ),
    "precompute --out is a file": (
        lambda i: [*precompute(i)[:5], "--out", i["file"], *precompute(i)[7:]],
        "a-file",
    ),
    "precompute --out holds another cache": (
        lambda i: [*precompute(i)[:5], "--out", i["cache"], *precompute(i)[7:], "--top-k", "4"],
        "already holds a cache made with other settings",
    ),
    "train --steps 0": (lambda i: train(i, "--steps", "0"), "--steps must be >= 1"),
    "train --lr -1": (lambda i: train(i, "--lr", "-1"), "--lr must be > 0"),
    "train --eval-fraction 1.5": (
        lambda i: train(i, "--eval-fraction", "1.5"),
        "--eval-fraction must be in [0, 1)",
    ),
    "train --steps and --epochs": (lambda i: train(i, "--epochs", "1"), "not both"),
    "train --save-every -1": (lambda i: train(i, "--save-every", "-1"), "--save-every"),
    "train --keep-checkpoints 0": (
        lambda i: train(i, "--keep-checkpoints", "0"),
        "--keep-checkpoints must be >= 1",
    ),
    "train --grad-clip -1": (lambda i: train(i, "--grad-clip", "-1"), "--grad-clip"),
    "train --device tpu9": (lambda i: train(i, "--device", "tpu9"), "not a device"),
    "train --device cuda without CUDA": (
        lambda i: train(i, "--device", "cuda"),
        "CUDA is not available",
    ),
    "train --student and --student-config": (
        lambda i: train(i, "--student", i["teacher"]),
        "exactly one of --student",
    ),
    "train --student-config unreadable": (
        lambda i: train(i, "--student-config", i["bad_json"]),
        "cannot parse student config",
    ),
    "train --cache is not a cache": (
        lambda i: [*train(i)[:1], "--cache", i["dir"], *train(i)[3:]],
        "no manifest.json",
    ),
    "train --target counts on a top-k cache": (
        lambda i: train(i, "--target", "counts"),
        "--target counts needs a sampled cache",
    ),
    "train --eval-cache missing": (
        lambda i: train(i, "--eval-cache", i["dir"] / "nope"),
        "no manifest.json",
    ),
    "train --out is a file": (
        lambda i: [*train(i)[:3], "--out", i["file"], *train(i)[5:]],
        "a-file",
    ),
    "verify a file": (lambda i: ["verify", i["file"]], "Not a directory"),
    "verify a directory that is no cache": (lambda i: ["verify", i["dir"]], "no manifest.json"),
    "inspect missing": (lambda i: ["inspect", i["dir"] / "nope"], "no manifest.json"),
    "merge without parts": (lambda i: ["merge", i["dir"]], "no worker manifests"),
    "push from no cache": (lambda i: ["push", i["dir"], i["out"]], "no manifest.json"),
    "push to a file": (lambda i: ["push", i["cache"], i["file"]], "Not a directory"),
    "push to an unknown protocol": (
        lambda i: ["push", i["cache"], "bogus://bucket/x"],
        "Protocol not known",
    ),
    "bench storage --top-k 0": (
        lambda i: ["bench", "storage", "--top-k", "0"],
        "--top-k must be >= 1",
    ),
    "demo --home is a file": (
        lambda i: ["demo", "--quick", "--quiet", "--home", i["file"], "--out", i["out"]],
        "Not a directory",
    ),
}


def test_there_are_at_least_15_cases_over_every_command():
    assert len(CASES) >= 15
    commands = {name.split()[0] for name in CASES}
    assert commands == {
        "precompute",
        "train",
        "verify",
        "inspect",
        "merge",
        "push",
        "bench",
        "demo",
    }


FAST = {
    "precompute --top-k 0",
    "precompute --out is a file",
    "train --device tpu9",
    "train --keep-checkpoints 0",
    "verify a file",
    "inspect missing",
    "merge without parts",
    "push to a file",
    "bench storage --top-k 0",
    "demo --home is a file",
}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_bad_input_is_one_actionable_line(name, inputs):
    if "without CUDA" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make, needle = CASES[name]
    outcome = run_here(make(inputs))
    assert outcome.code == 1, (outcome.code, outcome.output[-2000:])
    assert "Traceback" not in outcome.output, outcome.output[-3000:]
    lines = outcome.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.output[-2000:]
    assert needle in lines[0], lines[0]
