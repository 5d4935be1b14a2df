"""Loading Hugging Face models, shared by both stages: the teacher (precompute) and the
tokenizer and model paths a student names (train). Above storage, below the stages.

In: a hub id, a local directory, or a local GGUF file (``model.gguf``, or a directory
holding exactly one ``.gguf`` and no ``config.json``), dtype/device choices. Out: the model
in eval mode and its tokenizer (their fingerprints: ``logitcache.core.identity``).

GGUF teachers load through transformers' GGUF support, which de-quantizes every tensor
to float (a Q4_1 135M model: 98 MB on disk, 540 MB in float32) and builds the tokenizer
from the file's own vocabulary and merges; it needs the optional ``gguf`` and
``accelerate`` packages (``pip install 'logitcache[gguf]'``).

``split_output_head`` parts a loaded teacher into its body (tokens -> last hidden states) and
its output head (hidden states -> logits), so the pass can make logits a chunk of positions at
a time instead of holding a batch's [B, W, V] (16,384 tokens x 49,152 x 4 bytes = 3.2 GB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.core.errors import LogitcacheError

__all__ = [
    "SplitTeacher",
    "check_model_path",
    "check_tensor_parallel",
    "gguf_file_of",
    "load_teacher",
    "load_teacher_config",
    "load_tokenizer",
    "pretrained_source",
    "resolve_device",
    "resolve_dtype",
    "split_output_head",
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
        # transformers < 5 names it torch_dtype; 5 keeps that as a property that logs a
        # deprecation warning on every teacher with no dtype (GGUF ones): read the field only
        own = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
        if isinstance(own, str):
            own = _DTYPES.get(own)
        return own if isinstance(own, torch.dtype) else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LogitcacheError(f"--dtype {dtype}: expected one of {sorted(_DTYPES)}") from None


def check_model_path(name: str, what: str) -> None:
    """A name that looks like a local path (not a hub id) must exist: say so plainly."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix in (
        ".json",
        ".safetensors",
        ".gguf",
    )
    if looks_local and not Path(name).expanduser().exists():
        raise LogitcacheError(f"{what} path {name!r} does not exist")


def _load_error(what: str, name: str, err: Exception) -> LogitcacheError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LogitcacheError(f"cannot load {what} {name!r}: {first}")


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(name, "model")
    source, extra = pretrained_source(name)
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, **extra
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
    tensor_parallel: int = 1,
):
    """Returns (model, torch dtype, torch device); the model is in eval mode.

    With ``device_map`` (``auto``: spread over the GPUs of ``max_memory``, default all) the
    model places itself and the device returned is that of its input embeddings, where the
    input ids must go. With ``tensor_parallel`` N > 1 every process of an initialized
    N-process default group calls this: each loads its 1/N of every split layer
    (transformers' ``tp_plan="auto"``) on this machine's accelerator, ``cuda:LOCAL_RANK``
    (the CPU where there is none), and the forward gathers the output.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    check_model_path(name, "teacher")
    source, extra = pretrained_source(name)
    config = load_teacher_config(name, revision=revision, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype, config)
    dev = resolve_device(device)
    placement = {} if device_map is None else {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if device_map is not None:
        _require_accelerate(device_map)
    if tensor_parallel > 1:
        placement.update(_tensor_parallel_placement(tensor_parallel, device, config, name))
    try:
        with _gguf_bar_follows_hf_logging(bool(extra)):
            model = AutoModelForCausalLM.from_pretrained(
                source,
                revision=revision,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                **placement,
                **extra,
            )
    except Exception as err:
        raise _load_error("teacher", name, err) from None
    if device_map is None and tensor_parallel == 1:
        model.to(dev)
    else:
        dev = model.get_input_embeddings().weight.device
    model.eval()
    model.requires_grad_(False)
    return model, torch_dtype, dev


@dataclass(frozen=True)
class SplitTeacher:
    """A teacher whose logits are exactly ``head(body(input_ids, attention_mask))``."""

    body: Callable[..., torch.Tensor]
    """(input_ids [B, W], attention_mask [B, W]) -> last hidden states [B, W, D]."""
    head: Callable[[torch.Tensor], torch.Tensor]
    """[n, D] -> logits [n, V], in the teacher's dtype."""
    vocab: int
    """V: the width of the head's logits."""


_PROBE_TOKENS = 8


def split_output_head(model: Any, device: torch.device) -> SplitTeacher | None:
    """The teacher as body and output head, or None where its logits are not the head's alone.

    Checked, not assumed: many models scale or soft-cap the head's output (Gemma 2, Cohere,
    Granite), so the split is used only where a forward of a few tokens gives the same bits
    both ways; otherwise the caller takes the full forward's logits.
    """
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if base is None or base is model or head is None:
        return None

    def body(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # no KV cache: the pass never generates (16,384 tokens: 0.75 GB for SmolLM2-135M)
        return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    vocab = int(getattr(model.config, "vocab_size", None) or _PROBE_TOKENS)
    ids = (torch.arange(_PROBE_TOKENS) % vocab)[None].to(device)  # [1, 8]
    mask = torch.ones_like(ids)
    try:
        with torch.inference_mode():
            full = model(input_ids=ids, attention_mask=mask).logits  # [1, 8, V]
            parts = head(body(ids, mask))
    except Exception:  # a body that takes other arguments: the plain forward it is
        return None
    if full.shape != parts.shape or not torch.equal(full, parts):
        return None
    return SplitTeacher(body=body, head=head, vocab=full.shape[-1])


def load_teacher_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The teacher's transformers config (read from the GGUF metadata for a GGUF file)."""
    from transformers import AutoConfig

    source, extra = pretrained_source(name)
    try:
        return AutoConfig.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except Exception as err:
        raise _load_error("teacher", name, err) from None


def _require_accelerate(device_map: str) -> None:
    """transformers places a ``device_map`` model with accelerate, an optional dependency."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise LogitcacheError(
            f"--device-map {device_map} needs the accelerate package: pip install accelerate"
        ) from None


def check_tensor_parallel(config: Any, size: int, name: str) -> None:
    """Refuse a split transformers cannot make of this teacher: no tensor-parallel plan for
    its architecture, or ``size`` not dividing its query and key-value heads (each rank
    takes whole heads; otherwise its forward fails with a reshape error)."""
    if not getattr(config, "base_model_tp_plan", None):
        kind = getattr(config, "model_type", "?")
        raise LogitcacheError(
            f"teacher {name!r} ({kind}) has no tensor-parallel plan in transformers: run it "
            "with --device-map auto instead of --tensor-parallel"
        )
    heads = [getattr(config, key, None) for key in ("num_attention_heads", "num_key_value_heads")]
    heads = [h for h in heads if isinstance(h, int)]
    if any(h % size for h in heads):  # each rank takes whole heads (else: a reshape error)
        fits = [n for n in range(1, max(heads) + 1) if all(h % n == 0 for h in heads)]
        raise LogitcacheError(
            f"--tensor-parallel {size} must divide the teacher's attention heads "
            f"({' and '.join(map(str, heads))} query and key-value heads): use one of "
            f"{', '.join(map(str, fits))}"
        )


def _tensor_parallel_placement(size: int, device: str, config: Any, name: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for tensor parallelism over the default process group.

    transformers places each rank itself, on the accelerator torch detects (``cuda``, else
    the CPU), so a ``--device`` naming another kind is refused rather than ignored."""
    import torch.distributed as dist

    check_tensor_parallel(config, size, name)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() != size:
        raise LogitcacheError(
            f"--tensor-parallel {size} runs under torchrun, one process per GPU of the teacher: "
            f"torchrun --nproc-per-node {size} -m logitcache.cli precompute ..."
        )
    kind = torch._C._get_accelerator().type  # what transformers' mesh uses: cuda, else cpu
    if device != "auto" and torch.device(device).type != kind:
        raise LogitcacheError(
            f"--tensor-parallel {size} runs on this machine's {kind} (one rank per device): "
            f"drop --device {device}"
        )
    try:  # transformers >= 5: the plan and its size in one DistributedConfig
        from transformers.distributed import DistributedConfig
    except ImportError:  # 4.5x took them as from_pretrained's own arguments
        return {"tp_plan": "auto", "tp_size": size}
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=size)}


# -- GGUF teachers ---------------------------------------------------------------------
_GGUF_PACKAGES = {"gguf": "0.10", "accelerate": "1.0"}  # what transformers' GGUF loader needs


def gguf_file_of(name: str) -> Path | None:
    """The ``.gguf`` file a teacher name points at, or None if it is not a GGUF teacher.

    A ``.gguf`` path, or a directory without ``config.json`` that holds exactly one
    ``.gguf`` file. A directory with ``config.json`` is a transformers model directory
    (any ``.gguf`` beside it is ignored); one holding several ``.gguf`` files is refused.
    """
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LogitcacheError(f"GGUF file {name!r} does not exist")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LogitcacheError(
            f"{name} holds {len(found)} GGUF files ({names}): pass the one to use as "
            f"{path / found[0].name}"
        )
    return found[0] if found else None


def pretrained_source(name: str) -> tuple[str, dict[str, str]]:
    """(path or hub id, extra keyword arguments) for transformers' ``from_pretrained``.

    For a GGUF teacher: its directory and ``gguf_file=NAME``, after checking that the
    packages transformers' GGUF loader needs are installed; otherwise ``(name, {})``.
    """
    gguf = gguf_file_of(name)
    if gguf is None:
        return name, {}
    _require_gguf_packages(gguf)
    return str(gguf.parent), {"gguf_file": gguf.name}


@contextlib.contextmanager
def _gguf_bar_follows_hf_logging(gguf: bool) -> Iterator[None]:
    """transformers' GGUF loader draws its de-quantize bar with plain tqdm, ignoring
    ``disable_progress_bar()``; for the load, give it the tqdm that honours it."""
    if not gguf:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as loader
    from transformers.utils import logging as hf_logging

    plain = loader.tqdm
    loader.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        loader.tqdm = plain


def _require_gguf_packages(path: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    for package, least in _GGUF_PACKAGES.items():
        try:
            have = version(package)
        except PackageNotFoundError:
            have = None
        if have is None or _version_tuple(have) < _version_tuple(least):
            found = "is not installed" if have is None else f"is {have}"
            raise LogitcacheError(
                f"{path.name} is a GGUF model: loading it needs {package}>={least} ({package} "
                f"{found}): pip install 'logitcache[gguf]'"
            )


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)
