"""Recipes as checked input, and the recipes shipped with the package: every number is
finite and in range from a recipe and from a flag, Hugging Face names suggest ours, and
``logitcache recipes`` / ``--config name:NAME`` work from an installed package, not the
checkout. (Hostile recipe files: tests/faults/test_hostile_recipes.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.recipes import shipped

ROOT = Path(__file__).parent.parent


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


TRAIN = ["train", "--cache", "c", "--out", "o", "--dry-run"]
NUMBERS = [  # (key, value, what the line says)
    ("temperature", "inf", "expected a finite number"),
    ("temperature", "nan", "expected a finite number"),
    ("lr", "-inf", "expected a finite number"),
    ("steps", "1e30", "out of range"),
    ("seed", "-1", "--seed must be >= 0"),
    ("steps", "-1", "--steps must be >= 1"),
    ("temperature", "-1", "--temperature must be > 0"),
    ("steps", "true", "steps"),
    ("lr", "true", "lr"),
]


@pytest.mark.parametrize("key, value, message", NUMBERS)
def test_a_bad_number_is_one_line_from_a_flag(key, value, message):
    line = one_line_error(invoke(*TRAIN, f"--{key.replace('_', '-')}", value))
    assert message in line and key.replace("_", "-") in line, line


@pytest.mark.parametrize(
    "key, text",
    [(key, text) for key in ("temperature", "steps") for text in (".inf", ".nan", "-1", "true")]
    + [("steps", "1e30"), ("steps", "1.0e+30"), ("cache_weights", "[1, .inf]")],
)
def test_a_bad_number_is_one_line_from_a_recipe(tmp_path, key, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{key}: {text}\n")
    line = one_line_error(invoke(*TRAIN, "--config", recipe))
    assert key in line or key.replace("_", "-") in line, line


def test_json_infinities_and_huge_integers_are_refused(tmp_path):
    for text in ('{"temperature": Infinity}', '{"steps": 1e30}', '{"cache_weights": [1, NaN]}'):
        recipe = tmp_path / "r.json"
        recipe.write_text(text)
        line = one_line_error(invoke(*TRAIN, "--config", recipe))
        assert "finite" in line or "out of range" in line, line


def test_precompute_numbers_are_checked_too():
    base = ["precompute", "--teacher", "t", "--data", "x.txt", "--out", "o", "--dry-run"]
    assert "finite" in one_line_error(invoke(*base, "--bytes-per-token", "inf"))
    assert "out of range" in one_line_error(invoke(*base, "--max-tokens", "1e30"))
    assert "--seed must be >= 0" in one_line_error(invoke(*base, "--seed", "-3"))


def test_a_message_quotes_at_most_80_characters_of_a_value(tmp_path):
    recipe = tmp_path / "r.yaml"
    for text, needle in [
        ("steps: [" + ", ".join(["123456789"] * 5000) + "]", "steps: expected an integer"),
        ("x" * 1000 + ": 1", "unknown key 'xxx"),
        ('student: "' + "y" * 100_000, "cannot parse"),
    ]:
        recipe.write_text(text + "\n")
        line = one_line_error(invoke(*TRAIN, "--config", recipe))
        assert needle in line and len(line) < 400, line


@pytest.mark.parametrize(
    "theirs, ours",
    [
        ("learning_rate", "lr"),
        ("num_train_epochs", "epochs"),
        ("per_device_train_batch_size", "batch_size"),
        ("gradient_accumulation_steps", "grad_accum"),
        ("max_steps", "steps"),
        ("lr_scheduler_type", "schedule"),
        ("save_steps", "save_every"),
        ("output_dir", "out"),
        ("max_grad_norm", "grad_clip"),
        ("bf16", "precision"),
    ],
)
def test_hugging_face_names_suggest_ours(tmp_path, theirs, ours):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{theirs}: 1\n")
    line = one_line_error(invoke(*TRAIN, "--config", recipe))
    assert f"did you mean {ours!r}" in line, line
    result = invoke(*TRAIN, f"--{theirs.replace('_', '-')}", "1")
    assert result.exit_code == 2 and f"Did you mean '--{ours.replace('_', '-')}'" in result.output


# -- the shipped recipes ------------------------------------------------------------------
def test_recipes_lists_prints_and_copies(tmp_path):
    listing = invoke("recipes")
    assert listing.exit_code == 0 and set(shipped()) == {"teacher-gpu", "student-small-gpu"}
    assert all(name in listing.output for name in shipped())
    printed = invoke("recipes", "teacher-gpu")
    assert printed.exit_code == 0 and yaml.safe_load(printed.output)["samples"] == 64
    copied = invoke("recipes", "--copy", tmp_path / "mine")
    assert copied.exit_code == 0, copied.output
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [
        "student-small-gpu.yaml",
        "teacher-gpu.yaml",
    ]
    assert (tmp_path / "mine" / "teacher-gpu.yaml").read_text() == printed.output
    again = one_line_error(invoke("recipes", "teacher-gpu", "--copy", tmp_path / "mine"))
    assert "already exists" in again
    assert "teacher-gpu" in one_line_error(invoke("recipes", "nope"))
    assert "no shipped recipe named 'nope'" in one_line_error(
        invoke(*TRAIN, "--config", "name:nope")
    )


def test_the_name_form_runs_a_shipped_recipe():
    # --dry-run runs a run's checks: the recipe resolves, and its cache (not here) is looked for
    result = invoke("train", "--config", "name:student-small-gpu", "--lr", "1e-4", "--dry-run")
    assert result.exit_code == 1
    assert "no manifest.json at" in result.output and "qwen1.5b-fineweb" in result.output


def test_an_installed_package_carries_its_recipes(tmp_path):
    """setuptools' build_py (what a wheel holds) from a copy of the sources; the built package,
    run from elsewhere, finds its recipes by name."""
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "storage", "precompute", "train"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = tmp_path / "lib"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "-q",
            "build_py",
            "-d",
            built,
        ],
        cwd=src,
        check=True,
        capture_output=True,
    )
    shutil.rmtree(src)  # nothing left to fall back on
    code = (
        "import logitcache, sys; from logitcache.cli import main\n"
        f"assert logitcache.__file__.startswith({str(built)!r}), logitcache.__file__\n"
        "main(['train', '--config', 'name:student-small-gpu', '--dry-run'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(built), "PATH": "/usr/bin:/bin"},
    )
    # found by name in the built package: the dry run gets as far as the recipe's cache
    assert run.returncode == 1 and "No such file" not in run.stderr, run.stderr[-2000:]
    assert "no manifest.json at" in run.stderr and "qwen1.5b-fineweb" in run.stderr
