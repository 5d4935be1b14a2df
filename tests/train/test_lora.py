"""``logitcache train --lora-r``: adapters on a pretrained tiny Llama, saved, merged, resumed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")


def test_lora_trains_adapters_only_and_saves_them(
    cli, train_args, metrics, topk_cache, teacher_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    flags = train_args(
        topk_cache,
        out,
        student=teacher_dir,
        steps=2,
        save_every=1,
        lora_r=4,
        lora_targets="q_proj,v_proj",
        merge_lora=True,
    )
    result = cli(flags)
    assert result.exit_code == 0, result.output
    assert (out / "model" / "adapter_config.json").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    adapters = load_file(out / "model" / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    assert {k.split(".")[-3] for k in adapters} == {"q_proj", "v_proj"}

    base = AutoModelForCausalLM.from_pretrained(teacher_dir)
    merged = AutoModelForCausalLM.from_pretrained(out / "model-merged")
    same = {n for n, p in merged.named_parameters() if torch.equal(p, base.get_parameter(n))}
    changed = {n for n, _ in merged.named_parameters()} - same
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    with_adapter = peft.PeftModel.from_pretrained(base, out / "model").merge_and_unload()
    assert all(
        torch.allclose(p, merged.get_parameter(n), atol=1e-6)
        for n, p in with_adapter.named_parameters()
    )


def test_lora_resumes_exactly(cli, train_args, metrics, topk_cache, teacher_dir, tmp_path):
    """2 steps, then --resume to 4: the adapters and the losses of an uninterrupted run."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    flags = dict(student=teacher_dir, save_every=2, lora_r=2, schedule="constant")
    assert cli(train_args(topk_cache, ref, steps=4, **flags)).exit_code == 0
    assert cli(train_args(topk_cache, out, steps=2, **flags)).exit_code == 0
    result = cli(train_args(topk_cache, out, steps=4, resume=True, **flags))
    assert result.exit_code == 0, result.output
    losses = lambda run: [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]  # noqa: E731
    assert losses(out) == losses(ref) and len(losses(out)) == 4
    a, b = (load_file(run / "model" / "adapter_model.safetensors") for run in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"lora_alpha": 8}, "need --lora-r"),
        ({"lora_r": -1}, "--lora-r must be >= 0"),
        ({"lora_r": 2, "lora_targets": "no_such_proj"}, "--lora-targets no_such_proj"),
    ],
)
def test_bad_lora_flags(cli, train_args, topk_cache, teacher_dir, tmp_path, flags, message):
    result = cli(train_args(topk_cache, tmp_path / "run", student=teacher_dir, steps=1, **flags))
    assert result.exit_code == 1 and message in result.stderr, result.output
