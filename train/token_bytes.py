"""The exact bytes of every token of a Hugging Face tokenizer: one table for alignment and
for bits per byte.

In: a transformers tokenizer (fast, with a ``backend_tokenizer``, or any with
``convert_ids_to_tokens``). Out: ``TokenBytes``, per id its byte string, whether it is
special (no bytes: ``<|eos|>``, ``<s>``, chat markers) and its byte length.

Three spellings of bytes are read: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: every
byte is a printable character of the GPT-2 byte <-> unicode table, ``Ġ`` for a space);
SentencePiece (Llama 2, Gemma: ``▁`` for a space, ``<0xNN>`` byte-fallback pieces); and
plain text (WordPiece-free vocabularies, added tokens). Special tokens carry no bytes of
the text: they are flagged, and alignment maps them by their content.

A tokenizer may come from a cache (outside data): a token longer than
``MAX_TOKEN_BYTES`` is refused with a one-line ``LogitcacheError``, so one row of a cache
never expands to more than ``seq_len * MAX_TOKEN_BYTES`` bytes.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitcache.errors import LogitcacheError

__all__ = ["MAX_TOKENS", "MAX_TOKEN_BYTES", "TokenBytes", "byte_decoder", "token_bytes"]

MAX_TOKEN_BYTES = 1024
"""Longest token accepted, in bytes. Real vocabularies stop near 128 (runs of spaces or
dashes in code tokenizers; Gemma's longest piece is 93 bytes); 1024 bounds a 2048-token row
at 2 MiB of text whatever a stored tokenizer says."""

MAX_TOKENS = 1 << 21
"""Largest vocabulary accepted (2,097,152; the largest real ones hold ~262k): its table costs
~50 B a token."""

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SP_SPACE = "\u2581"  # ▁, SentencePiece's space


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (``bytes_to_unicode`` inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


@dataclass(eq=False)
class TokenBytes:
    """Per token id: its bytes (``pieces``), byte length and special flag; ``name`` says
    which tokenizer it was read from (for messages)."""

    pieces: tuple[bytes, ...]
    special: np.ndarray  # [V] bool, True: a special token (no bytes)
    name: str = ""
    content: dict[int, str] = field(default_factory=dict)  # special id -> its text, e.g. <|eos|>
    eos_id: int | None = None
    byte_pieces: frozenset[int] = frozenset()  # ids of <0xNN> byte-fallback pieces
    lengths: np.ndarray = field(init=False)  # [V] int64 bytes of each token (0: special)
    _by_bytes: dict[bytes, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.pieces)
        self.lengths = np.fromiter((len(p) for p in self.pieces), dtype=np.int64, count=n)

    def __len__(self) -> int:
        return len(self.pieces)

    def by_bytes(self) -> dict[bytes, int]:
        """bytes -> the lowest id spelling them (non-special, non-empty tokens only), a
        byte-fallback piece only where no ordinary token spells the byte (the tokenizer
        writes "e" as [e], never [<0x65>])."""
        if self._by_bytes is None:
            out: dict[bytes, int] = {}
            for i, piece in enumerate(self.pieces):
                if piece and not self.special[i] and i not in self.byte_pieces:
                    out.setdefault(piece, i)
            for i in sorted(self.byte_pieces):
                out.setdefault(self.pieces[i], i)
            self._by_bytes = out
        return self._by_bytes

    def id_of_content(self) -> dict[str, int]:
        """Special token text -> the lowest id with it."""
        return {text: i for i, text in sorted(self.content.items(), reverse=True)}


def token_bytes(tokenizer: Any, name: str = "the tokenizer") -> TokenBytes:
    """The ``TokenBytes`` of ``tokenizer`` (see the module docstring); ids 0..len-1."""
    n = len(tokenizer)
    if n > MAX_TOKENS:
        raise LogitcacheError(
            f"{name} has {n:,} tokens, more than {MAX_TOKENS:,} (not a text tokenizer's vocabulary)"
        )
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special_ids |= {i for i, t in added.items() if getattr(t, "special", False)}
    byte_level, sentencepiece = _spelling(tokenizer)
    decoder = byte_decoder()
    pieces: list[bytes] = []
    byte_pieces: set[int] = set()
    special = np.zeros(n, dtype=bool)
    content: dict[int, str] = {}
    for i, tok in enumerate(tokens):
        if tok is None:  # a hole in the vocabulary
            pieces.append(b"")
            continue
        if i in special_ids:
            special[i], content[i] = True, str(tok)
            pieces.append(b"")
            continue
        if i in added:  # added, not special: its content is literal text
            piece = str(tok).encode("utf-8")
        elif byte_level and all(c in decoder for c in tok):
            piece = bytes(decoder[c] for c in tok)
        elif sentencepiece and (m := _BYTE_PIECE.fullmatch(tok)):
            piece = bytes([int(m.group(1), 16)])
            byte_pieces.add(i)
        elif sentencepiece:
            piece = tok.replace(_SP_SPACE, " ").encode("utf-8")
        else:
            piece = str(tok).encode("utf-8")
        if len(piece) > MAX_TOKEN_BYTES:
            raise LogitcacheError(
                f"{name}: token {i} is {len(piece):,} bytes long, more than {MAX_TOKEN_BYTES} "
                "(not a text tokenizer's vocabulary)"
            )
        pieces.append(piece)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if isinstance(eos, int) else None
    return TokenBytes(tuple(pieces), special, name, content, eos, frozenset(byte_pieces))


def _spelling(tokenizer: Any) -> tuple[bool, bool]:
    """(byte-level BPE, SentencePiece-style) from the fast tokenizer's decoder and
    pre-tokenizer; a slow tokenizer counts as SentencePiece if its vocabulary uses ``▁``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return False, any(_SP_SPACE in t for t in list(vocab)[:5000])
    try:
        described = json.loads(backend.to_str())
    except (ValueError, RecursionError):
        return False, False
    kinds = set(_types(described.get("decoder"))) | set(_types(described.get("pre_tokenizer")))
    byte_level = "ByteLevel" in kinds
    sentencepiece = bool(kinds & {"Metaspace", "ByteFallback", "Replace"}) and not byte_level
    return byte_level, sentencepiece


def _types(node: Any, depth: int = 0) -> list[str]:
    """Every ``type`` named in a decoder / pre-tokenizer description (Sequences nested)."""
    if not isinstance(node, dict) or depth > 8:
        return []
    found = [str(node.get("type"))]
    for key in ("decoders", "pretokenizers"):
        for child in node.get(key) or []:
            found += _types(child, depth + 1)
    return found
