"""Tokenizer and model identity, one definition for both stages.

In: a tokenizer, a transformers model config, a model directory. Out: sha256 fingerprints
and the JSON-able records the cache manifest stores (``precompute``) and students are
checked against (``train``): two tokenizers with the same fingerprint map every text to the
same ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["config_fingerprint", "tokenizer_fingerprint", "tokenizer_identity",
           "weights_fingerprint"]  # fmt: skip

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype",
                         "_commit_hash", "_attn_implementation_autoset", "use_cache"}  # fmt: skip


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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides token ids: vocabulary, merges, added and special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids, whatever
    files or library versions they were saved with.
    """
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


def tokenizer_identity(tokenizer: Any, name: str) -> dict[str, Any]:
    """The manifest's tokenizer record: fingerprint, name, vocabulary size, EOS id."""
    return {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "name_or_path": name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }
