"""The teacher pass writes format 2 by default and format 1 on request; both store the same
content (format 2 is lossless against format 1), so a student's loss and gradients agree."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from logitcache.describe import summary_text
from logitcache.precompute import CorpusSpec, PrecomputeConfig, PrecomputeResult, run_precompute
from logitcache.precompute.config import read_recipe
from logitcache.storage import CacheReader
from logitcache.train import CacheDataset, DistillationLoss, DistillCollator


def precompute(teacher, data, out, **settings) -> PrecomputeResult:
    """The teacher pass on CPU, 64-token sequences in shards of 4."""
    config = PrecomputeConfig(
        teacher=str(teacher),
        out=str(out),
        device="cpu",
        corpus=CorpusSpec(data=(str(data),), seq_len=64),
        shard_sequences=4,
        **settings,
    )
    return run_precompute(config)


STORES = [
    pytest.param({"samples": 16}, id="sampled-counts"),
    pytest.param({"top_k": 8}, id="topk"),
    pytest.param({"samples": 8, "sampled_logprobs": True}, id="sampled-logprobs"),
]


def loss_and_grad(cache, student, tail: str) -> tuple[float, torch.Tensor]:
    ds = CacheDataset(str(cache), split="all")
    batch = DistillCollator()([ds[i] for i in range(len(ds))])
    student.zero_grad()
    loss = DistillationLoss(tail=tail)(batch, model=student)
    loss.backward()
    return loss.item(), student.lm_head.weight.grad.clone()


@pytest.mark.parametrize("store", STORES)
def test_format_2_trains_exactly_like_format_1(
    tmp_path, sharp_teacher_dir, tiny_teacher_dir, text_corpus, store
):
    caches = {}
    for version in (1, 2):
        out = tmp_path / f"v{version}"
        result = precompute(sharp_teacher_dir, text_corpus, out, format_version=version, **store)
        assert result.manifest.format_version == version
        caches[version] = out
    m1, m2 = (CacheReader(caches[v]).manifest for v in (1, 2))
    for key in ("n_tokens", "n_positions", "n_entries"):
        assert getattr(m1, key) == getattr(m2, key)
    assert m1.stats()["mean_covered_mass"] == pytest.approx(m2.stats()["mean_covered_mass"])
    assert m2.bytes < m1.bytes
    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).train()
    for tail in ("bucket", "label", "renorm"):
        loss1, grad1 = loss_and_grad(caches[1], student, tail)
        loss2, grad2 = loss_and_grad(caches[2], student, tail)
        assert loss2 == pytest.approx(loss1, rel=1e-6, abs=1e-6), tail
        torch.testing.assert_close(grad2, grad1, rtol=1e-5, atol=1e-7)


def test_format_1_on_request_and_its_recipe_says_so(tmp_path, tiny_teacher_dir, text_corpus):
    out = tmp_path / "v1"
    precompute(tiny_teacher_dir, text_corpus, out, top_k=4, format_version=1)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["format_minor"] == 2  # fingerprint_full
    assert read_recipe(str(out))["format_version"] == 1
    assert "format 1.2, id" in summary_text(CacheReader(out).manifest, str(out))  # inspect
    out2 = tmp_path / "v2"
    precompute(tiny_teacher_dir, text_corpus, out2, top_k=4)
    raw = json.loads((out2 / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["format_minor"] == 1  # fingerprint_full
    assert raw["spec"]["batch_sequences"] == 4  # the test's shard size: 4096 // 64 = 64 > 4
    assert read_recipe(str(out2))["format_version"] == 2
    assert "format 2.1, id" in summary_text(CacheReader(out2).manifest, str(out2))
