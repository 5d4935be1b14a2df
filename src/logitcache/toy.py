"""A toy teacher and corpus made on the spot, for ``logitcache demo`` and tests.

In: the running Python's standard library source (real code and docstrings, ~12 MB of
``.py`` text on CPython 3.11, present on every machine, no network needed).
Out: a held-out split, a JSONL corpus that ``logitcache precompute --data`` reads, a
byte-level BPE tokenizer, and a small Llama teacher pretrained with plain cross-entropy
and saved with ``save_pretrained`` (loadable by ``AutoModelForCausalLM.from_pretrained``).

Nothing happens at import time; every path and seed is a parameter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ToyModelSpec",
    "heldout_cross_entropy",
    "llama_config",
    "llama_config_dict",
    "lr_multiplier",
    "pretrain",
    "split_heldout",
    "stdlib_documents",
    "tokenize_corpus",
    "train_tokenizer",
    "write_jsonl",
]

EOS_TOKEN = "<|endoftext|>"
"""Separates documents in the token stream; the tokenizer's ``eos_token``."""
PAD_TOKEN = "<|pad|>"
"""The tokenizer's ``pad_token``; never appears in the token stream."""

# Directory names whose .py files are test suites, installed third-party code or generated
# data rather than library code: test/, tests/ (lib2to3, distutils, ctypes, unittest ...),
# idle_test/, and pydoc_data/ (one 756 kB generated file of English help text, 6 % of the
# corpus; it would dominate whichever side of the split it falls on).
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data"}
)
# Generated files, skipped by marker: the ~65 charmap codec tables in encodings/ (1.2 MB of
# hex tables, 10 % of the corpus) and the build-specific sysconfig data, which differs
# from machine to machine.
_GENERATED_MARKER = "with gencodec.py"
_GENERATED_PREFIX = "_sysconfigdata"


# --------------------------------------------------------------------------- corpus


def stdlib_documents(root: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """Every ``.py`` file of the standard library as ``(relative path, text)``, sorted by path.

    ``root`` defaults to the running interpreter's ``sysconfig.get_paths()["stdlib"]``.
    Skipped: anything under ``site-packages``/``dist-packages``, test suites (any
    directory named ``test``, ``tests`` or ``idle_test``), generated data (``pydoc_data/``,
    the ``gencodec.py`` charmap tables in ``encodings/``, ``_sysconfigdata*.py``) and files
    that are not valid UTF-8. On CPython 3.11 that leaves ~670 files, ~10 MB. Relative
    paths use ``/`` on every platform so that :func:`split_heldout` agrees across machines.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {base}")
    docs: list[tuple[str, str]] = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith(_GENERATED_PREFIX):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if _GENERATED_MARKER in text[:1000]:
            continue
        docs.append((rel.as_posix(), text))
    docs.sort(key=lambda doc: doc[0])
    if not docs:
        raise FileNotFoundError(f"no .py files found under {base}")
    return docs


def _unit_hash(key: str) -> float:
    """A number in [0, 1) from sha256 of ``key``: the same on every machine and Python."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(
    docs: Sequence[tuple[str, str]], fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split documents into ``(train, heldout)`` by a stable hash of their path.

    A document is held out when ``sha256(path)[:8] / 2**64 < fraction``, so each file
    lands on the same side on every machine, independent of which other files exist.
    Order within each side follows ``docs``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    for doc in docs:
        (heldout if _unit_hash(doc[0]) < fraction else train).append(doc)
    return train, heldout


def write_jsonl(docs: Sequence[tuple[str, str]], path: str | os.PathLike[str]) -> Path:
    """Write one ``{"text": ..., "path": ...}`` object per line; returns the path.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rel, text in docs:
            f.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, out_dir: str | os.PathLike[str]
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (the EOS token) and
    ``<|pad|>``, then merges up to ``vocab_size``. Any UTF-8 text round-trips exactly.
    The saved directory loads with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258 + 1:
        raise ValueError(
            f"vocab_size must be at least 259 (256 bytes + 2 specials + 1 merge), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.save_pretrained(str(out_dir))
    # Reload so the caller holds exactly what AutoTokenizer.from_pretrained(out_dir) gives.
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


def tokenize_corpus(
    docs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerFast
) -> np.ndarray:
    """One token stream for all documents, with the EOS id after each document.

    Returns ``[N] uint16`` when the vocabulary fits in 16 bits, else ``[N] int32``.
    Uses the Rust backend's ``encode_batch`` (parallel), ~1-2 M tokens/s on 2 cores.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token; train it with train_tokenizer()")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    encodings = tokenizer.backend_tokenizer.encode_batch(
        [text for _, text in docs], add_special_tokens=False
    )
    pieces: list[np.ndarray] = []
    for enc in encodings:
        pieces.append(np.asarray(enc.ids, dtype=dtype))
        pieces.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ToyModelSpec:
    """The shape of a small Llama, for the demo's teacher and student and for the benches;
    :func:`llama_config_dict` turns it into a transformers config."""

    hidden: int = 192
    """Model width (``hidden_size``)."""
    layers: int = 4
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads; ``hidden`` must be a multiple. Key/value heads = heads (no GQA)."""
    intermediate: int = 512
    """Width of the SwiGLU MLP."""
    max_positions: int | None = 256
    """Longest sequence in tokens (``max_position_embeddings``); None: transformers' default."""
    vocab_size: int | None = None
    """Output vocabulary; ``None`` takes ``len(tokenizer)`` in :func:`llama_config`."""
    tie_embeddings: bool = True
    """Share input embedding and LM head (saves vocab x hidden parameters)."""
    init_std: float | None = None
    """Weight init std (``initializer_range``); None: transformers' default, 0.02."""

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "intermediate", "max_positions", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")

    def widened(self, factor: int) -> ToyModelSpec:
        """The same depth and vocabulary, ``factor`` times wider (hidden and MLP)."""
        return replace(self, hidden=self.hidden * factor, intermediate=self.intermediate * factor)


def llama_config_dict(spec: ToyModelSpec) -> dict[str, Any]:
    """The transformers config of shape ``spec`` as a dict with ``model_type`` (what a
    ``--student-config`` file holds); ``spec.vocab_size`` must be set."""
    if spec.vocab_size is None:
        raise ValueError("vocab_size must be set to make a config")
    config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads,
    }
    if spec.max_positions is not None:
        config["max_position_embeddings"] = spec.max_positions
    if spec.init_std is not None:
        config["initializer_range"] = spec.init_std
    config["tie_word_embeddings"] = spec.tie_embeddings
    return config


def llama_config(spec: ToyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A ``LlamaConfig`` of shape ``spec`` whose vocabulary and special ids match ``tokenizer``."""
    from transformers import LlamaConfig

    vocab = spec.vocab_size if spec.vocab_size is not None else len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    config = llama_config_dict(replace(spec, vocab_size=vocab))
    del config["model_type"]
    return LlamaConfig(
        **config,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_multiplier(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 down to ``final`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]`` int64 rows ``tokens[s : s + length]`` for each start ``s``."""
    import torch

    offsets = torch.arange(length)
    return tokens[starts[:, None] + offsets[None, :]]


def pretrain(
    model_dir: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerFast,
    train_tokens: np.ndarray,
    *,
    spec: ToyModelSpec,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int = 0,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    progress: bool = True,
) -> Path:
    """Pretrain a Llama of shape ``spec`` on ``train_tokens`` with cross-entropy; save it.

    Each step reads ``batch_size`` windows of ``seq_len + 1`` tokens at random offsets
    (seeded by ``seed``) and trains with AdamW (betas 0.9/0.95, grad clip 1.0), linear
    warmup (``warmup`` steps, default 5 % of ``steps``) then cosine decay to 10 % of ``lr``.
    The model, the tokenizer and ``toy_pretrain.json`` (this call's settings, final loss,
    tokens/s) are saved to a temporary sibling directory that is renamed to ``model_dir``
    only when complete, so an interrupted run never leaves a half teacher.

    Raises ``FileExistsError`` if ``model_dir`` exists: reuse it or delete it.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(model_dir)
    _check_pretrain(out, spec, len(train_tokens), steps, batch_size, seq_len)
    warmup = max(1, steps // 20) if warmup is None else warmup

    torch.manual_seed(seed)
    config = llama_config(spec, tokenizer)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    t0 = time.perf_counter()
    ema = _pretrain_steps(
        model,
        optimizer,
        train_tokens,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        seed=seed,
        progress=progress,
    )
    elapsed = time.perf_counter() - t0

    record = {
        "spec": asdict(spec),
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "seed": seed,
        "train_tokens": len(train_tokens),
        "tokens_seen": steps * batch_size * seq_len,
        "final_loss_ema": ema,
        "seconds": elapsed,
        "tokens_per_second": steps * batch_size * seq_len / elapsed,
    }
    _save_atomically(out, model, tokenizer, record)
    return out


def _check_pretrain(
    out: Path, spec: ToyModelSpec, n_tokens: int, steps: int, batch_size: int, seq_len: int
) -> None:
    """Refuse a :func:`pretrain` call that would overwrite ``out`` or cannot train."""
    if out.exists():
        raise FileExistsError(f"{out} already exists: load it, or delete it to pretrain again")
    if spec.max_positions is not None and seq_len > spec.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds spec.max_positions {spec.max_positions}")
    if n_tokens < seq_len + 2:
        raise ValueError(f"need more than {seq_len + 1} training tokens, got {n_tokens}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")


def _pretrain_steps(
    model,
    optimizer,
    train_tokens: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    seed: int,
    progress: bool,
) -> float:
    """``pretrain``'s loop: ``steps`` AdamW steps on random windows; returns the loss EMA."""
    import torch

    from logitcache.core.progress import Reporter

    stream = torch.from_numpy(train_tokens.astype(np.int64))  # [N] int64
    gen = torch.Generator().manual_seed(seed)
    n_starts = len(stream) - seq_len

    # the bar counts tokens, so its rate is the tokens/s the budgets are sized by
    tokens_per_step = batch_size * seq_len
    bar = Reporter(enabled=progress).bar(total=steps * tokens_per_step, desc="pretrain teacher")
    ema = float("nan")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_multiplier(step, steps, warmup)
        starts = torch.randint(0, n_starts, (batch_size,), generator=gen)
        batch = _windows(stream, starts, seq_len + 1)  # [B, T+1] int64
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V] float32
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(step=step + 1, loss=f"{ema:.3f}", refresh=False)
        bar.update(tokens_per_step)
    bar.close()
    return ema


def _save_atomically(out: Path, model, tokenizer, record: dict) -> None:
    """Save model, tokenizer and ``toy_pretrain.json`` to a sibling, then rename to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar beside the demo's own
    try:
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "toy_pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def heldout_cross_entropy(
    model: PreTrainedModel,
    tokens: np.ndarray,
    seq_len: int,
    n_windows: int,
    *,
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy (nats/token) over fixed windows of ``tokens``.

    The ``n_windows`` windows of ``seq_len + 1`` tokens start at evenly spaced offsets,
    so the number is deterministic and comparable between models that share a tokenizer.
    Every window scores ``seq_len`` predictions. The model's train/eval mode is restored.
    """
    import torch

    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} tokens, got {len(tokens)}")
    if n_windows <= 0:
        raise ValueError(f"n_windows must be positive, got {n_windows}")
    stream = torch.from_numpy(tokens.astype(np.int64))  # [N] int64
    starts = torch.from_numpy(
        np.linspace(0, len(tokens) - seq_len - 1, n_windows).round().astype(np.int64)
    )
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, n_windows, batch_size):
                batch = _windows(stream, starts[i : i + batch_size], seq_len + 1)  # [B, T+1]
                logits = model(input_ids=batch[:, :-1]).logits.float()  # [B, T, V]
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
                ).item()
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count
