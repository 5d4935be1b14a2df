"""Elastic resume through torchrun (2 gloo processes on CPU): a checkpoint written by 2
processes resumes with 1 and one written by 1 resumes with 2, and the run continues with
exactly the sequences the uninterrupted run would have seen, step for step.

The global batch is the same everywhere (2 processes x batch 2 = 1 process x batch 2 x
grad-accum 2). The first run stops at step 8 (--steps 8) and the resumed one goes on to 16
(--steps may change on resume); a constant learning rate makes those two runs the same
schedule as the uninterrupted 16 steps. 49 training sequences, 4 per step: epoch 0 ends at
step 13 on one sequence, so the resumed run also crosses an epoch boundary.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from elastic import FIRST, STEPS, same_run, torchrun
from torchrun_launch import run_cli, run_torchrun


@pytest.mark.slow
def test_two_processes_resume_with_one(cli, flags, metrics, reference, tmp_path):
    out = tmp_path / "run"
    torchrun(flags(out, nproc=2, steps=FIRST, loader_workers=1))  # a DataLoader worker per rank
    state = json.loads((out / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert state["progress"] == {
        "step": 8,
        "epoch": 0,
        "consumed": 32,
        "tokens": metrics(out)[-2]["tokens"],
        "schedule_steps": FIRST,
    }
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2

    result = cli([*flags(out, nproc=1, steps=STEPS), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 1
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["epoch"] for r in rows] == [0] * 13 + [1] * 3
    same_run(reference, out, metrics, close=lambda x, y: y == pytest.approx(x, rel=1e-4))


@pytest.mark.slow
def test_one_process_resumes_with_two(cli, flags, metrics, reference, tmp_path):
    out = tmp_path / "run"
    result = cli(flags(out, nproc=1, steps=FIRST))
    assert result.exit_code == 0, result.output
    torchrun([*flags(out, nproc=2, steps=STEPS), "--resume"])
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    same_run(reference, out, metrics, close=lambda x, y: y == pytest.approx(x, rel=1e-4))


@pytest.mark.slow
def test_resume_with_another_global_batch_is_refused(cli, flags, reference, tmp_path):
    """2 processes x batch 2 x grad-accum 2 is another global batch (8): another order of
    sequences per step, so the checkpoint of the reference (4 per step) is refused."""
    out = tmp_path / "run"
    result = cli(flags(out, nproc=1, steps=FIRST))
    assert result.exit_code == 0, result.output
    args = [*flags(out, nproc=1, steps=STEPS), "--resume"]  # grad-accum 2, under 2 processes
    proc = run_cli(args)
    assert proc.returncode != 0
    assert "global_batch (4 -> 8)" in proc.stderr


def test_a_student_too_large_for_one_gpu_is_refused_before_training(
    monkeypatch, cli, flags, tmp_path
):
    """The 1-layer test student has 29,536 parameters (2 x 300 x 32 embedding and head, 10,240
    in its layer, 96 in norms): 472.6 KB of weights, gradients and AdamW moments, which a
    GPU of 256 KiB (stood in for) cannot hold; the message gives every option's arithmetic
    and the ranks and flags whose states fit (8 ranks, --fsdp with 8-bit AdamW)."""
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=256 << 10)
    )
    out = tmp_path / "run"
    result = cli([*flags(out, nproc=1, steps=1), "--device", "cuda"])
    assert result.exit_code == 1, result.output
    assert (
        "error: the student has 29,536 parameters: with DDP over 1 rank(s) it needs at least "
        "472.6 KB per GPU before activations and cuda has 262.1 KB. Per GPU: DDP (a whole "
        "student per GPU): 472.6 KB states" in result.stderr
    )
    assert "--fsdp over 2 ranks: " in result.stderr
    assert "it fits with `torchrun --nproc-per-node 8 -m logitcache.cli train ... --fsdp" in (
        result.stderr
    )
    assert not (out / "checkpoints").exists()


RESUME_APART = """
import torch.distributed as dist
from logitcache.core.errors import LogitcacheError
import torch
from logitcache.train.distributed import Env, check_ranks_resume_together

dist.init_process_group("gloo")
rank = dist.get_rank()
env = Env(rank, 2, torch.device("cpu"))
check_ranks_resume_together(8, env, "out")  # agree: passes
try:
    check_ranks_resume_together(8 * (1 - rank), env, "out")
except LogitcacheError as err:
    print(f"rank {rank} refused: {err}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_that_found_different_checkpoints_all_refuse_to_resume(tmp_path):
    """Rank 0 sees a checkpoint at step 8 and rank 1 none (an --out on a node-local disk)."""
    script = tmp_path / "apart.py"
    script.write_text(RESUME_APART)
    proc = run_torchrun(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (
            f"rank {rank} refused: --resume: the ranks found different checkpoints in out "
            "(steps 0 to 8)" in proc.stdout
        ), proc.stdout
