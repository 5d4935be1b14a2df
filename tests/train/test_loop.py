"""The training loop end to end: a student learns the teacher, its outputs load, and a run
interrupted after a checkpoint resumes to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import logitcache.train.loop as loop
from logitcache.core.errors import LogitcacheError
from logitcache.train import DistillationLoss, TrainConfig, train
from logitcache.train.checkpoint import latest_checkpoint
from logitcache.train.dataset import CacheDataset
from logitcache.train.order import StreamState

STEPS = 12


def test_student_learns_the_teacher(
    cli, train_args, metrics, topk_cache, teacher_dir, student_config, tmp_path
):
    """From scratch: the held-out KL to the teacher falls, and the outputs load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = cli(
        train_args(
            topk_cache,
            out,
            student_config=student_config,
            tokenizer=teacher_dir,
            steps=30,
            eval_every=10,
            loader_workers=1,
        )
    )
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_kl" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[0]["eval_positions"] == 12 * 31  # 12 held-out sequences of 32 tokens
    assert evals[-1]["eval_kl"] < 0.7 * evals[0]["eval_kl"]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])

    saved = json.loads((out / "train_config.json").read_text())
    assert saved["total_steps"] == 30 and saved["world_size"] == 1
    assert saved["student_config"] == str(student_config)

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1
    ids = tokenizer("The teacher runs once", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_pretrained_student(cli, train_args, metrics, topk_cache, teacher_dir, tmp_path):
    """The teacher itself as the student: its KL to its own cache is only the codec's error."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = cli(train_args(topk_cache, out, student=teacher_dir, steps=2, lr=1e-6))
    assert result.exit_code == 0, result.output
    (final,) = [r for r in metrics(out) if "eval_kl" in r]
    assert 0 <= final["eval_kl"] < 1e-2
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2


def test_one_epoch_by_default(
    cli, train_args, metrics, topk_cache, teacher_dir, student_config, tmp_path
):
    """No --steps: one epoch of 43 training sequences in micro-batches of 4 = 11 steps."""
    out = tmp_path / "run"
    result = cli(
        train_args(topk_cache, out, student_config=student_config, tokenizer=teacher_dir, lr=1e-3)
    )
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 11 and {r["epoch"] for r in rows} == {0}
    assert rows[-1]["tokens"] == 42 * 32 + 9  # the last sequence of the corpus is 9 tokens


def test_target_flag_reaches_the_stream(
    monkeypatch, sampled_cache, teacher_dir, student_config, tmp_path
):
    seen = []

    def spy(*args, **kw):
        seen.append((kw["split"], kw.get("target", "auto")))
        return CacheDataset(*args, **kw)

    monkeypatch.setattr(loop, "CacheDataset", spy)
    config = TrainConfig(
        cache=str(sampled_cache),
        out=str(tmp_path),
        student_config=str(student_config),
        tokenizer=str(teacher_dir),
        target="counts",
        steps=1,
        batch_size=2,
        loader_workers=0,
        quiet=True,
    )
    train(config)
    assert seen[0] == ("train", "counts")


def test_an_empty_micro_batch_still_reaches_every_parameter(topk_cache, student_config):
    """A rank past the end of an epoch gets no sequences; under DDP its backward must still
    produce a gradient for every parameter, or the ranks' all-reduces stop matching."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from logitcache.train import DistillationLoss
    from logitcache.train.student import DistillModule

    config = json.loads(student_config.read_text())
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    module = DistillModule(model, DistillationLoss(chunk_size=64))
    data = CacheDataset(str(topk_cache), eval_fraction=0.2, vocab_limit=300)
    rank1 = data.stream(batch_size=4, start=StreamState(), rank=1, world_size=2, epochs=1)
    *_, empty = rank1  # 43 = 5 * 8 + 3 training sequences: rank 1 gets none of the last 3
    assert empty["index"].tolist() == [-1]
    n = int(DistillationLoss.trained(empty).sum())
    loss = module(empty, n)
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


# -- resume --------------------------------------------------------------------------------
class Crash(Exception):
    """Stands in for a killed process."""


def crash_after(monkeypatch, step: int, *, checkpointed: bool = False) -> None:
    """The run dies once step ``step`` is logged, or once it is also checkpointed."""
    monkeypatch.undo()
    write, save = loop._MetricsLog.write, loop.save_checkpoint

    def dying_write(self, row):
        write(self, row)
        if row["step"] == step and "loss" in row and not checkpointed:
            raise Crash(f"killed after step {step}")

    def dying_save(out, model, optimizer, progress, *args, **kwargs):
        path = save(out, model, optimizer, progress, *args, **kwargs)
        if progress.step == step:
            raise Crash(f"killed after checkpointing step {step}")
        return path

    monkeypatch.setattr(loop._MetricsLog, "write", dying_write)
    monkeypatch.setattr(loop, "save_checkpoint", dying_save)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli, train_args, topk_cache, teacher_dir, student_config):
    """An uninterrupted run of STEPS steps (the output dir and its flags)."""

    def flags(out):
        return train_args(
            topk_cache,
            out,
            student_config=student_config,
            tokenizer=teacher_dir,
            steps=STEPS,
            save_every=4,
            eval_every=4,
            batch_size=3,
        )

    out = tmp_path_factory.mktemp("reference")
    result = cli(flags(out))
    assert result.exit_code == 0, result.output
    return out, flags


def in_process(flags: list[str]) -> TrainConfig:
    """The TrainConfig the CLI builds from ``flags``."""
    import click

    from logitcache.cli import train as command
    from logitcache.cli import train_config

    ctx = command.make_context("train", flags[1:])
    assert isinstance(ctx, click.Context)
    return train_config(ctx.params)


def same_run(a, b, metrics) -> None:
    """Equal weights and the same loss and eval at every step (timings aside)."""
    wa = load_file(a / "model" / "model.safetensors")
    wb = load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(metrics(a)) == strip(metrics(b))


def test_resume_after_a_crash(monkeypatch, cli, metrics, reference, tmp_path):
    """Killed at step 6 (checkpoint at 4): --resume redoes 5-6 and ends like the reference."""
    ref, flags = reference
    out = tmp_path / "run"
    crash_after(monkeypatch, 6)
    with pytest.raises(Crash):
        train(in_process(flags(out)))
    assert latest_checkpoint(str(out)).name == "step-0000004"
    assert max(r["step"] for r in metrics(out)) == 6
    monkeypatch.undo()
    result = cli([*flags(out), "--resume"])
    assert result.exit_code == 0, result.output
    same_run(ref, out, metrics)


def test_resume_twice(monkeypatch, cli, metrics, reference, tmp_path):
    ref, flags = reference
    out = tmp_path / "run"
    crash_after(monkeypatch, 4, checkpointed=True)
    with pytest.raises(Crash):
        train(in_process(flags(out)))
    crash_after(monkeypatch, 11)
    with pytest.raises(Crash):
        train(in_process([*flags(out), "--resume"]))
    assert latest_checkpoint(str(out)).name == "step-0000008"
    monkeypatch.undo()
    result = cli([*flags(out), "--resume"])
    assert result.exit_code == 0, result.output
    same_run(ref, out, metrics)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-0000008", "step-0000012"]  # --keep-checkpoints 2


def test_resume_without_a_checkpoint_starts_afresh(cli, metrics, reference, tmp_path):
    ref, flags = reference
    out = tmp_path / "run"
    result = cli([*flags(out), "--resume"])
    assert result.exit_code == 0, result.output
    same_run(ref, out, metrics)


class _Half(DistillationLoss):
    """Another target source for ``train(loss=...)``: half the cached targets' loss."""

    def forward(self, batch, **kwargs):
        return 0.5 * super().forward(batch, **kwargs)


def test_a_loss_given_to_train_is_used_and_resumes_only_with_itself(
    monkeypatch, metrics, reference, tmp_path
):
    """``train(config, loss=...)`` trains against that loss; killed at step 6, a resume
    without it is refused and one with it ends like an uninterrupted run."""
    default_ref, flags = reference
    ref = tmp_path / "ref"
    config = in_process(flags(ref))
    train(config, loss=_Half.from_config(config))
    first = lambda out: next(r["loss"] for r in metrics(out) if "loss" in r)  # noqa: E731
    assert first(ref) == pytest.approx(0.5 * first(default_ref), rel=1e-5)
    out = tmp_path / "run"
    crash_after(monkeypatch, 6)
    with pytest.raises(Crash):
        config = in_process(flags(out))
        train(config, loss=_Half.from_config(config))
    monkeypatch.undo()
    resumed = in_process([*flags(out), "--resume"])
    with pytest.raises(LogitcacheError, match=r"settings differ.*loss_module"):
        train(resumed)
    train(resumed, loss=_Half.from_config(resumed))
    same_run(ref, out, metrics)
