"""The training loop: setup, step, evaluate, save. Reads top to bottom.

In: a ``TrainConfig``. Out: ``OUT/model`` (``save_pretrained`` model + tokenizer),
``OUT/metrics.jsonl``, ``OUT/train_config.json`` and checkpoints under ``OUT/checkpoints``.
Runs under ``torchrun`` as DDP (gloo on CPU, nccl on GPU) with the cache split by rank,
or with ``--fsdp`` the student sharded over the ranks (``sharding.py``, sharded checkpoints).

Built on the public API and nothing else for data and loss: a ``CacheDataset`` streamed in
the exact-resume order (``CacheStream``), ``DistillCollator`` batches and the
``DistillationLoss`` module; a user's own trainer given the same pieces computes the same loss.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from logitcache.errors import LogitcacheError
from logitcache.progress import Reporter
from logitcache.storage import CacheReader
from logitcache.untrusted import redact_values

from . import sharding
from .caches import cross_options, eval_dataset
from .checkpoint import TrainingProgress, is_out_of_space, latest_checkpoint, save_checkpoint
from .config import TrainConfig, lr_multiplier, resume_settings
from .data import StreamState
from .dataset import CacheDataset
from .distill_loss import DistillationLoss
from .distributed import (
    Env,
    autocast_for,
    barrier,
    check_ranks_resume_together,
    setup_distributed,
    wrap_ddp,
)
from .evaluation import eval_summary, evaluate
from .memory import check_student_fits
from .optim import make_optimizer, optimizer_state_classes, set_lr
from .preempt import StopOnSignal, ignore_stop_signals, stopped
from .preflight import check_run, total_steps, with_lora
from .rundir import path_settings, read_metrics, resume, write_run_file
from .stream import CacheStream
from .student import DistillModule

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    final_eval: dict[str, float] = field(default_factory=dict)
    model_dir: str = ""


@dataclass
class _Run:
    """What setup builds and the steps use."""

    model: torch.nn.Module
    tokenizer: Any
    wrapped: torch.nn.Module  # DistillModule, DDP-wrapped or sharded under torchrun
    optimizer: torch.optim.Optimizer
    stream: CacheStream
    eval_data: CacheDataset | None
    progress: TrainingProgress
    fingerprint: dict[str, Any]
    total_steps: int
    autocast: Any


def train(
    config: TrainConfig,
    reporter: Reporter | None = None,
    *,
    loss: DistillationLoss | None = None,
) -> TrainResult:
    """Train a student from a cache; see the module docstring.

    ``loss``: what the student learns from instead of ``DistillationLoss.from_config(config)``
    (a subclass called the same way; benchmarks/online_kd.py's teacher in memory is one). Its
    ``repr`` joins the settings a resumed run must share, so resume with the same one."""
    env = setup_distributed(config.device)
    reporter = reporter or Reporter(enabled=not config.quiet, rank=env.rank)
    start = time.perf_counter()
    run = _setup(config, env, reporter, loss or DistillationLoss.from_config(config))
    with StopOnSignal(announce=reporter.enabled) as stop:
        final_eval = _train_steps(run, config, env, reporter, stop)

    model_dir = Path(config.out) / "model"
    state = sharding.full_state_dict(run.model) if sharding.is_sharded(run.wrapped) else None
    if env.rank == 0:
        _save_final(run.model, run.tokenizer, model_dir, state)
        reporter.log(f"saved the student to {model_dir} (load with from_pretrained)")
        if config.merge_lora:
            merged = Path(config.out) / "model-merged"
            _save_final(run.model.merge_and_unload(), run.tokenizer, merged)
            reporter.log(f"saved the student with its adapters merged to {merged}")
    barrier(env)
    if env.distributed:
        dist.destroy_process_group()
    return TrainResult(
        run.progress.step,
        run.progress.tokens,
        time.perf_counter() - start,
        final_eval,
        str(model_dir),
    )


def _setup(config: TrainConfig, env: Env, reporter: Reporter, loss: DistillationLoss) -> _Run:
    """Open and check the caches, load the student, resume, and open the stream."""
    sharded = config.fsdp and env.distributed
    checked = check_run(
        config, env, meta=sharded and env.rank != 0, log=reporter.log
    )  # meta: filled from rank 0's
    reader, mixed, model = checked.reader, checked.mixed, checked.model
    tokenizer, vocab_rows = checked.tokenizer, checked.vocab_rows
    model = with_lora(model, config)
    sharding.enable_gradient_checkpointing(model) if config.gradient_checkpointing else None
    try:
        seq_len = config.student_seq_len or reader.spec.seq_len
        check_student_fits(model, config, env, seq_len, warn=reporter.log)
        if not sharded:  # fully_shard moves each rank's shard
            model.to(env.device)
    except (AssertionError, RuntimeError):  # what torch raises for CUDA on a CPU-only machine
        if env.device.type == "cuda" and not torch.cuda.is_available():
            raise LogitcacheError(f"--device {config.device}: CUDA is not available") from None
        raise
    module = DistillModule(model, loss)
    if sharded:
        sharding.shard_student(module, env.device, env.world_size, config.precision, env.rank)
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay)
    n_steps = total_steps([reader, *mixed], config, env.world_size)
    progress = TrainingProgress(schedule_steps=n_steps)
    fingerprint = _fingerprint(config, [reader, *mixed], env.world_size, loss)
    if config.resume:
        progress = _resume(config, model, optimizer, fingerprint, n_steps, reporter, env)
        check_ranks_resume_together(progress.step, env, config.out)
    _write_config(config, env, fingerprint, n_steps)
    data = CacheDataset(
        config.caches,
        split="train",
        eval_fraction=config.eval_fraction,
        vocab_limit=vocab_rows,
        target=config.target,
        reader_options=config.reader_options(),
        **cross_options(config, tokenizer),
    )
    stream = data.stream(
        batch_size=config.batch_size,
        seed=config.seed,
        rank=env.rank,
        world_size=env.world_size,
        grad_accum=config.grad_accum,
        block_shards=config.block_shards,
        weights=config.cache_weights or None,
        start=StreamState(progress.epoch, progress.consumed),
    )
    wrapped = module if sharding.is_sharded(module) else wrap_ddp(module, env)
    return _Run(
        model,
        tokenizer,
        wrapped,
        optimizer,
        stream,
        eval_dataset(reader, config, vocab_rows, tokenizer),
        progress,
        fingerprint,
        n_steps,
        autocast_for(config.precision, env),
    )


def _train_steps(
    run: _Run, config: TrainConfig, env: Env, reporter: Reporter, stop: StopOnSignal
) -> dict:
    """The loop: steps until ``total_steps``, evaluating and checkpointing on schedule; on
    SIGTERM / SIGINT, checkpointing after the step and raising ``Interrupted``."""
    progress, total_steps = run.progress, run.total_steps
    batches = iter(_loader(run.stream, config))
    metrics = _MetricsLog(Path(config.out) / "metrics.jsonl", env.rank, resume_step=progress.step)
    bar = reporter.bar(total=total_steps, desc="train", unit="step", initial=progress.step)
    final_eval: dict[str, float] = {}
    while progress.step < total_steps:
        t0 = time.perf_counter()
        micro = [_next_batch(batches) for _ in range(config.grad_accum)]
        lr = _learning_rate(config, progress)
        set_lr(run.optimizer, lr)
        loss, tokens = _step(run, micro, config, env)
        position = run.stream.after_steps(StreamState(progress.epoch, progress.consumed))
        progress.step += 1
        progress.epoch, progress.consumed = position.epoch, position.consumed
        progress.tokens += tokens
        rate = tokens / (time.perf_counter() - t0)
        metrics.write(
            {
                "step": progress.step,
                "loss": loss,
                "lr": lr,
                "tokens": progress.tokens,
                "tokens_per_s": rate,
                "epoch": progress.epoch,
            }
        )
        bar.set_postfix_str(f"loss {loss:.4f} | {rate:,.0f} tok/s")
        bar.update(1)
        last = progress.step == total_steps
        if (config.eval_every and progress.step % config.eval_every == 0) or last:
            final_eval = _evaluate(run, config, env)
            metrics.write({"step": progress.step, **final_eval})
            bar.write(_eval_line(progress.step, final_eval)) if reporter.enabled else None
        signum = stop.requested(env.distributed, env.device)  # every rank stops together
        if (config.save_every and progress.step % config.save_every == 0) or last or signum:
            save_checkpoint(
                config.out,
                run.model,
                run.optimizer,
                progress,
                run.fingerprint,
                config.keep_checkpoints,
                sharded=config.fsdp,
                rank=env.rank,
            )
            barrier(env)
        if signum and not last:
            raise stopped(signum, progress.step, total_steps, config.out)
    bar.close()
    return final_eval


def _step(run: _Run, micro: list[dict], config: TrainConfig, env: Env) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens)."""
    counts = [int(DistillationLoss.trained(b).sum()) for b in micro]  # trained positions
    rows = torch.tensor(float(sum(counts)), device=env.device)
    if env.distributed:
        dist.all_reduce(rows)
    scale = env.world_size / max(rows.item(), 1.0)  # DDP averages over ranks
    total = torch.zeros((), device=env.device)
    tokens = 0
    wrapped = run.wrapped
    wrapped.train()
    for i, (b, n) in enumerate(zip(micro, counts)):
        ctx = sharding.micro_batch_context(wrapped, i == len(micro) - 1, env.distributed)
        batch = {k: v.to(env.device, non_blocking=True) for k, v in b.items()}
        with ctx, run.autocast:
            loss_sum = wrapped(batch, n)
        with ctx:
            (loss_sum * scale).backward()
        total += loss_sum.detach()
        tokens += int(b["attention_mask"].sum())
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if env.distributed:
        dist.all_reduce(total)
        token_count = torch.tensor(float(tokens), device=env.device)
        dist.all_reduce(token_count)
        tokens = int(token_count.item())
    return total.item() / max(rows.item(), 1.0), tokens


def _evaluate(run: _Run, config: TrainConfig, env: Env) -> dict[str, float]:
    if run.eval_data is None:
        return {}
    with sharding.unsharded_root(run.wrapped):
        return evaluate(
            run.model,
            run.eval_data,
            batch_size=config.batch_size,
            chunk_size=config.chunk_size,
            device=env.device,
            rank=env.rank,
            world_size=env.world_size,
            autocast=run.autocast,
            tokenizer=run.tokenizer,
        )


# -- helpers of the story above ----------------------------------------------------------
def _fingerprint(
    config: TrainConfig, readers: list[CacheReader], world: int, loss: DistillationLoss
) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (caches by identity, not path)."""
    settings = resume_settings(config)
    if type(loss) is not DistillationLoss:  # another target source (train's ``loss=``)
        settings["loss_module"] = repr(loss)
    settings["cache_id"] = readers[0].spec.cache_id
    settings.pop("mix_caches")
    if len(readers) > 1:
        settings["mix_cache_ids"] = [r.spec.cache_id for r in readers[1:]]
    settings["global_batch"] = config.batch_size * config.grad_accum * world
    settings.pop("cache")
    settings.pop("batch_size")
    settings.pop("grad_accum")
    settings.update(path_settings(config))  # resolved paths, the student config by content
    # saved in checkpoints and train_config.json, so credentials in a URL are left out; a
    # resumed run computes the same redacted values, so it still compares equal
    return redact_values(settings)


def _learning_rate(config: TrainConfig, progress: TrainingProgress) -> float:
    """The schedule's rate at this step; steps past the schedule (a run resumed with a larger
    --steps) keep its last rate, so extending a run never jumps the learning rate."""
    last = progress.schedule_steps - 1
    return config.lr * lr_multiplier(
        min(progress.step, last),
        progress.schedule_steps,
        warmup=config.warmup_steps,
        schedule=config.schedule,
        min_ratio=config.min_lr_ratio,
        decay_fraction=config.decay_fraction,
    )


def _resume(config, model, optimizer, fingerprint, total_steps, reporter, env) -> TrainingProgress:
    classes = optimizer_state_classes(config.optimizer)
    progress = resume(
        config, model, optimizer, fingerprint, total_steps, reporter, classes, env.rank
    )
    if not progress.schedule_steps:  # written before the schedule's length was kept
        progress.schedule_steps = total_steps
    if total_steps > progress.schedule_steps:
        end = TrainingProgress(step=total_steps, schedule_steps=progress.schedule_steps)
        rate = _learning_rate(config, end)
        reporter.warn(
            f"--resume: this run trains to step {total_steps}, past the {progress.schedule_steps} "
            f"steps of the schedule it started with: steps after {progress.schedule_steps} keep "
            f"its last learning rate ({rate:.3g})"
        )
    return progress


def _write_config(config: TrainConfig, env: Env, fingerprint: dict, total_steps: int) -> None:
    if env.rank != 0:
        return
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {
        **config.to_dict(),
        "world_size": env.world_size,
        "total_steps": total_steps,
        "device": str(env.device),
        "fingerprint": fingerprint,
    }
    resolved["overwrite"] = False  # read back as a recipe, it never replaces a run unasked
    # never a password or token: a URL that carried one is saved as scheme://***@host/...,
    # so reading the file back with --config needs --cache (or the URL) given again
    write_run_file(out / "train_config.json", json.dumps(redact_values(resolved), indent=1))


def _loader(stream: CacheStream, config: TrainConfig) -> DataLoader:
    workers = config.loader_workers
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,  # Ctrl-C reaches workers too: the step must finish
    )


def _next_batch(batches):
    """The next micro-batch; a bad shard met by a DataLoader worker stays a one-line error."""
    try:
        return next(batches)
    except LogitcacheError as err:
        text = str(err)
        if "Original Traceback" not in text:
            raise
        # DataLoader re-raises a worker's exception with the worker's traceback as its
        # message; the original message is the last line, after "module.ClassName: ".
        last = text.strip().splitlines()[-1]
        raise type(err)(last.split(f"{type(err).__name__}: ", 1)[-1]) from None


def _eval_line(step: int, ev: dict[str, float]) -> str:
    if not ev:
        return f"step {step}: no held-out positions"
    return f"step {step}: {eval_summary(ev)}"


def _save_final(model, tokenizer, model_dir: Path, state: dict | None = None) -> None:
    """``save_pretrained`` of the model, or of ``state`` (the gathered weights of a sharded one)."""
    tmp = model_dir.parent / f".tmp-{model_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_out_of_space(err):
            raise
        last = latest_checkpoint(str(model_dir.parent))
        raise LogitcacheError(
            f"out of disk while saving the final model to {model_dir}: the last checkpoint "
            f"({last.name if last else 'none'}) is intact; free space and rerun with --resume"
        ) from None
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)


class _MetricsLog:
    """metrics.jsonl, one object per line; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, rank: int, resume_step: int) -> None:
        self.path, self.enabled = path, rank == 0
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and os.path.lexists(path):
            *rows, _torn = read_metrics(path).split(b"\n")  # a crash leaves a row unended
            kept = [row for n, row in enumerate(rows) if _step_of(row, path, n) <= resume_step]
        write_run_file(path, "".join(f"{row.decode()}\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as err:
            if not is_out_of_space(err):
                raise
            raise LogitcacheError(
                f"out of disk while writing {self.path}: free space and rerun with --resume "
                "(it continues from the last checkpoint)"
            ) from None


def _step_of(row: bytes, path: Path, n: int) -> int:
    """The step of a whole row of metrics.jsonl; anything else there is refused, naming the
    line: a run writes only objects with a step, of at most ``_MAX_ROW`` bytes."""
    try:
        step = json.loads(row).get("step") if len(row) <= _MAX_ROW else None
    except (ValueError, AttributeError, RecursionError):
        step = None
    if type(step) is not int or step < 0:
        raise LogitcacheError(
            f"metrics log {path}: line {n + 1} ({len(row):,} bytes) is not a row a run writes "
            "(an object with a step); move the file aside to resume"
        )
    return step


_MAX_ROW = 4096  # bytes; a row with every eval metric is ~300
