"""benchmarks/online_kd.py: the studies' online teacher is the full-vocabulary KL of a
teacher held in memory, outside the module's parameters."""

import pytest
import torch
from online_kd import OnlineKD
from transformers import AutoModelForCausalLM

from logitcache.train import TrainConfig


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (2.0, 0.3)])
def test_online_kd_is_the_dense_full_vocabulary_loss(tiny_teacher_dir, temperature, alpha):
    config = TrainConfig(cache="c", out="o", temperature=temperature, alpha=alpha, chunk_size=3)
    loss = OnlineKD.load(str(tiny_teacher_dir), config)
    assert list(loss.parameters()) == [] and str(tiny_teacher_dir) in repr(loss)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(teacher.config)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 6))
    labels = ids.clone()
    labels[0, 2] = -100  # position 1 is not trained
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    got = loss(batch, model=student, reduction="sum")

    trained = labels[:, 1:] != -100  # [B, L-1]
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=ids).logits[:, :-1][trained] / temperature, -1)
    logits = student(input_ids=ids).logits[:, :-1][trained].double()
    logq = torch.log_softmax(logits / temperature, -1)
    kl = (p * (p.log() - logq)).sum()
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:][trained], reduction="sum")
    want = (1 - alpha) * temperature**2 * kl + alpha * ce
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert loss(batch, model=student).item() == pytest.approx(want.item() / 9, rel=1e-4)
