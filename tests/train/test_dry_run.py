"""``logitcache train --dry-run``: every check of a run's setup, no weights read, nothing
written; what it prints is a recipe of real keys that reads back as the same run.

The refusals are those of ``train`` itself, word for word: a dry run that passes is a run
that starts.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from test_cli_train import refused

from logitcache.cli import main


def flags_of(command: str) -> set[str]:
    return {o for p in main.commands[command].params for o in p.opts}


@pytest.fixture
def run(cli, train_args, topk_cache, tmp_path):
    """``train`` arguments over the top-k cache into tmp_path/run (a keyword False drops a
    flag, e.g. student=False)."""

    def make(**flags):
        return train_args(topk_cache, tmp_path / "run", steps=2, **flags)

    return make


def broken_cases(tmp_path, topk_cache, student_config, teacher_dir):
    """(name, train keywords, a needle of the message) that ``train`` refuses before step 1."""
    incomplete = tmp_path / "incomplete"
    shutil.copytree(topk_cache, incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    manifest["complete"], manifest["n_sequences_total"] = False, None  # a pass still running
    (incomplete / "manifest.json").write_text(json.dumps(manifest))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("")
    short = tmp_path / "short.json"
    short.write_text(
        json.dumps({**json.loads(student_config.read_text()), "max_position_embeddings": 16})
    )
    scratch = {"student_config": student_config, "tokenizer": teacher_dir}
    return [
        ("no student", {}, "give exactly one of --student"),
        ("two students", {"student": teacher_dir, **scratch}, "give exactly one of --student"),
        ("no cache", {"cache": tmp_path / "nowhere", **scratch}, "manifest"),
        ("incomplete", {"cache": incomplete, **scratch}, "incomplete"),
        ("all held out", {"eval_fraction": 0.999, **scratch}, "--eval-fraction"),
        ("student missing", {"student": tmp_path / "nobody"}, "nobody"),
        ("too short", {"student_config": short, "tokenizer": teacher_dir}, "(16)"),
        ("out taken", {"out": taken, **scratch}, "holds another run"),
        ("out a file", {"out": short, **scratch}, "is a file"),
    ]


def test_dry_run_refuses_what_train_refuses_with_the_same_line(
    cli, train_args, topk_cache, student_config, teacher_dir, tmp_path
):
    for name, flags, needle in broken_cases(tmp_path, topk_cache, student_config, teacher_dir):
        cache = flags.pop("cache", topk_cache)
        out = flags.pop("out", tmp_path / "run")
        args = train_args(cache, out, steps=2, **flags)
        dry = refused(cli([*args, "--dry-run"]), needle)
        assert dry == refused(cli(args)), name
        assert not (tmp_path / "run").exists(), name


def test_a_dry_run_reads_no_weights_and_writes_nothing(
    cli, train_args, topk_cache, teacher_dir, tmp_path
):
    """A student whose weights file is garbage passes the dry run (its config and tokenizer
    are what is checked) and fails the real run; the dry run leaves --out unmade."""
    student = tmp_path / "student"
    shutil.copytree(teacher_dir, student)
    (student / "model.safetensors").write_bytes(b"not weights")
    args = train_args(topk_cache, tmp_path / "run", student=student, steps=2)
    result = cli([*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "all checks passed. 2 steps" in result.stderr and "--out" in result.stderr
    assert not (tmp_path / "run").exists()
    refused(cli(args), "cannot load student")


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_the_printed_recipe_has_real_keys_and_reads_back_the_same(
    command, cli, topk_cache, text_corpus, teacher_dir, student_config, tmp_path
):
    """Fed back with --config, the printed YAML gives the same YAML (so the same config:
    every setting is printed), and each of its keys is a flag of the command."""
    if command == "train":  # two caches (a repeated flag), a from-scratch student, LoRA
        argv = [
            "train",
            "--cache",
            topk_cache,
            "--cache",
            topk_cache,
            "--cache-weights",
            "3,1",
            "--out",
            tmp_path / "run",
            "--student-config",
            student_config,
            "--tokenizer",
            teacher_dir,
            "--lr",
            "0.01",
            "--lora-r",
            "2",
            "--lora-targets",
            "q_proj,v_proj",
            "--device",
            "cpu",
        ]
    else:
        argv = [
            "precompute",
            "--teacher",
            teacher_dir,
            "--data",
            text_corpus,
            "--out",
            tmp_path / "cache",
            "--top-k",
            "8",
            "--seq-len",
            "32",
            "--no-pack",
        ]
    first = cli([*argv, "--dry-run"])
    assert first.exit_code == 0, first.output
    recipe = yaml.safe_load(first.stdout)
    assert {"--" + key.replace("_", "-") for key in recipe} <= flags_of(command)
    (tmp_path / "recipe.yaml").write_text(first.stdout)
    again = cli([command, "--config", tmp_path / "recipe.yaml", "--dry-run"])
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
