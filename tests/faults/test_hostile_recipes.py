"""Hostile recipe files, written by someone who controls every byte: ``--config`` refuses
each with one line naming the file, exits 1, never hangs, and stays within MAX_GROWTH_MB of
its memory at fork (crashlab). A 522-byte alias bomb once took more than 2.3 GB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from crashlab import refused

MAX_GROWTH_MB = 250  # measured: see the report; a bomb expanded would be gigabytes


def alias_bomb(key: str) -> str:
    """Nine levels of nine-fold aliases: 9**9 = 387 million strings if expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"{key}: [{','.join(['*a8'] * 9)}]")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASES = {  # name: (make the --config in tmp_path, what the one line says)
    "alias bomb under steps": (
        lambda d: write(d / "steps.yaml", alias_bomb("steps")),
        "anchors and aliases",
    ),
    "alias bomb under cache_weights": (
        lambda d: write(d / "weights.yaml", alias_bomb("cache_weights")),
        "anchors and aliases",
    ),
    "merge key": (
        lambda d: write(d / "merge.yaml", "base: &b {lr: 1}\n<<: *b\n"),
        "anchors and aliases",
    ),
    "2 MB recipe": (
        lambda d: write(d / "big.yaml", "steps: 1\n" + "# padding\n" * 200_000),
        "more than the 1,048,576 allowed",
    ),
    "1 MB of values": (
        lambda d: write(d / "values.yaml", "cache: [" + ",".join(["a"] * 500_000) + "]\n"),
        "more than 10,000 values",
    ),
    "deeply nested YAML": (
        lambda d: write(d / "deep.yaml", "steps: " + "[" * 500_000 + "]" * 500_000 + "\n"),
        "nested more than 8 levels",
    ),
    "deeply nested JSON": (
        lambda d: write(d / "deep.json", '{"steps": ' + "[" * 500_000 + "]" * 500_000 + "}"),
        "nested too deeply",
    ),
    "a FIFO": (lambda d: (os.mkfifo(d / "fifo.yaml"), d / "fifo.yaml")[1], "not a regular file"),
    "a link to /dev/zero": (
        lambda d: (os.symlink("/dev/zero", d / "zero.yaml"), d / "zero.yaml")[1],
        "not a regular file",
    ),
    "not UTF-8": (lambda d: write_bytes(d / "bin.yaml", b"steps: \xff\xfe\n"), "not UTF-8"),
    "a python tag": (
        lambda d: write(d / "tag.yaml", "steps: !!python/object/apply:os.system ['true']\n"),
        "cannot parse",
    ),
}


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_recipe_is_one_line(name, lab, tmp_path):
    make, needle = CASES[name]
    recipe = make(tmp_path)
    outcome = lab.run(
        ["train", "--config", recipe, "--cache", "c", "--out", tmp_path / "o"], timeout=60
    )
    line = refused(outcome, needle)
    assert recipe.name in line and len(line) < 300, line
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb
    print(f"{name}: {outcome.rss_growth_mb:.0f} MB; {line}")


def test_precompute_refuses_them_too(lab, tmp_path):
    recipe = write(tmp_path / "bomb.yaml", alias_bomb("data"))
    outcome = lab.run(["precompute", "--config", recipe], timeout=60)
    refused(outcome, "bomb.yaml", "anchors and aliases")
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb


@pytest.mark.parametrize(
    "text", [alias_bomb("hidden_size"), "a: " + "[" * 100_000 + "\n"], ids=["bomb", "deep"]
)
def test_a_hostile_student_config_is_one_line(text, lab, reference_caches, train_args, tmp_path):
    """--student-config is YAML from outside too: read and checked the same way."""
    config = write(tmp_path / "student.yaml", text)
    args = train_args(reference_caches["topk"], tmp_path / "run", student_config=config)
    outcome = lab.run(args, timeout=60)
    line = refused(outcome, "cannot parse student config", "student.yaml")
    assert len(line) < 300, line
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb
    print(f"student config: {outcome.rss_growth_mb:.0f} MB; {line}")
