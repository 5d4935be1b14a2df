"""``DistillationLoss`` on collated batches equals a reference written from the raw records.

The reference builds each trained position's targets straight from a ``SequenceRecord``
(entries of position p, ``exp`` of the stored log-probs, its tail mass) and runs
``distill_loss`` on the student's full logits; the module under test sees only the
``DistillCollator`` batch, and runs in chunks of 7 rows through the LM head. Values and
gradients agree to 1e-6, in every input form, and equal the trainer's ``DistillModule``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logitcache.storage import CacheReader
from logitcache.train import CacheDataset, DistillationLoss, DistillCollator
from logitcache.train.losses import TeacherTargets, cross_entropy_sum, distill_loss
from logitcache.train.student import DistillModule

SEQUENCES = (54, 3, 20)  # 54 is the short last one: padding in the batch
SETTINGS = [
    {"loss": "forward-kl"},
    {"loss": "reverse-kl", "tail": "label", "temperature": 2.0, "alpha": 0.3},
    {"loss": "jsd", "tail": "renorm", "beta": 0.3},
    {"loss": "tvd"},
    {"loss": "ce"},
]


@pytest.fixture(scope="module")
def student(student_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(student_config.read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    return model.double()  # float64: the comparison measures the code, not float32 noise


def reference(model, reader: CacheReader, settings: dict) -> torch.Tensor:
    """Summed loss over the trained positions, from the records and full logits."""
    total = torch.zeros((), dtype=torch.float64)
    for i in SEQUENCES:
        r = reader.read(i)
        ids = torch.from_numpy(r.input_ids.astype(np.int64))[None]
        logits = model(input_ids=ids).logits[0]  # [T, V]
        positions = np.flatnonzero(r.loss_mask[1:])  # p predicts token p + 1
        k = int(r.n_entries.max())
        t_ids = np.zeros((len(positions), k), dtype=np.int64)
        t_probs = np.zeros((len(positions), k))
        t_valid = np.zeros((len(positions), k), dtype=bool)
        for row, p in enumerate(positions):
            lo, hi = r.offsets[p], r.offsets[p + 1]
            t_ids[row, : hi - lo] = r.ids[lo:hi]
            t_probs[row, : hi - lo] = np.exp(r.logprobs[lo:hi])  # float32, as stored and read
            t_valid[row, : hi - lo] = True
        labels = torch.from_numpy(r.input_ids[positions + 1].astype(np.int64))
        rows = logits[torch.from_numpy(positions)]
        if settings["loss"] == "ce":
            total = total + cross_entropy_sum(rows, labels)
            continue
        targets = TeacherTargets(
            torch.from_numpy(t_ids),
            torch.from_numpy(t_probs),
            torch.from_numpy(t_valid),
            torch.from_numpy(r.tail_mass[positions].astype(np.float64)),
            labels,
        )
        total = total + distill_loss(rows, targets, **settings)
    return total


def grads(model, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["loss"])
def test_loss_and_gradients_equal_the_reference(topk_cache, student, settings):
    reader = CacheReader(topk_cache)
    data = CacheDataset(str(topk_cache), split="all", vocab_limit=300)
    batch = DistillCollator()([data[i] for i in SEQUENCES])
    batch["teacher_probs"] = batch["teacher_probs"].double()
    batch["teacher_tail"] = batch["teacher_tail"].double()
    n = int(DistillationLoss.trained(batch).sum())
    assert n == sum(int(reader.read(i).loss_mask[1:].sum()) for i in SEQUENCES)
    loss_fn = DistillationLoss(**settings, chunk_size=7)

    want = reference(student, reader, settings)
    want_grads = grads(student, want)
    got = {
        "model": loss_fn(batch, model=student, reduction="sum"),
        "trainer": DistillModule(student, loss_fn)(batch, n),
        "mean": loss_fn(batch, model=student) * n,
    }
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    got["hidden+weight"] = loss_fn(
        batch, hidden=hidden.last_hidden_state, head=student.lm_head.weight, reduction="sum"
    )
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got["logits"] = loss_fn(batch, logits=logits, reduction="sum")
    for form, loss in got.items():
        assert loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9), form
        names = [name for name, _ in student.named_parameters()]
        for name, g, w in zip(names, grads(student, loss), want_grads, strict=True):
            assert torch.allclose(g, w, rtol=1e-6, atol=1e-9), (form, name, (g - w).abs().max())


def test_a_batch_with_nothing_trained_still_reaches_every_parameter(topk_cache, student):
    empty = DistillCollator()([])  # what a rank past the end of an epoch gets
    loss = DistillationLoss()(empty, model=student, reduction="sum")
    assert loss.item() == 0.0
    for name, g in zip([n for n, _ in student.named_parameters()], grads(student, loss)):
        assert g is not None and not g.any(), name


def test_bad_arguments(topk_cache):
    batch = DistillCollator()([CacheDataset(str(topk_cache), split="all")[0]])
    with pytest.raises(ValueError, match="exactly one"):
        DistillationLoss()(batch)
    with pytest.raises(ValueError, match="head="):
        DistillationLoss()(batch, hidden=torch.zeros(1, 32, 4))
    with pytest.raises(ValueError, match=r"unknown loss 'kl'; expected one of .*, ce$"):
        DistillationLoss("kl")  # every name it takes, ce (cross-entropy only) included
    with pytest.raises(ValueError, match="reduction"):
        DistillationLoss()(batch, logits=torch.zeros(1, 32, 300), reduction="none")
