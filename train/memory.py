"""What a student needs per GPU: the arithmetic behind ``--fsdp``, ``--gradient-checkpointing``
and ``--optimizer``, and the check that replaces an out-of-memory error at the first step.

In: the student's shape (``StudentShape.of(model)``), a ``Setup`` (ranks, sharding,
checkpointing, optimizer, micro-batch tokens). Out: a ``Footprint`` in bytes per rank:

- states: float32 weights 4 B + float32 gradients 4 B + optimizer state (AdamW 8 B;
  torchao's 8-bit AdamW ~2 B) per parameter; divided by N under FSDP;
- working set, FSDP only: the gathered root (embeddings, norm, head: never resharded
  between forward and backward) and two gathered layers (the one running and the one
  prefetched) in the compute dtype, plus their unsharded float32 gradients in backward;
- activations (an estimate): what each decoder layer keeps for backward per token,
  ``(8 h + 4 i)`` values (attention and MLP inputs and outputs, SwiGLU's three
  projections; memory-efficient attention, no L x L term), or only its input ``h`` with
  checkpointing plus one layer's worth rerun in backward; and the loss chunk,
  ``chunk_size x V`` float32 logits three times (logits, softmax, gradient).

States and working set are exact to within allocator slack (``docs/benchmarks.md``
measures them: bytes per parameter on CPU); activations depend on kernels and are an
estimate. ``check_fits`` refuses only when states plus working set exceed the device,
a bound no batch size can fix, and names the flags that make it fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import human_bytes

from .optim import STATE_BYTES_PER_PARAM
from .sharding import decoder_layers

__all__ = [
    "Footprint",
    "Setup",
    "StudentShape",
    "check_fits",
    "check_student_fits",
    "footprint",
    "options_table",
]


@dataclass(frozen=True)
class StudentShape:
    params: int
    layer_params: int
    """Parameters of the largest decoder layer."""
    root_params: int
    """Parameters outside the decoder layers (embeddings, final norm, LM head)."""
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> StudentShape:
        blocks = decoder_layers(model)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        total = count(model)
        sizes = [count(b) for b in blocks] or [0]
        cfg = model.config
        hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        return cls(
            params=total,
            layer_params=max(sizes),
            root_params=total - sum(sizes),
            layers=len(blocks),
            hidden=hidden,
            intermediate=int(getattr(cfg, "intermediate_size", 4 * hidden) or 0),
            vocab=int(getattr(cfg, "vocab_size", 0) or 0),
        )


@dataclass(frozen=True)
class Setup:
    world_size: int = 1
    fsdp: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    bf16: bool = True
    """Compute in bfloat16 (CUDA's default): gathered weights and activations 2 B a value."""
    tokens: int = 0
    """Tokens per micro-batch per rank (batch size x sequence length)."""
    chunk_size: int = 1024


@dataclass(frozen=True)
class Footprint:
    states: float
    working: float
    activations: float

    @property
    def floor(self) -> float:
        """What no batch size changes: states and the FSDP working set."""
        return self.states + self.working

    @property
    def total(self) -> float:
        return self.states + self.working + self.activations


def footprint(shape: StudentShape, setup: Setup) -> Footprint:
    """Bytes per rank of ``shape`` trained under ``setup`` (see the module docstring)."""
    per_param = 4 + 4 + STATE_BYTES_PER_PARAM[setup.optimizer]
    value = 2 if setup.bf16 else 4
    if setup.fsdp:
        states = per_param * shape.params / setup.world_size
        gathered = shape.root_params + 2 * shape.layer_params
        working = value * gathered + 4 * (shape.root_params + shape.layer_params)
    else:
        states, working = per_param * shape.params, 0.0
    h, i = shape.hidden, shape.intermediate
    per_layer_token = value * (8 * h + 4 * i)
    if setup.gradient_checkpointing:
        kept = setup.tokens * (value * h * shape.layers + per_layer_token)
    else:
        kept = setup.tokens * per_layer_token * shape.layers
    loss = 3 * 4 * min(setup.chunk_size, max(setup.tokens, 1)) * shape.vocab
    return Footprint(states, working, kept + loss)


def _variants(setup: Setup, world: int) -> list[tuple[str, Setup]]:
    fsdp = replace(setup, fsdp=True, world_size=world)
    gc = replace(fsdp, gradient_checkpointing=True)
    return [
        (
            "DDP (a whole student per GPU)",
            replace(setup, fsdp=False, world_size=1, gradient_checkpointing=False),
        ),
        (f"--fsdp over {world} ranks", fsdp),
        ("+ --gradient-checkpointing", gc),
        ("+ --optimizer adamw8bit", replace(gc, optimizer="adamw8bit")),
    ]


def options_table(shape: StudentShape, setup: Setup, world: int) -> str:
    """One line per way of training ``shape``: states + working set, activations, total."""
    lines = []
    for label, variant in _variants(setup, world):
        f = footprint(shape, variant)
        lines.append(
            f"{label}: {human_bytes(f.floor)} states + {human_bytes(f.activations)} "
            f"activations (est.) = {human_bytes(f.total)}"
        )
    return "; ".join(lines)


def _ranks_to_fit(shape: StudentShape, setup: Setup, have: float) -> tuple[int, Setup, bool] | None:
    """The fewest ranks (and the lightest flags) whose estimated total fits ``have``; failing
    that, whose states and working set do (then activations must shrink: the bool is False)."""
    for whole in (True, False):
        for world in (2, 4, 8, 16, 32, 64):
            for _, variant in _variants(setup, world)[1:]:
                f = footprint(shape, variant)
                if (f.total if whole else f.floor) <= 0.9 * have:
                    return world, variant, whole
    return None


def check_student_fits(
    model: nn.Module, config: Any, env: Any, seq_len: int, warn: Callable[[str], None]
) -> None:
    """``check_fits`` for ``logitcache train`` (a ``TrainConfig``, the loop's ``Env``) on
    CUDA; elsewhere the device's memory is not known and nothing is checked."""
    import torch

    if env.device.type != "cuda":
        return
    bf16 = config.precision == "bf16" or config.precision == "auto"
    setup = Setup(
        world_size=env.world_size,
        fsdp=config.fsdp and env.world_size > 1,
        gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer,
        bf16=bf16,
        tokens=config.batch_size * seq_len,
        chunk_size=config.chunk_size,
    )
    have = torch.cuda.get_device_properties(env.device).total_memory
    warning = check_fits(StudentShape.of(model), setup, have, str(env.device))
    if warning:
        warn(warning)


def check_fits(shape: StudentShape, setup: Setup, have: int, device: str) -> str | None:
    """Refuse a run whose states and working set alone exceed the device's ``have`` bytes,
    with the arithmetic of every option and the flags that make it fit. Returns a warning
    when only the activation estimate exceeds it (a smaller --batch-size may fit)."""
    need = footprint(shape, setup)
    how = "with --fsdp" if setup.fsdp else "with DDP"
    if need.floor <= have:
        if need.total <= have:
            return None
        return (
            f"warning: {how} the student may not fit {device} ({human_bytes(have)}): "
            f"{human_bytes(need.floor)} of states and ~{human_bytes(need.activations)} of "
            f"activations (estimated) per GPU. If it runs out of memory: "
            f"{_advice(shape, setup, have)}, or lower --batch-size"
        )
    raise LogitcacheError(
        f"the student has {shape.params:,} parameters: {how} over {setup.world_size} "
        f"rank(s) it needs at least {human_bytes(need.floor)} per GPU before activations "
        f"and {device} has {human_bytes(have)}. Per GPU: "
        f"{options_table(shape, setup, max(setup.world_size, 2))}. "
        f"{_advice(shape, setup, have)} (docs/distributed.md)"
    )


def _advice(shape: StudentShape, setup: Setup, have: int) -> str:
    fix = _ranks_to_fit(shape, setup, have)
    if fix is None:
        return "no setup up to 64 ranks fits: choose a smaller student"
    world, variant, whole = fix
    flags = " --fsdp" + " --gradient-checkpointing" * variant.gradient_checkpointing
    flags += f" --optimizer {variant.optimizer}" * (variant.optimizer != "adamw")
    text = (
        f"it fits with `torchrun --nproc-per-node {world} -m logitcache.cli train ..."
        f"{flags}` (keep the global batch: --grad-accum x ranks)"
    )
    if not whole:
        text += ", with a smaller --batch-size and --chunk-size for the activations"
    return text
