"""Sharding a student over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

In: the ``DistillModule`` (a transformers causal LM inside), the device, the world size and
``--precision``. Out: the same module, its parameters ``DTensor`` shards (dim 0 split over
the ranks): weights, gradients and the optimizer state built on them take 1/N of the
memory each. A whole layer exists only while it runs (forward, then again in backward).
Plus the few things the loop does differently with a sharded student: micro-batch gradient
sync, the root's parameters in evaluation, evaluation forwards in lockstep over the ranks
(every forward is collective), and gathering the full weights for ``save_pretrained``.

Grouping: one FSDP group per decoder layer (the model's ``_no_split_modules`` classes:
``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...) and the root group for the rest
(embeddings, final norm, LM head; tied embeddings stay in one group). The root is the
``DistillModule``, not the causal LM: the loop calls ``DistillModule.forward``, which
reaches the decoder and head directly, so the LM's own forward never runs.

Rank 0 builds the whole student (loaded, or initialized from the seed, as one process
would); the other ranks build it on the meta device (``load_student(meta=True)``), so the
whole float32 student sits in host memory once per job, not once per rank (a 7B student:
28 GB, not 8 x 28 GB on an 8-GPU node). After ``fully_shard`` those ranks allocate their
shards only, and every weight, buffer and the RNG state come from rank 0 by broadcast.

Mixed precision on CUDA: parameters all-gathered and computed in bfloat16, gradients
reduced in float32, the sharded master weights and AdamW state float32. On CPU everything
stays float32, so CPU runs match DDP's numbers (the tests compare them step by step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from logitcache.core.errors import LogitcacheError

__all__ = [
    "decoder_layers",
    "enable_gradient_checkpointing",
    "full_state_dict",
    "is_sharded",
    "micro_batch_context",
    "pad_sharded_forwards",
    "shard_student",
    "unsharded_root",
]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, by the classes transformers keeps whole on one device."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """The model's own activation checkpointing, non-reentrant (FSDP- and no_grad-safe):
    each decoder layer keeps only its input for backward and reruns its forward there."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LogitcacheError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient "
            "checkpointing (transformers' supports_gradient_checkpointing is False)"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is never used in training


def shard_student(
    module: nn.Module, device: torch.device, world_size: int, precision: str = "auto", rank: int = 0
) -> nn.Module:
    """``fully_shard`` each decoder layer of ``module.model``, then ``module`` as the root,
    then fill every rank's shards from rank 0's student (``_fill_from_rank0``).

    Rank 0's student may still be on the CPU, the others' on the meta device: each rank
    keeps only its shard and moves it to ``device``, so the whole float32 student never
    sits on one GPU. ``precision`` as ``--precision``: bfloat16 compute on CUDA for
    ``auto`` and ``bf16``. Every rank must call it (collective).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise LogitcacheError(
            f"--fsdp needs torch >= 2.6 (FSDP2), this is {torch.__version__}"
        ) from None
    mesh = init_device_mesh(device.type, (world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if device.type == "cuda" and precision in ("auto", "bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    layers = decoder_layers(module.model)
    if not layers:
        raise LogitcacheError(
            f"--fsdp: cannot find the decoder layers of {type(module.model).__name__} (its "
            "_no_split_modules names none of its modules); train it with DDP instead"
        )
    # Rank 0's whole weights, held by reference (no copy) until they are broadcast.
    full = get_model_state_dict(module) if rank == 0 else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(module, **kwargs)
    _fill_from_rank0(module, full, device)
    return module


def _fill_from_rank0(
    module: nn.Module, full: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Every rank's shards, buffers and RNG state set to rank 0's (``full``: its whole
    state dict; empty elsewhere). A rank built on the meta device first gets storage for
    its shards and buffers (``to_empty``), uninitialized until the broadcasts fill it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full, options=options)  # one tensor at a time
    full.clear()
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are in no state dict
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    # Dropout masks and the DataLoader's worker seeds draw from it: as one process's.
    rng = torch.get_rng_state().to(device)  # [5056] uint8
    dist.broadcast(rng, src=0)
    torch.set_rng_state(rng.cpu())
    left = [
        f"{name}.{key}"
        for name, m in module.named_modules()
        for key, value in vars(m).items()
        if isinstance(value, torch.Tensor) and value.is_meta
    ]
    if left:
        raise LogitcacheError(
            f"--fsdp: {type(module.model).__name__} keeps tensors outside its parameters and "
            f"buffers ({', '.join(left[:3])}), which rank 0 cannot broadcast; train it with DDP"
        )


def is_sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, so nothing is sharded
        return False
    return isinstance(module, FSDPModule)


def micro_batch_context(wrapped: nn.Module, last: bool, distributed: bool):
    """The context of one micro-batch's forward and backward under gradient accumulation.

    DDP: ``no_sync`` until the last micro-batch (gradients add up locally, one all-reduce).
    FSDP: nothing. Each micro-batch's backward reduce-scatters its gradients, so a rank
    accumulates only its shard (4/N B per parameter). Skipping that sync
    (``set_requires_gradient_sync(False)``) would save communication but keep every
    layer's whole float32 gradient until the last micro-batch: 4 B per parameter, the
    memory FSDP is there to save.
    """
    if not distributed or last or is_sharded(wrapped):
        return contextlib.nullcontext()
    return wrapped.no_sync()


@contextlib.contextmanager
def unsharded_root(module: nn.Module) -> Iterator[None]:
    """Evaluation calls the decoder and head directly, not the root's forward, so the
    root's parameters (embeddings, norm, head) are gathered here; layers gather their own."""
    if not is_sharded(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def pad_sharded_forwards(
    model: nn.Module, n_batches: int, rank: int, world_size: int, device: torch.device
) -> None:
    """Evaluation splits ``n_batches`` over the ranks (``i % world_size``). Under FSDP each
    forward gathers every layer from all ranks, so a rank that got fewer batches runs
    forwards of one padding token until it has run as many as rank 0 (else rank 0 waits
    forever). Without FSDP it does nothing."""
    from .distill_loss import final_hidden

    if not any(is_sharded(m) for m in model.modules()):
        return
    mine = len(range(rank, n_batches, world_size))
    ids = torch.zeros((1, 1), dtype=torch.int64, device=device)
    with torch.no_grad():
        for _ in range(-(-n_batches // world_size) - mine):
            final_hidden(model, ids, torch.ones_like(ids))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole float32 weights of a (sharded) model, on the CPU of rank 0; every rank must
    call it (all-gathers). Other ranks get an empty dict. Tied weights (``lm_head`` =
    ``embed_tokens``) are one tensor under both names, as in ``model.state_dict()``, so
    ``save_pretrained`` writes them once, as it does for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied = first.setdefault(id(param), name)
        if tied != name and name in state and tied in state:
            state[name] = state[tied]  # gathered twice, as two tensors
    return state
