"""Shared fixtures: a tiny tokenizer trained on a paragraph and a 2-layer Llama teacher.

Everything is built in the test session; nothing is downloaded.
"""

import json
import shutil
from pathlib import Path

import pytest

PARAGRAPH = (
    "The teacher runs once over the corpus and writes what it predicts at every position. "
    "Small students then learn from those shards alone, many times, on small machines. "
    "A cache holds token ids, log probabilities and the mass that was left out. "
    "Compression keeps the shards small; hashes keep them honest; manifests keep them found. "
    "def main(): return sum(x * x for x in range(10)) if True else None\n"
    "Numbers 0123456789 and punctuation ,.;:!?()[]{}<>+-*/=_'\" also appear here.\n"
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on PARAGRAPH, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PARAGRAPH] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0, max_pos: int = 256):
    """A randomly initialised 2-layer Llama sized to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved 2-layer Llama teacher with its tokenizer, loadable by path."""
    path = tmp_path_factory.mktemp("teacher")
    model = build_model(tiny_tokenizer, seed=0)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small .txt corpus: a few documents separated by blank lines (one per line)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [
        f"Document {i}: " + PARAGRAPH.split(". ")[i % 4] + f" ({i * 7} words)." for i in range(24)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# A random-init head gives logits of std ~0.1 (32 hidden x 0.02 init): a near-uniform
# teacher (top-8 of 300 covers ~3% of the mass, KL to any student ~1e-4 nats). x30 gives
# std ~3: peaked distributions, so a sampling test can tell the teacher's distribution from
# a tempered one and a training test sees the held-out KL fall.
HEAD_SCALE = 30.0


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models are tiny; a second intra-op thread on 2 shared cores only slows them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sharp_teacher_dir(tmp_path_factory, tiny_teacher_dir) -> Path:
    """``tiny_teacher_dir`` with its LM head scaled by HEAD_SCALE (peaked distributions)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharp-teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(path)
    for file in Path(tiny_teacher_dir).iterdir():  # the tokenizer's files, unchanged
        if not (path / file.name).exists():
            shutil.copy(file, path / file.name)
    return path


@pytest.fixture(scope="session")
def student_config(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 1-layer Llama with the tokenizer's vocabulary, as a transformers config JSON."""
    path = tmp_path_factory.mktemp("student") / "student.json"
    config = {
        "model_type": "llama",
        "vocab_size": len(tiny_tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    path.write_text(json.dumps(config))
    return path
