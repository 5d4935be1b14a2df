"""The student: loading or creating it, checking it against a cache, and its loss forward.

In: a hub id / directory, or a transformers config file, plus the cache spec. Out: the
model and tokenizer, refused with a clear message if they cannot learn from this cache;
and ``DistillModule``, the student with its ``DistillationLoss``, whose forward returns the
summed loss of a micro-batch so that DDP sees one forward per micro-batch.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitcache.core.errors import LogitcacheError
from logitcache.core.settings_file import RECIPE_LIMIT, load_yaml
from logitcache.core.untrusted import read_local_text
from logitcache.models import check_model_path, load_tokenizer
from logitcache.storage import CacheSpec, NoTokenizerError
from logitcache.storage.errors import TokenizerError
from logitcache.storage.tokenizer import check_tokenizer, load_stored_tokenizer, stored_tokenizer

from .distill_loss import DistillationLoss, final_hidden

__all__ = ["DistillModule", "apply_lora", "cache_tokenizer", "check_student", "load_student"]


def load_student(
    student: str | None,
    student_config: str | None,
    tokenizer_name: str | None,
    *,
    spec: CacheSpec,
    seed: int,
    trust_remote_code: bool = False,
    cache: Any = None,
    meta: bool = False,
    log: Any = None,
):
    """Returns (model, tokenizer, tokenizer name) for a pretrained or from-scratch student.

    The tokenizer is ``tokenizer_name``, else the pretrained student's own, else (a student
    from scratch, or a pretrained one without tokenizer files: ``log`` says so) the one
    stored in ``cache`` (a path, URL or storage ``Location``), loaded as data (no remote code
    whatever ``trust_remote_code`` says) and checked against the cache's fingerprint.
    ``trust_remote_code`` is for the student's own files. ``meta``: the same architecture and
    dtype on the meta device, no weights read or initialized (FSDP's ranks but 0, filled
    from rank 0 after sharding: ``sharding.shard_student``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if (student is None) == (student_config is None):
        raise LogitcacheError("give exactly one of --student (a model) or --student-config")
    if tokenizer_name is not None:
        check_model_path(tokenizer_name, "--tokenizer")
    if student is not None:
        check_model_path(student, "student")
        try:
            if meta:  # the architecture from_pretrained builds, in the float32 it is loaded in
                config = AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code)
                model = _from_config(config, trust_remote_code, meta, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    student, trust_remote_code=trust_remote_code, dtype=torch.float32
                )
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LogitcacheError(f"cannot load student {student!r}: {first}") from None
        if tokenizer_name is None and _has_tokenizer(student):
            tokenizer_name = student
    else:
        config_dict = _read_config_file(student_config)
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise LogitcacheError(f"{student_config} has no 'model_type' (e.g. \"llama\")")
        try:
            config = AutoConfig.for_model(model_type, **config_dict)
        except Exception as err:
            raise LogitcacheError(f"invalid student config {student_config}: {err}") from None
        torch.manual_seed(seed)
        model = _from_config(config, trust_remote_code, meta)
    if tokenizer_name is not None:
        try:
            tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
        except LogitcacheError as err:
            raise LogitcacheError(
                f"{str(err).rstrip(': ')}; give --tokenizer, or put the cache's beside the model "
                "with `logitcache tokenizer CACHE DIR`"
            ) from None
        return model, tokenizer, tokenizer_name
    tokenizer, name = cache_tokenizer(cache, spec, student)
    if student is not None and log is not None:
        log(
            f"--student {student} has no tokenizer files: it gets the cache's ({name}), "
            "checked against the cache's fingerprint and saved with the student"
        )
    return model, tokenizer, name


_TOKENIZER_DATA = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _has_tokenizer(student: str) -> bool:
    """Whether a student names its own tokenizer: a hub id or a file (a .gguf holds one) is
    taken to; a directory does if it holds a tokenizer's files."""
    path = Path(student).expanduser()
    if not path.is_dir():
        return True
    return any((path / name).exists() for name in _TOKENIZER_DATA)


def _from_config(config: Any, trust_remote_code: bool, meta: bool, **kwargs: Any) -> nn.Module:
    """``from_config`` as rank 0 calls it (same dtype: the config's unless given), on the
    meta device where ``meta``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, **kwargs
        )


def cache_tokenizer(cache: Any, spec: CacheSpec, student: str | None) -> tuple[Any, str]:
    """(the cache's stored tokenizer, where it is), checked; or one clear line saying how to
    give one. Caches written before format 1.1 only name the teacher's path: that directory,
    if it is on this machine, is loaded as data and checked like a stored tokenizer."""
    if cache is None:
        needs = "a student from --student-config"
        if student is not None:
            needs = f"--student {student} has no tokenizer files"
        raise LogitcacheError(f"{needs}: give --tokenizer")
    try:
        tokenizer, path = stored_tokenizer(cache)
        return tokenizer, str(path)
    except NoTokenizerError as err:
        recorded = spec.tokenizer.get("name_or_path")
        # An old cache on the machine that made it: the directory it records, never a hub id
        # (a name from a cache is not fetched, and never run).
        if not (recorded and Path(recorded).expanduser().is_dir()):
            raise LogitcacheError(f"the cache's tokenizer: {err}") from None
        tokenizer = load_stored_tokenizer(Path(recorded).expanduser())
        check_tokenizer(tokenizer, spec.tokenizer, f"the tokenizer at {recorded!r}")
        return tokenizer, recorded


def _read_config_file(path: str) -> dict[str, Any]:
    """A student config file: read bounded, YAML checked as a recipe is (no aliases; see
    ``logitcache.core.settings_file.load_yaml``), one-line errors quoting at most a line of it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LogitcacheError(f"student config {path!r} does not exist")
    text = read_local_text(file, RECIPE_LIMIT, what="student config")
    try:
        data = load_yaml(text) if file.suffix in (".yaml", ".yml") else json.loads(text)
    except RecursionError:
        raise LogitcacheError(f"cannot parse student config {path}: nested too deeply") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise LogitcacheError(f"cannot parse student config {path}: {first}") from None
    if not isinstance(data, dict):
        raise LogitcacheError(f"student config {path} must be a mapping")
    return data


def check_student(
    model: Any,
    tokenizer: Any,
    spec: CacheSpec,
    *,
    extended_vocab: bool,
    cross_tokenizer: bool = False,
    seq_len: int | None = None,
) -> int:
    """Refuse a student that cannot learn from this cache; returns its vocabulary rows.
    ``cross_tokenizer``: its tokenizer may be any (rows retokenized to at most ``seq_len``
    tokens, default the cache's sequence length)."""
    if not (extended_vocab or cross_tokenizer):
        try:
            check_tokenizer(tokenizer, spec.tokenizer, "the student's tokenizer")
        except TokenizerError as err:
            raise TokenizerError(
                f"{err}. Omit --tokenizer (a student from scratch, or one without tokenizer "
                "files, gets the cache's; `logitcache tokenizer CACHE DIR` exports it), or "
                "pass --extended-vocab if the student's vocabulary extends the teacher's, or "
                "--cross-tokenizer chain to distill across tokenizers"
            ) from None
    rows = model.get_output_embeddings().weight.shape[0]
    if extended_vocab and rows < spec.vocab_size:
        raise LogitcacheError(
            f"--extended-vocab: the student has {rows} vocabulary rows, fewer than the cache's "
            f"{spec.vocab_size}"
        )
    inputs = model.get_input_embeddings().weight.shape[0]
    if min(rows, inputs) < len(tokenizer):
        whose = "its" if cross_tokenizer else "the cache's"
        raise LogitcacheError(
            f"the student has {min(rows, inputs)} vocabulary rows, fewer than the "
            f"{len(tokenizer)} tokens of {whose} tokenizer (vocabulary {spec.vocab_size}): "
            "give it at least as many (vocab_size in --student-config), or use a student made "
            "for this tokenizer"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    length = seq_len if seq_len is not None else spec.seq_len
    if max_pos is not None and max_pos < length:
        which = "--student-seq-len" if seq_len is not None else "the cache's sequence length"
        raise LogitcacheError(
            f"the student's max_position_embeddings ({max_pos}) is below {which} ({length})"
        )
    return rows


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = (),
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """The student with LoRA adapters of rank ``r`` (a ``peft`` ``PeftModel``); only the
    adapters train. ``targets``: module names (default: all linear layers but the head)."""
    try:
        import peft
    except ImportError:
        raise LogitcacheError(
            "--lora-r needs the peft package: pip install 'logitcache[peft]'"
        ) from None
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=list(targets) if targets else "all-linear",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # the adapters' initialization
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise LogitcacheError(f"--lora-targets {','.join(targets)}: {first}") from None


class DistillModule(nn.Module):
    """The student and its loss as one module, so that DDP sees one forward per micro-batch.

    ``forward(batch, n_rows)`` returns the loss of a ``DistillCollator`` batch summed over
    its ``n_rows`` trained positions (``DistillationLoss``, ``reduction="sum"``).
    """

    def __init__(self, model: nn.Module, loss: DistillationLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor], n_rows: int) -> torch.Tensor:
        if n_rows == 0:
            # An empty micro-batch (a rank past the end of an epoch): DDP still waits for a
            # gradient of every parameter, so return a zero that touches them all. FSDP also
            # needs every layer's forward, in order: the other ranks gather and reduce them.
            if _is_sharded(self):
                ids = batch["input_ids"]
                h = final_hidden(self.model, ids, torch.ones_like(ids))[:, :0]  # [B, 0, H]
                return self.model.get_output_embeddings()(h).sum() * 0.0
            params = [p for p in self.model.parameters() if p.requires_grad]
            return sum(p.sum() for p in params) * 0.0
        return self.loss(batch, model=self.model, reduction="sum")


def _is_sharded(module: nn.Module) -> bool:
    from .sharding import is_sharded

    return is_sharded(module)
