"""What ``logitcache train`` checks before its first step, and ``--dry-run``, which runs
only these checks.

In: a ``TrainConfig``. Out: ``check_run`` gives the opened caches and the checked student
(``Checked``), or raises the one-line ``LogitcacheError`` that says what is wrong: ``--out``
holds another run or is not a directory; a cache is missing, incomplete, empty, all held
out, of another tokenizer, or lacks the target asked for; the student's (or its config's)
files do not load, its tokenizer is not the cache's, it has too few vocabulary rows or
positions. The training loop calls it first; ``dry_run`` calls it with the student built
on the meta device (its config and tokenizer read, no weights) and adds the checks the
loop makes later in its setup (the evaluation cache, LoRA, the optimizer, the online
teacher's files, the device), so a dry run that passes is a run that starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from logitcache.errors import LogitcacheError
from logitcache.storage import CacheReader

from .caches import check_cache, eval_dataset, mixed_readers
from .config import TrainConfig
from .data import count_split
from .distributed import Env
from .memory import check_student_fits
from .rundir import RUN_OUTPUTS, claim_out
from .student import apply_lora, check_student, load_student

__all__ = ["Checked", "check_out", "check_run", "dry_run", "total_steps", "with_lora"]


@dataclass
class Checked:
    """What ``check_run`` opened and checked, for the loop to use."""

    reader: CacheReader  # the main cache
    mixed: list[CacheReader]  # the caches mixed into it
    model: nn.Module  # on the meta device when checked with meta=True
    tokenizer: Any
    vocab_rows: int  # the student's output rows: teacher ids at or above move to the tail


def check_run(
    config: TrainConfig,
    env: Env,
    *,
    meta: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> Checked:
    """``--out``, the caches and the student, in the order a run meets them. ``meta``: build
    the student without weights; ``dry_run``: leave ``--out`` as it is (no --overwrite);
    ``log``: where the student's loading says what it took (the cache's tokenizer, say)."""
    check_out(config, env.rank, dry_run=dry_run)
    reader = CacheReader(config.cache, **config.reader_options())
    check_cache(reader, config)
    mixed = mixed_readers(reader, config)
    model, tokenizer, _ = load_student(
        config.student,
        config.student_config,
        config.tokenizer,
        spec=reader.spec,
        seed=config.seed,
        trust_remote_code=config.trust_remote_code,
        cache=reader.loc,
        meta=meta,
        log=log,
    )
    vocab_rows = check_student(
        model,
        tokenizer,
        reader.spec,
        extended_vocab=config.extended_vocab,
        cross_tokenizer=config.cross_tokenizer is not None,
        seq_len=config.student_seq_len,
    )
    return Checked(reader, mixed, model, tokenizer, vocab_rows)


def check_out(config: TrainConfig, rank: int, *, dry_run: bool = False) -> None:
    """``--out`` is a directory this run may write (``claim_out``; with --overwrite it
    removes the earlier run's outputs, which a dry run only reports)."""
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise LogitcacheError(f"--out {config.out} is a file: give a directory (new or empty)")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LogitcacheError(f"--out {config.out}: {parent} is not writable")
    if dry_run and config.overwrite and not config.resume:
        return
    claim_out(config, rank)


def total_steps(readers: list[CacheReader], config: TrainConfig, world: int) -> int:
    """Optimizer steps of the run: ``--steps``, else ``--epochs`` (default 1) of the caches."""
    if config.steps is not None:
        return config.steps
    n_train = sum(count_split(r, config.eval_fraction)[0] for r in readers)
    per_step = config.batch_size * config.grad_accum * world
    # A step never straddles two epochs, so every epoch ends with its own (short) step.
    per_epoch = math.ceil(n_train / per_step)
    return max(1, math.ceil(per_epoch * (config.epochs or 1.0) - 1e-9))


def with_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` with the LoRA adapters ``--lora-r`` asks for (as it is without)."""
    if not config.lora_r:
        return model
    return apply_lora(
        model,
        r=config.lora_r,
        alpha=config.lora_alpha,
        seed=config.seed,
        targets=config.lora_targets,
        dropout=config.lora_dropout,
    )


def dry_run(config: TrainConfig, env: Env) -> str:
    """Every check of a run's setup, without reading weights or writing anything; returns
    one line saying what the run would do."""
    checked = check_run(config, env, meta=True, dry_run=True)
    model = with_lora(checked.model, config)
    if config.optimizer == "adamw8bit":
        from .optim import make_optimizer

        make_optimizer(nn.Linear(1, 1), config.optimizer, config.lr, config.weight_decay)
    warnings: list[str] = []
    if env.device.type == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LogitcacheError(f"--device {config.device}: CUDA is not available")
        check_student_fits(model, config, env, checked.reader.spec.seq_len, warn=warnings.append)
    eval_dataset(checked.reader, config, checked.vocab_rows, checked.tokenizer)
    readers = [checked.reader, *checked.mixed]
    steps = total_steps(readers, config, env.world_size)
    params = sum(p.numel() for p in model.parameters())
    n_train = sum(count_split(r, config.eval_fraction)[0] for r in readers)
    return (
        f"dry run: all checks passed. {steps} steps of {config.batch_size * config.grad_accum} "
        f"sequences per process from {n_train:,} training sequences; a student of {params:,} "
        f"parameters ({checked.vocab_rows:,} vocabulary rows, {_fits(config)}); "
        f"--out {config.out}: {_out_state(config)}" + "".join(f"\n{w}" for w in warnings)
    )


def _fits(config: TrainConfig) -> str:
    if config.cross_tokenizer is None:
        return "its tokenizer fits the cache"
    return f"its own tokenizer, the teacher's targets mapped {config.cross_tokenizer}"


def _out_state(config: TrainConfig) -> str:
    out = Path(config.out).expanduser()
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if config.resume and found:
        return "a run to resume"
    if found:
        return f"a run that --overwrite would replace ({', '.join(found)})"
    return "new" if not out.exists() else "a directory with no run in it"
