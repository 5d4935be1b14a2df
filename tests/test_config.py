"""Configuration as data: flags made from the config dataclasses, ``--config`` recipes, the
resolved settings saved beside each output, and ``to_argv``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import click
import pytest
import yaml
from click.testing import CliRunner

from logitcache.bench.http_server import StaticServer
from logitcache.cli import main, precompute_config, train_config
from logitcache.core.errors import LogitcacheError
from logitcache.core.options import build, click_options, option, settings, settings_of, to_argv
from logitcache.precompute.config import PrecomputeConfig
from logitcache.precompute.corpus import CorpusSpec
from logitcache.recipes import recipe_yaml, resolve
from logitcache.storage import CacheSpec
from logitcache.train.config import RESUME_MAY_CHANGE, TrainConfig, resume_settings

RECIPES = Path(__file__).parent.parent / "src" / "logitcache" / "recipe_files"
COMMANDS = {
    "precompute": (PrecomputeConfig, precompute_config),
    "train": (TrainConfig, train_config),
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def parse(command: str, argv: list[str]):
    """The config ``logitcache COMMAND ARGV`` would run (flags only, nothing runs)."""
    parent = click.Context(main, info_name="logitcache", **main.context_settings)
    ctx = main.commands[command].make_context(command, [str(a) for a in argv], parent=parent)
    return COMMANDS[command][1](ctx.params, ctx, ctx.params["recipe"])


def one_line_error(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


# -- the flags are the fields ------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_the_command_is_a_field_and_none_is_spelled_twice(command):
    cls = COMMANDS[command][0]
    flags = [s.flag for s in settings(cls) if s.meta.cli]
    flags += [s.old_flag for s in settings(cls) if s.meta.cli and s.old_flag]  # renamed, hidden
    assert len(flags) == len(set(flags))
    declared = [o for p in main.commands[command].params for o in p.opts]
    assert len(declared) == len(set(declared))
    by_hand = {"--config", "--dry-run", "--help", "-h", *(["--quiet"] * (command != "train"))}
    assert set(declared) - by_hand == set(flags)
    for s in settings(cls):
        assert s.help and not s.help.startswith(" "), s.key


def test_fields_that_had_no_flag_have_one_now():
    config = parse("train", ["--cache", "c", "--out", "o", "--decay-fraction", "0.3"])
    assert config.decay_fraction == 0.3
    result = invoke("train", "--cache", "c", "--out", "o", "--decay-fraction", "0")
    assert one_line_error(result) == "error: --decay-fraction must be in (0, 1], got 0.0"


def test_data_and_teacher_revisions_are_separate_flags():
    flags = ["--data-revision", "v1", "--teacher-revision", "abc"]
    config = parse("precompute", ["--teacher", "t", "--data", "d", "--out", "o", *flags])
    assert (config.corpus.revision, config.teacher_revision) == ("v1", "abc")
    result = invoke("precompute", "--teacher", "t", "--data", "d", "--out", "o", "--revision", "x")
    assert result.exit_code == 2 and "No such option '--revision'" in result.output


def test_the_command_resolves_the_cache_mode_and_the_worker_split():
    config = parse("precompute", ["--teacher", "t", "--data", "d", "--out", "o"])
    assert (config.top_k, config.samples, config.num_workers, config.worker_index) == (
        None,
        64,
        1,
        0,
    )
    assert (
        parse("precompute", ["--teacher", "t", "--data", "d", "--out", "o", "--top-k", "8"]).samples
        is None
    )


PRECOMPUTE = PrecomputeConfig(
    teacher="org/teacher",
    out="s3://bucket/cache",
    corpus=CorpusSpec(
        data=("a.txt", "b/*.jsonl"),
        data_config="cfg",
        split="validation",
        revision="v2",
        streaming=True,
        text_field="body",
        messages_field="chat",
        max_tokens=1000,
        seq_len=512,
        pack=False,
    ),
    top_k=None,
    samples=16,
    sampled_logprobs=True,
    seed=3,
    container="zarr",
    logprob_codec="float16",
    logprob_step=0.125,
    shard_sequences=32,
    dtype="bfloat16",
    device="cpu",
    teacher_revision="abc123",
    trust_remote_code=True,
    batch_tokens=4096,
    num_workers=3,
    worker_index=2,
)
TRAIN = TrainConfig(
    cache="a",
    out="runs/x",
    mix_caches=("b", "c d"),
    cache_weights=(3.0, 1.0, 0.5),
    student_config="s.json",
    tokenizer="tok",
    extended_vocab=True,
    loss="jsd",
    tail="label",
    target="probs",
    temperature=2.0,
    alpha=0.25,
    beta=0.3,
    epochs=1.5,
    batch_size=3,
    grad_accum=2,
    lr=1e-3,
    min_lr_ratio=0.0,
    warmup_steps=7,
    schedule="wsd",
    decay_fraction=0.4,
    weight_decay=0.0,
    grad_clip=0.0,
    seed=5,
    eval_every=9,
    eval_fraction=0.0,
    eval_sequences=12,
    eval_cache="held",
    save_every=4,
    keep_checkpoints=3,
    block_shards=1,
    chunk_size=64,
    loader_workers=0,
    device="cpu",
    precision="fp32",
    resume=True,
    verify=False,
    local_cache="/tmp/shards",
    local_cache_gb=1.5,
    quiet=True,
)


@pytest.mark.parametrize("command, config", [("precompute", PRECOMPUTE), ("train", TRAIN)])
def test_to_argv_gives_back_the_same_config(command, config):
    assert parse(command, config.to_argv()) == config
    flat = settings_of(config)
    minimal = {s.key: flat[s.key] for s in settings(type(config)) if s.required}
    minimal.update({"top_k": 8} if command == "precompute" else {})
    flags = {a for a in build(type(config), minimal).to_argv() if a.startswith("--")}
    assert flags == {"--" + k.replace("_", "-") for k in minimal}  # defaults are left out


# -- recipe files ---------------------------------------------------------------------------
def test_flags_override_the_file_and_the_file_the_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cache: [a, b]\nout: o\nlr: 0.01\nsteps: 5\ncache_weights: [1, 2]\n")
    config = parse("train", ["--config", recipe, "--lr", "0.5", "--batch-size", "2"])
    assert (config.cache, config.mix_caches, config.cache_weights) == ("a", ("b",), (1.0, 2.0))
    assert (config.lr, config.steps, config.batch_size, config.seed) == (0.5, 5, 2, 0)
    # --cache on the command line replaces the file's caches, both of them
    config = parse("train", ["--config", recipe, "--cache", "z", "--cache-weights", "1"])
    assert (config.cache, config.mix_caches) == ("z", ())


def test_dry_run_prints_a_recipe_that_reads_back_the_same(tmp_path, tiny_teacher_dir, text_corpus):
    t, x = str(tiny_teacher_dir), str(text_corpus)  # checked: they must exist
    argv = [
        "--teacher",
        t,
        "--data",
        x,
        "--out",
        "o",
        "--top-k",
        "8",
        "--no-pack",
        "--seq-len",
        "32",
    ]
    result = invoke("precompute", *argv, "--dry-run")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first == (
        f"# logitcache precompute --teacher {t} --out o --data {x} --seq-len 32 --no-pack --top-k 8"
    )
    (tmp_path / "r.yaml").write_text(result.stdout)
    assert parse("precompute", ["--config", tmp_path / "r.yaml"]) == parse("precompute", argv)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr: 1", "unknown key 'lrr'; did you mean 'lr'?"),
        ("revision: main", "unknown key 'revision'"),
        ("lr: fast", "lr: 'fast' is not a valid float"),
        ("steps: 2.5", "steps: expected an integer, got 2.5"),
        ("steps: [1, 2]", "steps: expected an integer, got [1, 2]"),
        ("verify: 3", "verify: expected true or false, got 3"),
        ("student: {a: 1}", "student: expected a string, got {'a': 1}"),
        ("loss: kl", "loss: 'kl' is not one of"),
        ("tail: top", "tail: 'top' is not one of 'renorm', 'bucket', 'label'"),
        ("cache: [a, 3]", "cache"),
        ("cache_weights: 3,x", "--cache-weights 3,x: expected numbers separated by commas"),
        ("[1, 2]", "expected a mapping of settings"),
        ("lr: [", "cannot parse"),
        ("lr: -1", "--lr must be > 0, got -1.0"),
    ],
)
def test_bad_recipes_are_one_line_naming_the_key(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "\n")
    line = one_line_error(invoke("train", "--config", recipe, "--cache", "c", "--out", "o"))
    assert message in line, line


def test_a_nested_key_is_suggested_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: t\nout: o\ndata: x.txt\ndata_revison: v1\n")
    line = one_line_error(invoke("precompute", "--config", recipe))
    assert line.endswith("unknown key 'data_revison'; did you mean 'data_revision'?")


def test_required_settings_come_from_the_file_or_a_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: o\n")
    result = invoke("train", "--config", recipe)
    assert result.exit_code == 2 and "Missing option '--cache'" in result.output
    assert parse("train", ["--config", recipe, "--cache", "c"]).out == "o"
    result = invoke("precompute", "--teacher", "t", "--out", "o")
    assert result.exit_code == 2 and "Missing option '--data'" in result.output
    missing = tmp_path / "nope.yaml"
    assert "nope.yaml" in one_line_error(invoke("train", "--config", missing))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_recipes_parse_and_dry_run(path):
    """Both print as recipes that parse back to the same config; the train recipe's cache is
    not here, which its dry run checks (one line)."""
    command = {"teacher-gpu.yaml": "precompute", "student-small-gpu.yaml": "train"}[path.name]
    if command == "train":  # (the precompute one would download its hub teacher's config)
        result = invoke(command, "--config", path, "--dry-run")
        assert "no manifest.json" in one_line_error(result)
    config = parse(command, ["--config", path])
    resolved = yaml.safe_load(recipe_yaml(config, command))
    assert set(yaml.safe_load(path.read_text())) <= set(resolved)
    assert config == build(COMMANDS[command][0], resolved)


# -- saved settings reproduce the run ----------------------------------------------------
def test_a_cache_is_the_recipe_that_makes_it_again(
    tmp_path, monkeypatch, tiny_teacher_dir, text_corpus
):
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "home"))
    first = tmp_path / "first"
    argv = [
        "--teacher",
        tiny_teacher_dir,
        "--data",
        text_corpus,
        "--seq-len",
        "32",
        "--shard-sequences",
        "8",
        "--samples",
        "8",
        "--seed",
        "4",
        "--no-pack",
        "--logprob-step",
        "0.0625",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert invoke("precompute", *argv, "--out", first, "--batch-tokens", "64").exit_code == 0
    recipe = parse("precompute", ["--config", first, "--out", "x"])
    assert recipe == replace(parse("precompute", [*argv, "--out", "x"]), device="auto")
    for source in (first, first / "manifest.json"):
        again = tmp_path / f"again-{source.name}"
        result = invoke("precompute", "--config", source, "--out", again, "--quiet")
        assert result.exit_code == 0, result.output
        files = sorted(
            p.relative_to(first)
            for p in first.rglob("*")
            if p.is_file() and ".locks" not in p.parts
        )
        assert len(files) > 3
        for name in files:
            assert (first / name).read_bytes() == (again / name).read_bytes(), name
    manifest = json.loads((first / "manifest.json").read_text())
    del manifest["spec"]["teacher"]["name_or_path"]
    manifest["cache_id"] = CacheSpec.from_dict(manifest["spec"]).cache_id
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(invoke("precompute", "--config", tmp_path / "odd", "--dry-run"))
    assert "does not record how it was made (no 'name_or_path')" in line
    with StaticServer(tmp_path) as server:  # a cache anywhere is its recipe: a URL too
        for url in (f"{server.url}/first", f"{server.url}/first/manifest.json"):
            assert parse("precompute", ["--config", url, "--out", "x"]) == recipe


def test_a_saved_train_config_reproduces_the_losses(
    tmp_path, sharp_teacher_dir, tiny_teacher_dir, text_corpus, student_config
):
    cache = tmp_path / "cache"
    assert (
        invoke(
            "precompute",
            "--teacher",
            sharp_teacher_dir,
            "--data",
            text_corpus,
            "--out",
            cache,
            "--seq-len",
            "32",
            "--top-k",
            "4",
            "--device",
            "cpu",
            "--quiet",
        ).exit_code
        == 0
    )
    first, second = tmp_path / "first", tmp_path / "second"
    result = invoke(
        "train",
        "--cache",
        cache,
        "--out",
        first,
        "--student-config",
        student_config,
        "--tokenizer",
        tiny_teacher_dir,
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--loader-workers",
        "0",
        "--eval-fraction",
        "0.2",
        "--lr",
        "0.01",
        "--schedule",
        "wsd",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    result = invoke("train", "--config", first / "train_config.json", "--out", second)
    assert result.exit_code == 0, result.output

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r.get("loss"), r.get("eval_ce")) for r in rows if "loss" in r or "eval_ce" in r]

    assert len(losses(first)) >= 4 and losses(first) == losses(second)


# -- the generator, as a helper adding a field would use it --------------------------------
@dataclass(frozen=True)
class _Example:
    name: str
    """Required text."""
    count: int = 3
    """A number."""
    ratio: float | None = None
    """An optional number."""
    mode: Literal["fast", "exact"] = "fast"
    """A choice."""
    flag: bool = False
    """A switch."""
    paths: tuple[str, ...] = ()
    """A repeatable flag."""
    weights: tuple[float, ...] = ()
    """Numbers, comma-separated."""
    hidden: int = option(0, cli=False)
    """A recipe key only."""
    level: Literal["low", "high"] = "low"
    """A Literal: its values are the choices."""
    tags: tuple[str, ...] = ("x", "y")
    """A repeatable flag with a default."""
    extra: dict[str, int] = option(default_factory=dict, cli=False)  # noqa: RUF009
    """Any other type: a recipe key only, taken as is."""


def test_a_new_field_with_a_docstring_is_a_flag():
    @click.command()
    @click_options(_Example)
    def command(**params):
        click.echo(repr(build(_Example, resolve(_Example, click.get_current_context(), params))))

    helptext = CliRunner().invoke(command, ["--help"]).output
    for needle in (
        "--name TEXT",
        "Required text.",
        "[required]",
        "--count INTEGER",
        "[default: 3]",
        "--mode [fast|exact]",
        "--flag / --no-flag",
        "--paths TEXT",
        "--weights X,Y,...",
        "--level [low|high]",
        "[default: (x, y)]",
    ):
        assert needle in helptext, needle
    assert "--hidden" not in helptext and "--extra" not in helptext
    example = _Example("n", 4, 0.5, "exact", True, ("a", "b"), (1.0, 2.5), 0, "high", ("z",))
    result = CliRunner().invoke(command, to_argv(example))
    assert result.output.strip() == repr(example)
    assert to_argv(replace(example, count=3, flag=False)).count("--count") == 0
    assert CliRunner().invoke(command, ["--name", "n"]).output.strip() == repr(_Example("n"))
    assert settings_of(replace(example, extra={"a": 1}))["extra"] == {"a": 1}


def test_a_field_without_a_docstring_is_refused():
    @dataclass(frozen=True)
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match=r"Undocumented\.size needs a docstring"):
        settings(Undocumented)


def test_library_errors_name_the_flag():
    with pytest.raises(LogitcacheError, match=re.escape("--top-k must be >= 1, got 0")):
        replace(PRECOMPUTE, top_k=0, samples=None, sampled_logprobs=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loss": "kl"}, "--loss 'kl': expected one of forward-kl, reverse-kl, jsd, tvd, ce"),
        ({"optimizer": "sgd"}, "--optimizer 'sgd': expected one of adamw, adamw8bit"),
        ({"container": "tar"}, "--container 'tar': expected one of arrow, zarr"),
        ({"dtype": "int8"}, "--dtype 'int8': expected one of bfloat16, float16, float32"),
    ],
)
def test_a_choice_made_in_python_is_checked_against_its_literal(change, message):
    train = "loss" in change or "optimizer" in change
    with pytest.raises(LogitcacheError, match=re.escape(message)):
        TrainConfig(cache="c", out="o", **change) if train else replace(PRECOMPUTE, **change)


def test_resume_policy_is_declared_on_the_fields():
    may_change = {
        "out",
        "resume",
        "quiet",
        "loader_workers",
        "device",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "verify",
        "local_cache",
        "local_cache_gb",
        "steps",
        "epochs",
        "gradient_checkpointing",
        "overwrite",
        "merge_lora",
    }
    assert may_change == RESUME_MAY_CHANGE
    plain = TrainConfig(cache="c", out="o")
    # the keys checkpoints already hold: LoRA, FSDP and the optimizer only when used
    assert sorted(resume_settings(plain)) == [
        "alpha",
        "batch_size",
        "beta",
        "block_shards",
        "cache",
        "cache_weights",
        "chunk_size",
        "decay_fraction",
        "eval_cache",
        "eval_fraction",
        "eval_sequences",
        "extended_vocab",
        "grad_accum",
        "grad_clip",
        "loss",
        "lr",
        "min_lr_ratio",
        "mix_caches",
        "precision",
        "schedule",
        "seed",
        "student",
        "student_config",
        "tail",
        "target",
        "temperature",
        "tokenizer",
        "trust_remote_code",
        "warmup_steps",
        "weight_decay",
    ]
    used = replace(plain, lora_r=4, fsdp=False, optimizer="adamw8bit", merge_lora=True)
    added = set(resume_settings(used)) - set(resume_settings(plain))
    assert added == {"lora_r", "lora_alpha", "lora_targets", "lora_dropout", "optimizer"}


def test_trains_old_num_workers_still_works_for_one_release_with_one_line(tmp_path, capsys):
    line = "--num-workers is now --loader-workers for train; the old name goes in the next release"
    config = parse("train", ["--cache", "c", "--out", "o", "--num-workers", "0"])
    assert config.loader_workers == 0
    assert capsys.readouterr().err.strip() == line
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_workers: 3\n")
    assert parse("train", ["--cache", "c", "--out", "o", "--config", recipe]).loader_workers == 3
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "r.yaml: num_workers is now loader_workers; the old name goes in the next release"
    )
    both = ["--num-workers", "0", "--loader-workers", "2"]
    both = invoke("train", "--cache", "c", "--out", "o", *both)
    assert one_line_error(both).endswith(
        "give --loader-workers or --num-workers (its old name), not both"
    )
    saved = {**TRAIN.to_dict(), "num_workers": 2}  # train_config.json of a run saved before
    del saved["loader_workers"]
    assert TrainConfig.from_dict(saved) == replace(TRAIN, loader_workers=2)
    precompute = ["--teacher", "t", "--out", "o", "--data", "x.txt", "--top-k", "4"]
    split = ["--num-workers", "2", "--worker-index", "1"]
    assert parse("precompute", [*precompute, *split]).num_workers == 2  # precompute keeps it
