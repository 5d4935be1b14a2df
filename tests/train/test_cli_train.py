"""``logitcache train`` from the command line: bad inputs are one ``error:`` line and exit 1,
and two DDP processes train exactly like one process accumulating the same global batch.
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torchrun_launch import run_cli

import logitcache.train.checkpoint as checkpoint
from logitcache.core.identity import tokenizer_fingerprint
from logitcache.storage import CacheReader


def refused(result, *needles: str) -> str:
    """The command failed the expected way; returns its one-line message."""
    err = result.stderr.strip()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def scratch(train_args, teacher_dir, student_config, tmp_path):
    """Arguments for a from-scratch student writing into tmp_path/run."""

    def make(cache, **flags):
        flags = {"steps": 2, **flags}
        return train_args(
            cache, tmp_path / "run", student_config=student_config, tokenizer=teacher_dir, **flags
        )

    return make


def test_tokenizer_mismatch(
    cli, train_args, topk_cache, tiny_tokenizer, text_corpus, student_config, tmp_path
):
    """A student with its own tokenizer (same recipe, vocabulary 280) is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    other = tiny_tokenizer.train_new_from_iterator([text_corpus.read_text()], vocab_size=280)
    config = {**json.loads(student_config.read_text()), "vocab_size": len(other)}
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    student = tmp_path / "student"
    model.save_pretrained(student)
    other.save_pretrained(student)
    cache_fp = CacheReader(topk_cache).spec.tokenizer["fingerprint_full"]
    student_fp = tokenizer_fingerprint(other)
    assert student_fp != cache_fp
    result = cli(train_args(topk_cache, tmp_path / "run", student=student))
    refused(result, student_fp[:16], cache_fp[:16], "--extended-vocab")


def copy_cache(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_shard(cli, scratch, topk_cache, tmp_path, workers):
    """A flipped byte fails the shard's hash, whether a DataLoader worker reads it or not."""
    cache, manifest = copy_cache(topk_cache, tmp_path)
    name = manifest["shards"][2]["path"]
    shard = cache / name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    # Every shard is read in the first epoch: 3 steps of 16 cover the 43 training sequences.
    refused(cli(scratch(cache, batch_size=16, steps=3, loader_workers=workers)), name, "sha256")


def test_incomplete_cache(cli, scratch, topk_cache, tmp_path):
    cache, manifest = copy_cache(topk_cache, tmp_path)
    manifest["complete"], manifest["n_sequences_total"] = False, None  # a pass still running
    (cache / "manifest.json").write_text(json.dumps(manifest))
    refused(cli(scratch(cache)), "incomplete")


def test_missing_cache(cli, scratch, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(cli(scratch(tmp_path / "empty")), "manifest")


def test_nothing_left_to_train_on(cli, scratch, topk_cache):
    reader = CacheReader(topk_cache)
    idx = reader.sequence_indices()
    from logitcache.train.order import heldout_mask

    assert heldout_mask(idx, 0.999).all()  # the precondition: all 55 are held out
    refused(cli(scratch(topk_cache, eval_fraction=0.999)), "--eval-fraction", "55 sequences")


def test_student_shorter_than_the_cache(
    cli, train_args, topk_cache, teacher_dir, student_config, tmp_path
):
    short = tmp_path / "short.json"
    short.write_text(
        json.dumps({**json.loads(student_config.read_text()), "max_position_embeddings": 16})
    )
    args = train_args(topk_cache, tmp_path / "run", student_config=short, tokenizer=teacher_dir)
    refused(cli(args), "max_position_embeddings (16)", "(32)")


def test_resume_with_other_settings(cli, scratch, topk_cache, tmp_path):
    assert cli(scratch(topk_cache)).exit_code == 0
    refused(cli(scratch(topk_cache, lr=5e-3, resume=True)), "lr (0.01 -> 0.005)")
    # What may change on resume is accepted: more steps, another eval cadence.
    result = cli(scratch(topk_cache, steps=3, eval_every=1, resume=True))
    assert result.exit_code == 0, result.output


def test_out_of_disk_while_checkpointing(
    monkeypatch, cli, scratch, topk_cache, student_config, tmp_path
):
    """The second checkpoint hits ENOSPC: the first one stays intact and resumable."""
    from transformers import AutoConfig, AutoModelForCausalLM

    calls = []
    save_model = checkpoint.save_model

    def full_disk(model, path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return save_model(model, path, *args, **kw)

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    out = tmp_path / "run"
    result = cli(scratch(topk_cache, steps=4, save_every=2))
    refused(result, "out of disk", "step 4", "step-0000002", "intact", "--resume")
    assert len(calls) == 2
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())

    # The previous checkpoint loads, and --resume finishes from it.
    previous = checkpoint.latest_checkpoint(str(out))
    assert previous.name == "step-0000002"
    config = json.loads(student_config.read_text())
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices}, {"params": vectors}])
    progress, _ = checkpoint.load_checkpoint(previous, model, optimizer)
    assert progress.step == 2 and progress.consumed == 8
    monkeypatch.undo()
    result = cli(scratch(topk_cache, steps=4, save_every=2, resume=True))
    assert result.exit_code == 0, result.output
    assert checkpoint.latest_checkpoint(str(out)).name == "step-0000004"


# -- DDP -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_matches_gradient_accumulation(
    cli, train_args, metrics, topk_cache, teacher_dir, student_config, tmp_path
):
    """2 gloo processes x batch 2 = 1 process x batch 2 x grad-accum 2, step by step.

    49 training sequences at --eval-fraction 0.1: step 13 ends the epoch on one sequence,
    so rank 1's micro-batch there is empty; steps 14-16 run in epoch 1.
    """
    common = dict(
        student_config=student_config,
        tokenizer=teacher_dir,
        steps=16,
        batch_size=2,
        eval_fraction=0.1,
        eval_every=8,
        save_every=8,
    )
    single = tmp_path / "single"
    assert cli(train_args(topk_cache, single, grad_accum=2, **common)).exit_code == 0

    ddp = tmp_path / "ddp"
    args = train_args(topk_cache, ddp, **common)
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = metrics(single), metrics(ddp)
    assert [r["step"] for r in one] == [r["step"] for r in two]  # eval rows from rank 0 only
    assert [r.get("epoch") for r in two if "loss" in r] == [0] * 13 + [1] * 3
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "eval_kl", "eval_ce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        if "tokens" in a:
            assert a["tokens"] == b["tokens"]
    wa = load_file(single / "model" / "model.safetensors")
    wb = load_file(ddp / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa)
    assert json.loads((ddp / "train_config.json").read_text())["world_size"] == 2
