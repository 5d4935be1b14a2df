"""Tiny tokenizers of other families than the caches' (byte-level BPE, vocabulary 300),
trained in the test session on the same paragraph: a SentencePiece-style one (``▁`` for a
space, ``<0xNN>`` byte fallback) and a byte-level BPE with other merges."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def _paragraph() -> str:
    """tests/conftest.py's PARAGRAPH (the caches' tokenizer was trained on it)."""
    spec = importlib.util.spec_from_file_location(
        "_root_conftest", Path(__file__).parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PARAGRAPH


PARAGRAPH = _paragraph()


def build_sentencepiece_tokenizer(vocab_size: int = 160):
    """BPE over ``▁``-joined words with byte fallback (Llama 2 / Gemma style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "</s>", "<|end|>"], show_progress=False
    )
    tok.train_from_iterator([PARAGRAPH] * 4, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # the byte pieces, as ordinary tokens after the learned ones
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    built = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=built, eos_token="</s>", unk_token="<unk>")


def build_other_bpe_tokenizer(vocab_size: int = 400):
    """Byte-level BPE like the caches' but trained on the paragraph's words in reverse
    order, with a larger vocabulary: other merges, other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = " ".join(reversed(PARAGRAPH.split(" ")))
    tok.train_from_iterator([text] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
