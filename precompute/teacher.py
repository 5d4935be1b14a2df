"""Loading a teacher: model and tokenizer (their fingerprints: ``logitcache.identity``).

In: a hub id or local directory, dtype/device choices. Out: the model in eval mode and its
tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from logitcache.errors import LogitcacheError

__all__ = [
    "check_model_path",
    "load_teacher",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LogitcacheError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LogitcacheError(
            f"--device {device}: not a device name (auto, cpu, cuda, cuda:N, mps)"
        ) from None


def resolve_dtype(dtype: str | None, config: Any) -> torch.dtype:
    """``None``/``auto`` means the model's own dtype (float32 if it names none)."""
    if dtype in (None, "auto"):
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(own, str):
            own = _DTYPES.get(own)
        return own if isinstance(own, torch.dtype) else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LogitcacheError(f"--dtype {dtype}: expected one of {sorted(_DTYPES)}") from None


def check_model_path(name: str, what: str) -> None:
    """A name that looks like a local path (not a hub id) must exist: say so plainly."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix in (".json", ".safetensors")
    if looks_local and not Path(name).expanduser().exists():
        raise LogitcacheError(f"{what} path {name!r} does not exist")


def _load_error(what: str, name: str, err: Exception) -> LogitcacheError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LogitcacheError(f"cannot load {what} {name!r}: {first}")


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(name, "model")
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # transformers raises OSError, ValueError, HF hub errors
        raise _load_error("tokenizer", name, err) from None


def load_teacher(
    name: str,
    *,
    dtype: str | None = None,
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: dict[int, int] | None = None,
):
    """Returns (model, torch dtype, torch device); the model is in eval mode.

    With ``device_map`` (``auto``: spread over the GPUs of ``max_memory``, default all) the
    model places itself and the device returned is that of its input embeddings, where the
    input ids must go.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    check_model_path(name, "teacher")
    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        raise _load_error("teacher", name, err) from None
    torch_dtype = resolve_dtype(dtype, config)
    dev = resolve_device(device)
    placement = {} if device_map is None else {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if device_map is not None:
        _require_accelerate(device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **placement,
        )  # fmt: skip
    except Exception as err:
        raise _load_error("teacher", name, err) from None
    if device_map is None:
        model.to(dev)
    else:
        dev = model.get_input_embeddings().weight.device
    model.eval()
    model.requires_grad_(False)
    return model, torch_dtype, dev


def _require_accelerate(device_map: str) -> None:
    """transformers places a ``device_map`` model with accelerate, an optional dependency."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise LogitcacheError(
            f"--device-map {device_map} needs the accelerate package: pip install accelerate"
        ) from None
