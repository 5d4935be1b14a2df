"""The teacher pass's memory: logits exist a chunk of positions at a time, bytes unchanged.

A batch's full logits [B, W, V] were the pass's peak (SmolLM2-135M, 16,384 tokens: 3.2 GB,
and as much again for a copy); now the output head runs on chunks of last hidden states.
Chunking must not change a byte of the cache, nor a draw of sampled mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from logitcache.models import split_output_head
from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute, sparse
from logitcache.precompute import run as run_module

SEQ_LEN = 256  # the corpus packs into sequences of several 64-row chunks...
# ...and a last one of 66 tokens: 65 positions, a chunk of 64 and one of 1 (a 1-row matmul
# rounds differently from a many-row one on CPU, so the head must see whole 64-row blocks)
MAX_TOKENS = 2 * SEQ_LEN + 66


def precompute(teacher: Path, data: Path, out: Path, **settings) -> dict[str, bytes]:
    """Run the pass on CPU; the shards' bytes by file name."""
    config = PrecomputeConfig(
        teacher=str(teacher),
        out=str(out),
        device="cpu",
        shard_sequences=2,
        corpus=CorpusSpec(data=(str(data),), seq_len=SEQ_LEN, max_tokens=MAX_TOKENS),
        **settings,
    )
    run_precompute(config)
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def small_chunks(monkeypatch, rows: int = 64) -> None:
    """Chunks of ``rows`` positions (the smallest there are) for the tiny vocabulary."""
    monkeypatch.setattr(sparse, "_CPU_ROW_BUDGET", rows * 300)


@contextlib.contextmanager
def head_outputs() -> Iterator[list[tuple[int, ...]]]:
    """The shapes of every [..., V=300] tensor a module returns meanwhile (the head's logits)."""
    shapes: list[tuple[int, ...]] = []

    def record(module, args, out):
        if isinstance(out, torch.Tensor) and out.shape[-1] == 300:
            shapes.append(tuple(out.shape))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield shapes
    finally:
        hook.remove()


MODES = [
    {"top_k": 8},
    {"top_k": 8, "dtype": "bfloat16", "format_version": 1},
    {"samples": 16, "sampled_logprobs": True, "logprob_codec": "float32"},
    {"samples": 16, "dtype": "bfloat16", "format_version": 1},
]


@pytest.mark.parametrize(
    "settings", MODES, ids=["topk", "topk-bf16-f1", "sampled-lp", "sampled-bf16-f1"]
)
def test_chunked_logits_write_the_bytes_of_whole_logits(
    settings, monkeypatch, tmp_path, sharp_teacher_dir, text_corpus
):
    """Whole logits from the full forward (the unsplit path, as before chunking) vs the head
    applied to 64-position chunks: the same bytes, draws included."""
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "split_output_head", lambda model, device: None)
        whole = precompute(sharp_teacher_dir, text_corpus, tmp_path / "whole", **settings)
    small_chunks(monkeypatch)
    with head_outputs() as calls:
        chunked = precompute(sharp_teacher_dir, text_corpus, tmp_path / "chunked", **settings)
    assert chunked == whole
    # the probe's 8 tokens, then chunks of at most 64 positions: never a batch's [B, W, V]
    assert calls[0] == (1, 8, 300) and max(shape[0] for shape in calls[2:]) == 64, calls


def test_the_head_never_sees_a_whole_batch(monkeypatch, tmp_path, sharp_teacher_dir, text_corpus):
    """--batch-tokens 4096 (all sequences in one forward): the output head still makes logits
    for at most a chunk of positions (64 here) per call."""
    small_chunks(monkeypatch)
    with head_outputs() as calls:
        precompute(sharp_teacher_dir, text_corpus, tmp_path / "c", top_k=8, batch_tokens=4096)
    rows = [math.prod(shape[:-1]) for shape in calls]
    assert rows and max(rows) <= 64, calls


def test_cpu_draws_do_not_depend_on_rows_per_multinomial_call():
    """The CPU chunk size may differ from the accelerators' because the CPU generator draws row
    after row: one call over all rows or one per 7 rows gives the same numbers."""
    probs = torch.rand(50, 300).softmax(-1)
    gen = torch.Generator().manual_seed(5)
    whole = torch.multinomial(probs, 64, replacement=True, generator=gen)
    gen.manual_seed(5)
    parts = [
        torch.multinomial(probs[i : i + 7], 64, replacement=True, generator=gen)
        for i in range(0, 50, 7)
    ]
    assert torch.equal(whole, torch.cat(parts))


def test_a_teacher_that_changes_its_logits_after_the_head_is_not_split(tiny_tokenizer):
    """Gemma 2 soft-caps its head's logits: splitting it would store other numbers, so the
    probe refuses it and the pass keeps the full forward's logits; a Llama splits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = dict(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    capped = Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.5)).eval()
    plain = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    assert split_output_head(capped, torch.device("cpu")) is None
    split = split_output_head(plain, torch.device("cpu"))
    assert split is not None and split.vocab == len(tiny_tokenizer)
