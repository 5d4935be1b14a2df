"""The ``logitcache`` command line: thin click commands over the library.

The options of ``precompute`` and ``train`` are made from their config dataclasses
(``logitcache.options``); ``--config`` reads the same settings from a recipe file
(``logitcache.recipes``). Expected errors (``LogitcacheError``: bad flags, files, models,
shards) print one line and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import click

from logitcache.bench.commands import bench
from logitcache.cache_commands import CACHE_COMMANDS
from logitcache.errors import one_line_errors, sigterm_raises
from logitcache.options import QUIET, build, click_options
from logitcache.precompute.config import PrecomputeConfig, read_recipe
from logitcache.precompute.defaults import DEFAULT_SAMPLES
from logitcache.recipes import (
    flag_for,
    is_recipe_file,
    parse_recipe_file,
    recipe_options,
    recipe_yaml,
    resolve,
)
from logitcache.train.config import RUN_RECORD_KEYS, TrainConfig
from logitcache.untrusted import redact

__all__ = ["main", "precompute_config", "render_reference", "train_config"]


class _Commands(click.Group):
    """The command group: every command's expected errors print one line (``one_line_errors``),
    with any credentials in it redacted."""

    def invoke(self, ctx: click.Context) -> Any:
        name = lambda: ctx.invoked_subcommand  # noqa: E731
        return one_line_errors(super().invoke, command=name, clean=redact)(ctx)


class _SettingsCommand(click.Command):
    """A command made from a config: an unknown flag that is a Hugging Face
    ``TrainingArguments`` name (``--learning-rate``) suggests ours (``--lr``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as err:
            ours = flag_for(err.option_name, [o for p in self.params for o in p.opts])
            if ours is not None:
                err.possibilities = [ours]
            raise


_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_Commands, context_settings=_SETTINGS)
@click.version_option(package_name="logitcache")
def main() -> None:
    """Distill language models from an offline teacher-logit cache.

    A teacher runs once (`precompute`) and writes its sparse next-token distributions to a
    cache; students then train from the cache alone (`train`), as often as you like.
    """


main.add_command(bench)
for _command in CACHE_COMMANDS:
    main.add_command(_command)


# -- demo -------------------------------------------------------------------------------
@main.command()
@click.option(
    "--quick",
    is_flag=True,
    help="Smaller everything, same code path; its first run pretrains a small "
    "teacher of its own too.",
)
@click.option(
    "--out",
    default="logitcache-demo",
    show_default=True,
    help="Where the cache, students, plot and summary go (the demo owns it: outputs "
    "of an earlier demo of another size are replaced).",
)
@click.option(
    "--home",
    default=None,
    help="Where the teacher is kept and reused [default: $LOGITCACHE_HOME or ~/.cache/logitcache].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@QUIET
def demo(quick: bool, out: str, home: str | None, seed: int, quiet: bool) -> None:
    """Teacher, cache, and a distilled student beating a CE-only one, on this CPU.

    Uses the Python standard library's own source as the corpus: no download. The first run
    pretrains a small teacher (a few minutes) and keeps it for later runs.
    """
    from pathlib import Path

    from logitcache.demo import FULL, QUICK, default_home, format_summary, run_demo
    from logitcache.progress import Reporter

    summary = run_demo(
        QUICK if quick else FULL,
        home=Path(home).expanduser() if home else default_home(),
        out=Path(out),
        reporter=Reporter(enabled=not quiet),
        seed=seed,
    )
    click.echo(format_summary(summary))


# -- precompute -----------------------------------------------------------------------
@main.command(cls=_SettingsCommand)
@click_options(PrecomputeConfig)
@QUIET
@recipe_options
def precompute(recipe: str | None, dry_run: bool, quiet: bool, **params: Any) -> None:
    """Run a teacher over a corpus once and write the cache (resumable)."""
    from logitcache.describe import summary_line, summary_text
    from logitcache.precompute import run_precompute
    from logitcache.precompute.ranks import distributed_worker
    from logitcache.progress import Reporter

    config = precompute_config(params, click.get_current_context(), recipe)
    if dry_run:  # the pass's own checks first (not its weights' hash)
        from logitcache.precompute.preflight import dry_run as check_pass

        checked = check_pass(config)
        click.echo(recipe_yaml(config, "precompute"), nl=False)
        click.echo(checked, err=True)
        return
    rank, _ = distributed_worker()
    with sigterm_raises():  # preempted: the same line and cleanup as Ctrl-C (exit 143)
        result = run_precompute(config, Reporter(enabled=not quiet, rank=rank))
    if result.manifest is not None and result.manifest.complete and rank == 0:
        describe = summary_line if quiet else summary_text  # --quiet keeps one summary line
        click.echo(describe(result.manifest, redact(config.out)), err=True)


def read_precompute_recipe(path: str) -> dict[str, Any]:
    """``precompute --config``: a YAML/JSON recipe file, or a cache (directory, URL or its
    manifest.json) whose manifest says how it was made."""
    if is_recipe_file(path) and not path.endswith("manifest.json"):
        return parse_recipe_file(path)
    return read_recipe(path)


def precompute_config(
    params: dict[str, Any], ctx: click.Context | None = None, recipe: str | None = None
) -> PrecomputeConfig:
    """The ``PrecomputeConfig`` of parsed ``precompute`` options (over a recipe file).

    The two settings the command resolves itself: the cache mode (sampled with
    DEFAULT_SAMPLES draws unless --top-k, --samples or --bytes-per-token says), and the worker
    split (the flags, else torchrun's ranks, else one worker).
    """
    from logitcache.precompute.ranks import resolve_worker

    flat = resolve(PrecomputeConfig, ctx, params, config=recipe, read=read_precompute_recipe)
    if all(flat.get(key) is None for key in ("top_k", "samples", "bytes_per_token")):
        flat["samples"] = DEFAULT_SAMPLES
    flat["worker_index"], flat["num_workers"] = resolve_worker(
        flat.get("num_workers"), flat.get("worker_index")
    )
    return build(PrecomputeConfig, flat)


# -- train ----------------------------------------------------------------------------
@main.command(cls=_SettingsCommand)
@click_options(TrainConfig)
@recipe_options
def train(recipe: str | None, dry_run: bool, **params: Any) -> None:
    """Train a student from a cache, with no teacher in memory."""
    from logitcache.train import train as run_train
    from logitcache.train.evaluation import eval_summary
    from logitcache.train.preempt import reported_interrupts

    config = train_config(params, click.get_current_context(), recipe)
    if dry_run:  # every check of a run's setup first: a recipe printed is a run that starts
        from logitcache.train.distributed import setup_distributed
        from logitcache.train.preflight import dry_run as check_run

        checked = check_run(config, setup_distributed(config.device))
        click.echo(recipe_yaml(config, "train"), nl=False)
        click.echo(checked, err=True)
        return
    with reported_interrupts(config.out):  # SIGTERM / Ctrl-C: a checkpoint, or what is kept
        result = run_train(config)
    if not config.quiet and result.final_eval:
        ev = result.final_eval
        click.echo(
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.0f} s; "
            f"{eval_summary(ev)}; "
            f"model in {result.model_dir}",
            err=True,
        )


@main.command()
@click.argument("run")
@click.option(
    "--cache",
    default=None,
    help="Evaluate on all of this cache instead of the "
    "run's held-out sequences (its --eval-fraction split, or its --eval-cache).",
)
@click.option(
    "--max-sequences",
    type=int,
    default=None,
    help="At most this many sequences (default: the run's --eval-sequences).",
)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--json", "as_json", is_flag=True, help="Print the measures as one JSON object.")
def evaluate(
    run: str,
    cache: str | None,
    max_sequences: int | None,
    batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Held-out CE, bits per byte and KL to the teacher of a finished run (RUN: its --out).

    Bits per byte do not depend on the tokenizer: students of any tokenizers (--cross-tokenizer
    runs too) compare on them over the same held-out sequences.
    """
    import json

    from logitcache.train.evaluation import eval_summary
    from logitcache.train.run_eval import evaluate_run

    if batch_size < 1 or (max_sequences is not None and max_sequences < 1):
        raise click.BadParameter("--batch-size and --max-sequences must be >= 1")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_run(
        run, cache=cache, device=device, batch_size=batch_size, max_sequences=max_sequences
    )
    if as_json:
        click.echo(json.dumps(result))
    elif "eval_ce" not in result:
        click.echo(f"{redact(result['cache'])}: no trained positions to evaluate")
    else:
        shown = f"{redact(result['cache'])}, {result['sequences']} sequences"
        click.echo(f"{shown}: {eval_summary(result)} ({result['eval_positions']:,} positions)")


def train_config(
    params: dict[str, Any], ctx: click.Context | None = None, recipe: str | None = None
) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``train`` options (over a recipe file)."""
    return build(
        TrainConfig, resolve(TrainConfig, ctx, params, config=recipe, ignore=RUN_RECORD_KEYS)
    )


# -- recipes --------------------------------------------------------------------------
@main.command()
@click.argument("name", required=False)
@click.option(
    "--copy",
    "directory",
    default=None,
    metavar="DIR",
    help="Write NAME.yaml (every recipe without NAME) into DIR, to edit.",
)
def recipes(name: str | None, directory: str | None) -> None:
    """List the recipes shipped with logitcache, print one (NAME), or copy them (--copy).

    Run one as it is with `--config name:NAME` (e.g. `logitcache train --config
    name:student-small-gpu --cache CACHE`); flags given with it override its keys.
    """
    from logitcache.recipes import copy_shipped, shipped, shipped_text

    if directory is not None:
        for path in copy_shipped([name] if name else list(shipped()), directory):
            click.echo(f"wrote {path}")
    elif name is not None:
        click.echo(shipped_text(name), nl=False)
    else:
        for key, about in shipped().items():
            click.echo(f"{key:20s} {about}")
        click.echo("\nuse one with --config name:NAME; `logitcache recipes NAME` prints it")


def render_reference() -> str:
    """docs/cli.md, the command reference (``logitcache.reference``) of these commands."""
    from logitcache import reference

    return reference.render_reference(main)


@main.command(hidden=True)
def reference() -> None:
    """Print docs/cli.md, the command reference: `logitcache reference > docs/cli.md`."""
    click.echo(render_reference(), nl=False)


if __name__ == "__main__":
    main()
