"""Tokenizer and model identity, one definition for both stages.

In: a tokenizer, a transformers model config, a model directory. Out: sha256 fingerprints
and the JSON-able records the cache manifest stores (``precompute``) and students are
checked against (``train``): two tokenizers with the same fingerprint map every text to the
same ids and every id list to the same text (docs/format.md, "The tokenizer").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FULL_FINGERPRINT",
    "config_fingerprint",
    "same_tokenizer",
    "tokenizer_difference",
    "tokenizer_fingerprint",
    "tokenizer_fingerprint_v1",
    "tokenizer_identity",
    "weights_fingerprint",
]

_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "_attn_implementation_autoset",
    "use_cache",
}


def config_fingerprint(config: Any) -> str:
    """sha256 of a model config, less what changes with library versions and loading."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(name: str) -> str | None:
    """sha256 over the weight files of a local model directory, or of one ``.gguf`` file;
    None for hub ids (their revision names the weights).

    A ``.gguf`` file and a directory holding only that file get the same fingerprint.
    """
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")
        )
    else:
        return None
    outer = hashlib.sha256()
    for file in files:
        inner = hashlib.sha256()
        with open(file, "rb") as fh:
            while block := fh.read(1 << 22):
                inner.update(block)
        outer.update(f"{file.name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


FULL_FINGERPRINT = "fingerprint_full"
"""The key of ``tokenizer_fingerprint`` in a cache's tokenizer record (format 1.2 / 2.1); the
record's ``fingerprint`` keeps ``tokenizer_fingerprint_v1``, which older readers check."""

# Settings of one encode call (transformers sets and clears them around each call), and the
# library that wrote the JSON: none of them is part of what the tokenizer is.
_PER_CALL_KEYS = ("version", "truncation", "padding")
# transformers-level options that change the text a decode gives, or the ids of an encode
_TEXT_OPTIONS = ("clean_up_tokenization_spaces", "split_special_tokens")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that changes ids or text (rule 2, docs/format.md).

    A fast tokenizer: its whole ``tokenizers`` definition (model with vocabulary, merges and
    options, normalizer, pre-tokenizer, post-processor, decoder, added tokens with their flags)
    less the per-call truncation and padding, merges written as pairs whatever the library
    version; plus its special tokens, chat template and the options in ``_TEXT_OPTIONS``. A
    slow one: its class, vocabulary, ``init_kwargs`` (less file paths), added tokens with their
    flags, special tokens and chat template.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data: dict[str, Any] = json.loads(backend.to_str())
        for key in _PER_CALL_KEYS:
            data.pop(key, None)
        model = data.get("model")
        if isinstance(model, dict) and isinstance(model.get("merges"), list):
            model["merges"] = [
                m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]
            ]
    else:
        data = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "init": {
                k: v
                for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if not k.endswith("_file") and k != "name_or_path"
            },
            "added": sorted((i, repr(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        }
    data["special"] = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    data["chat_template"] = getattr(tokenizer, "chat_template", None)
    data["options"] = {k: getattr(tokenizer, k, None) for k in _TEXT_OPTIONS}
    text = json.dumps({"rule": 2, **data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint_v1(tokenizer: Any) -> str:
    """The fingerprint caches were made with before format 1.2 / 2.1 (rule 1): sha256 of
    vocabulary, merges, added and special tokens only. Kept to check those caches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        full = json.loads(backend.to_str())
        model = full.get("model", {})
        data: dict[str, Any] = {
            "type": model.get("type"),
            "vocab": model.get("vocab"),
            "merges": model.get("merges"),
            "added": [
                (t.get("id"), t.get("content"), t.get("special"))
                for t in full.get("added_tokens", [])
            ],
        }
    else:
        data = {"vocab": sorted(tokenizer.get_vocab().items())}
    data["special"] = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_difference(tokenizer: Any, record: Mapping[str, Any]) -> str | None:
    """None if ``tokenizer`` is the one a cache's tokenizer ``record`` names, else what differs
    ("fingerprint_full 1a2b… (the cache's 3c4d…)"). The record's ``fingerprint_full`` when it
    has one; a record written before it has only ``fingerprint`` (rule 1)."""
    if FULL_FINGERPRINT in record:
        key, found = FULL_FINGERPRINT, tokenizer_fingerprint(tokenizer)
    else:
        key, found = "fingerprint", tokenizer_fingerprint_v1(tokenizer)
    expected = str(record.get(key))
    if found == expected:
        return None
    return f"{key} {found[:16]} (the cache's {expected[:16]})"


def same_tokenizer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two caches' tokenizer records name one tokenizer: by ``fingerprint_full`` when
    both have it, else by the rule-1 ``fingerprint`` both have."""
    if FULL_FINGERPRINT in a and FULL_FINGERPRINT in b:
        return a[FULL_FINGERPRINT] == b[FULL_FINGERPRINT]
    return a.get("fingerprint") == b.get("fingerprint")


def tokenizer_identity(tokenizer: Any, name: str) -> dict[str, Any]:
    """The manifest's tokenizer record: both fingerprints, name, vocabulary size, EOS id."""
    return {
        "fingerprint": tokenizer_fingerprint_v1(tokenizer),
        FULL_FINGERPRINT: tokenizer_fingerprint(tokenizer),
        "name_or_path": name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }
