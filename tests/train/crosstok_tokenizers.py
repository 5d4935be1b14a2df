"""Tiny tokenizers of other families than the caches' (byte-level BPE, vocabulary 300),
trained in the test session on the same paragraph: a SentencePiece-style one (``▁`` for a
space, ``<0xNN>`` byte fallback) and a byte-level BPE with other merges."""

from __future__ import annotations

import functools
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


@functools.cache  # trained once per session; callers only read it
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


@functools.cache
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


# -- tokenizers spelled out by hand, for alignments checked by hand -----------------------
def hand_teacher():
    """A byte-level BPE whose tokens are chosen for the hand-checked rows: the bytes of each
    are spelled in the comments (GPT-2's table: Ġ = space, Ã¯ = ï = C3 AF, æĹ¥ = 日 = E6 97
    A5, æľ¬ = 本 = E6 9C AC)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merged = [
        "na",  # 6E 61
        "Ã¯v",  # C3 AF 76: ï and v
        "ĠæĹ",  # 20 E6 97: a space and the first two bytes of 日
        "¥æľ¬",  # A5 E6 9C AC: the last byte of 日, and 本
    ]
    vocab = {tok: i for i, tok in enumerate(["<|eos|>", "<|user|>", *sorted(alphabet), *merged])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    return fast


def hand_student():
    """SentencePiece-style BPE with byte fallback: "naïve 日本" is [na][ï][ve][▁日] and 本 as
    its three byte pieces [<0xE6>][<0x9C>][<0xAC>]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += ["\u2581", "n", "a", "ï", "v", "e", "日", "na", "ve", "\u2581日"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("n", "a"), ("v", "e"), ("\u2581", "日")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
