"""The Hugging Face ``Trainer`` path: ``DistillationTrainer`` + ``CacheDataset``.

Its first loss equals ``logitcache train``'s on the same student (same batch: the sampler
follows the trainer's order), it saves with ``save_pretrained``, ``resume_from_checkpoint``
continues the data where it stopped (no sequence dropped or repeated, across an epoch
boundary), and a PEFT model trains through it.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from logitcache.train import CacheDataset, DistillationLoss, TrainConfig, evaluate, train
from logitcache.train.hf import DistillationTrainer

EVAL_FRACTION = 0.2  # 43 training sequences: 11 micro-batches of 4, the last of 3


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, student_config, teacher_dir):
    """A from-scratch 1-layer student saved with the cache's tokenizer (fixed weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = json.loads(student_config.read_text())
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    path = tmp_path_factory.mktemp("hf-student")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    return path


class Recorder(DistillationTrainer):
    """Records the sequences and the loss of every micro-batch it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.seen.append(inputs["index"].tolist())
            self.losses.append(float(loss.detach()))
        return loss


def trainer(student, cache, out, **args):
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = (
        student if not isinstance(student, str) else AutoModelForCausalLM.from_pretrained(student)
    )
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(args)
    data = CacheDataset(str(cache), eval_fraction=EVAL_FRACTION, vocab_limit=300)
    return Recorder(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=data,
        distillation_loss=DistillationLoss("forward-kl"),
    )


def test_first_loss_equals_logitcache_train(topk_cache, student_dir, tmp_path, metrics):
    out = tmp_path / "cli"
    config = TrainConfig(
        cache=str(topk_cache),
        out=str(out),
        student=str(student_dir),
        steps=1,
        batch_size=4,
        eval_fraction=EVAL_FRACTION,
        loader_workers=0,
        quiet=True,
    )
    train(config)
    (first,) = [r["loss"] for r in metrics(out) if "loss" in r]
    hf = trainer(str(student_dir), topk_cache, tmp_path / "hf", max_steps=2)
    hf.train()
    assert hf.losses[0] == pytest.approx(first, rel=1e-6)
    logged = [h["loss"] for h in hf.state.log_history if "loss" in h]
    assert logged[0] == pytest.approx(first, rel=1e-6)
    hf.save_model(str(tmp_path / "saved"))
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), hf.model.parameters()))


def test_resume_from_checkpoint_continues_the_data(topk_cache, student_dir, tmp_path):
    """14 steps (an epoch is 11), checkpoints at 6 and 12: a run resumed from either trains
    on exactly the sequences and losses of the uninterrupted run from there on."""
    full = trainer(
        str(student_dir),
        topk_cache,
        tmp_path / "full",
        max_steps=14,
        save_strategy="steps",
        save_steps=6,
    )
    full.train()
    first_epoch = [i for batch in full.seen[:11] for i in batch]
    training = CacheDataset(str(topk_cache), eval_fraction=EVAL_FRACTION)
    assert sorted(first_epoch) == sorted(int(training[i]["index"]) for i in range(len(training)))
    assert len(first_epoch) == len(set(first_epoch)) == 43
    for step in (6, 12):
        resumed = trainer(
            str(student_dir), topk_cache, tmp_path / "full", max_steps=14, save_strategy="no"
        )
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
        assert resumed.seen == full.seen[step:]
        assert resumed.losses == pytest.approx(full.losses[step:], rel=1e-6)


def test_a_peft_model_trains_through_the_trainer(topk_cache, student_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(student_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    hf = trainer(model, topk_cache, tmp_path / "hf", max_steps=3)
    hf.train()
    assert len(hf.losses) == 3 and all(torch.isfinite(torch.tensor(hf.losses)))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: it learned
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    hf.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def documented_arguments() -> dict:
    """The literal keyword arguments of docs/api.md's ``TrainingArguments(...)`` in its
    Hugging Face ``Trainer`` example (the ones that make it ``logitcache train``'s run)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text.split("## Hugging Face `Trainer`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (call,) = [
        n
        for n in ast.walk(ast.parse(code))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "TrainingArguments"
    ]
    literal = lambda node: not isinstance(node, ast.Subscript)  # noqa: E731 (os.environ[...])
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if literal(kw.value)}


def test_documented_arguments_give_logitcache_trains_loss_curve(
    topk_cache, student_dir, tmp_path, metrics
):
    """docs/api.md's arguments, at this test's batch size, learning rate and length: the
    same loss at every step of two epochs (22 steps, the last of each epoch short). Both
    compute in float32 on one thread; the CLI sums its loss in float64 and torch's fused
    and for-each AdamW round differently, so the curves part at ~1e-7 relative: 1e-5 is
    that with room, and ~100x below what a differing default (seed, beta2, the schedule's
    floor, weight decay) makes by the second step."""
    args = documented_arguments()
    out = tmp_path / "cli"
    train(
        TrainConfig(
            cache=str(topk_cache),
            out=str(out),
            student=str(student_dir),
            epochs=2,
            batch_size=4,
            lr=1e-2,
            eval_fraction=EVAL_FRACTION,
            loader_workers=0,
            quiet=True,
        )
    )
    cli = [r["loss"] for r in metrics(out) if "loss" in r]
    for key in ("logging_steps", "save_steps", "eval_strategy", "eval_steps"):
        args.pop(key, None)
    args.update(per_device_train_batch_size=4, learning_rate=1e-2, num_train_epochs=2)
    hf = trainer(str(student_dir), topk_cache, tmp_path / "hf", **args)
    hf.train()
    assert len(hf.losses) == len(cli) == 22
    assert hf.losses == pytest.approx(cli, rel=1e-5)


def test_eval_loss_is_the_training_loss_on_the_eval_split(topk_cache, student_dir, tmp_path):
    """As docs/api.md defines it: with the default loss, ``evaluate()``'s ``eval_kl`` (every
    sequence of this packed cache has 31 trained positions, so the Trainer's weighting of
    its batches by sequence count is the plain mean per position)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    held_out = CacheDataset(
        str(topk_cache), split="eval", eval_fraction=EVAL_FRACTION, vocab_limit=300
    )
    hf = trainer(model, topk_cache, tmp_path / "hf", per_device_eval_batch_size=3)
    got = hf.evaluate(eval_dataset=held_out)["eval_loss"]
    assert got == pytest.approx(evaluate(model, held_out)["eval_kl"], rel=1e-6)
