"""``logitcache bench memory``: memory per parameter and step time of DDP vs FSDP.

In: a student config (default an 8x512 Llama, 16k vocabulary, 33.7M parameters), the ranks
and micro-batch sizes. Out: a ``MemoryBench``: for each variant, measured per rank,

- ``ddp``: DDP, float32, AdamW (a whole student per rank);
- ``fsdp``: FSDP2 over the ranks (``train.sharding.shard_student``);
- ``fsdp-gc``: + gradient checkpointing;
- ``fsdp-gc-8bit``: + torchao's 8-bit AdamW (skipped without torchao).

Each variant runs under ``torchrun`` (gloo on CPU, nccl on CUDA) once per micro-batch size,
the same student (same seed) and the same random top-k targets, the step of
``train.loop._step``: forward KL from ``DistillModule``, backward, clip, optimizer step.

Memory is the largest peak over the ranks. On CUDA: ``torch.cuda.max_memory_allocated``.
On CPU: the peak RSS minus the RSS before the student was built; the high-water mark is
reset after building and sharding it (a whole float32 student exists on every rank for a
moment while it is built, as in ``logitcache train``), and glibc is told to map every
block of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave
the RSS and it follows live memory. With two micro-batch sizes the peak is split into a
part that grows with tokens (activations, per token) and the rest, which divided by the
parameters is the bytes per parameter that ``train.memory`` predicts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from logitcache.toy import ToyModelSpec

from .peak import PeakRSS, status_kib
from .train import default_student_config

__all__ = ["MEMORY_VARIANTS", "MemoryBench", "format_memory", "run_memory_bench"]

MEMORY_VARIANTS = ("ddp", "fsdp", "fsdp-gc", "fsdp-gc-8bit")
_PREFIX = "BENCH-MEMORY-RESULT "
_TOP_K = 64


@dataclass
class MemoryRun:
    variant: str
    batch_size: int
    peak_bytes: int
    """Largest over the ranks (see the module docstring)."""
    step_s: float
    """Median step time after warm-up (rank 0)."""
    loss: float
    state_bytes: int = 0
    """Bytes of this rank's weights, gradients and optimizer state tensors at the end of
    the last step (largest over the ranks), counted from their storage."""


@dataclass
class MemoryBench:
    student: str
    params: int
    device: str
    nproc: int
    seq_len: int
    memory_method: str
    runs: list[MemoryRun]
    per_param: dict[str, float]
    """Bytes per parameter of the peak, its token-proportional part removed."""
    per_token: dict[str, float]
    """Peak bytes added per token of the micro-batch (activations)."""
    state_per_param: dict[str, float]
    """Weights, gradients and optimizer state per parameter (counted tensor bytes)."""
    predicted_per_param: dict[str, float]
    """What ``train.memory.footprint`` predicts for states + working set, per parameter."""
    loadavg: tuple[float, float, float]


def run_memory_bench(
    *,
    student_config: dict[str, Any] | None = None,
    nproc: int = 2,
    seq_len: int = 128,
    batch_sizes: tuple[int, ...] = (1, 4),
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    variants: tuple[str, ...] = MEMORY_VARIANTS,
) -> MemoryBench:
    """Run every variant at every micro-batch size (see the module docstring)."""
    student = dict(student_config or default_memory_student())
    student["max_position_embeddings"] = max(student.get("max_position_embeddings", 0), seq_len)
    runs = []
    for variant in variants:
        if variant.endswith("8bit") and not _has_torchao():
            continue
        for b in batch_sizes:
            job = {
                "student": student,
                "variant": variant,
                "batch_size": b,
                "seq_len": seq_len,
                "steps": steps,
                "warmup": warmup,
                "device": device,
            }
            runs.append(_launch(job, nproc))
    params = _count_params(student)
    per_param, per_token, predicted, state = {}, {}, {}, {}
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = sorted((r for r in runs if r.variant == variant), key=lambda r: r.batch_size)
        lo, hi = mine[0], mine[-1]
        slope = 0.0
        if hi.batch_size > lo.batch_size:
            slope = (hi.peak_bytes - lo.peak_bytes) / ((hi.batch_size - lo.batch_size) * seq_len)
        per_token[variant] = slope
        per_param[variant] = (lo.peak_bytes - slope * lo.batch_size * seq_len) / params
        predicted[variant] = _predicted(student, variant, nproc, device) / params
        state[variant] = max(r.state_bytes for r in mine) / params
    method = (
        "torch.cuda.max_memory_allocated"
        if device.startswith("cuda")
        else "peak RSS minus RSS before the student, MALLOC_MMAP_THRESHOLD_=65536"
    )
    return MemoryBench(
        _describe(student),
        params,
        device,
        nproc,
        seq_len,
        method,
        runs,
        per_param,
        per_token,
        state,
        predicted,
        os.getloadavg(),
    )


def default_memory_student() -> dict[str, Any]:
    """An 8x512 Llama, 16k vocabulary, tied embeddings: 33.7M parameters, 75 % of them in
    decoder layers (Qwen2.5-1.5B: 85 %, -0.5B: 72 %), so that sharding layers matters as
    much as in the students it stands for."""
    shape = ToyModelSpec(
        hidden=512,
        layers=8,
        heads=8,
        intermediate=1376,
        max_positions=None,
        vocab_size=16384,
        init_std=0.02,
    )
    return default_student_config(shape)


def _has_torchao() -> bool:
    try:
        import torchao.optim  # noqa: F401
    except ImportError:
        return False
    return True


def _describe(c: dict[str, Any]) -> str:
    return (
        f"{c['model_type']} {c['num_hidden_layers']}x{c['hidden_size']} "
        f"(MLP {c['intermediate_size']}, vocab {c['vocab_size']:,})"
    )


def _build(student: dict[str, Any]):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in student.items() if k != "model_type"}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(student["model_type"], **kwargs))


def _count_params(student: dict[str, Any]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _build(student).parameters())


def _predicted(student: dict[str, Any], variant: str, nproc: int, device: str) -> float:
    from logitcache.train.memory import Setup, StudentShape, footprint

    with torch.device("meta"):
        shape = StudentShape.of(_build(student))
    setup = Setup(
        world_size=nproc,
        fsdp=variant != "ddp",
        gradient_checkpointing="gc" in variant,
        optimizer="adamw8bit" if variant.endswith("8bit") else "adamw",
        bf16=device.startswith("cuda"),
    )
    return footprint(shape, setup).floor


def _launch(job: dict[str, Any], nproc: int) -> MemoryRun:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "logitcache.bench.train_memory",
        json.dumps(job),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench variant {job['variant']} failed:\n{proc.stderr[-4000:]}")
    return MemoryRun(**json.loads(lines[-1].removeprefix(_PREFIX)))


# -- one rank ---------------------------------------------------------------------------------
def _batch(b: int, seq: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A ``DistillCollator``-shaped batch of random tokens and random top-k targets."""
    ids = torch.randint(0, vocab, (b, seq), generator=gen)  # [B, L] int64
    top = torch.stack([torch.randperm(vocab, generator=gen)[:_TOP_K] for _ in range(b * seq)])
    probs = torch.softmax(torch.randn(b * seq, _TOP_K, generator=gen), -1) * 0.9
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "teacher_ids": top.view(b, seq, _TOP_K),  # [B, L, K] int64
        "teacher_probs": probs.view(b, seq, _TOP_K),  # [B, L, K] float32
        "teacher_valid": torch.ones(b, seq, _TOP_K, dtype=torch.bool),
        "teacher_tail": torch.full((b, seq), 0.1),
    }


def _rank_main(job: dict[str, Any]) -> None:
    import torch.distributed as dist

    from logitcache.train import DistillationLoss, sharding
    from logitcache.train.optim import make_optimizer
    from logitcache.train.student import DistillModule

    torch.set_num_threads(1)
    device = torch.device(job["device"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, b, seq = job["student"], job["batch_size"], job["seq_len"]
    gen = torch.Generator().manual_seed(1000 + rank)
    n = job["steps"] + job["warmup"]
    batches = [_batch(b, seq, student["vocab_size"], gen) for _ in range(n)]

    with torch.device("meta"):  # imports the model's code: its RSS is not the student's
        _build(student)
    from torch.nn.parallel import DistributedDataParallel

    before = status_kib("VmRSS") * 1024
    torch.manual_seed(0)
    model = _build(student)
    if "gc" in job["variant"]:
        sharding.enable_gradient_checkpointing(model)
    module = DistillModule(model, DistillationLoss("forward-kl", chunk_size=1024))
    bf16 = device.type == "cuda"
    if job["variant"] == "ddp":
        module.to(device)
        wrapped = DistributedDataParallel(module, device_ids=[device.index] if bf16 else None)
    else:
        wrapped = sharding.shard_student(module, device=device, world_size=world)
    name = "adamw8bit" if job["variant"].endswith("8bit") else "adamw"
    optimizer = make_optimizer(model, name, 1e-4, 0.1)
    rss = PeakRSS()
    rss.start()  # resets the high-water mark: the whole student built above is gone
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    rows = b * (seq - 1)  # every position but the last is trained
    times, loss = [], float("nan")
    for step in range(n):
        if step == job["warmup"]:  # the first steps' transients (torch.compile's) are not kept
            rss.start()
        t0 = time.perf_counter()
        with autocast:
            loss_sum = wrapped({k: v.to(device) for k, v in batches[step].items()}, rows)
        (loss_sum / rows).backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        optimizer.step()
        state = _state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.item() / rows
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = rss.base + rss.added() - before
    peaks = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, torch.tensor([float(peak), float(state)], dtype=torch.float64))
    if rank == 0:
        run = MemoryRun(
            job["variant"],
            b,
            int(max(p[0].item() for p in peaks)),
            statistics.median(times[job["warmup"] :]),
            loss,
            int(max(p[1].item() for p in peaks)),
        )
        print(_PREFIX + json.dumps(asdict(run)), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of weights, gradients and optimizer state (its shards under FSDP)."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [v for st in optimizer.state.values() for v in st.values()]
    return sum(_local_bytes(t) for t in tensors if isinstance(t, torch.Tensor))


def _local_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, of a DTensor's local shard, or of a tensor subclass's
    inner tensors (torchao's 8-bit state: codes and scales)."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    if hasattr(t, "__tensor_flatten__") and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_local_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# -- output -----------------------------------------------------------------------------------
def format_memory(r: MemoryBench) -> str:
    gb = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    lines = [
        f"student     {r.student}: {r.params / 1e6:.1f}M params; {r.nproc} ranks on {r.device}",
        f"memory      {r.memory_method}; seq_len {r.seq_len}",
        f"{'variant':14} {'batch':>5} {'peak MiB':>9} {'step s':>7} {'loss':>7}",
    ]
    lines += [
        f"{x.variant:14} {x.batch_size:5d} {gb(x.peak_bytes):>9} {x.step_s:7.2f} {x.loss:7.3f}"
        for x in r.runs
    ]
    lines.append(
        f"{'variant':14} {'peak B/param':>12} {'state B/param':>13} "
        f"{'predicted':>9} {'KiB/token':>9}"
    )
    for v, per in r.per_param.items():
        lines.append(
            f"{v:14} {per:12.2f} {r.state_per_param[v]:13.2f} "
            f"{r.predicted_per_param[v]:9.2f} {r.per_token[v] / 1024:9.1f}"
        )
    ddp = {x.batch_size: x.step_s for x in r.runs if x.variant == "ddp"}
    for x in r.runs:
        if x.variant == "fsdp" and x.batch_size in ddp:
            lines.append(
                f"step time fsdp / ddp at batch {x.batch_size}: {x.step_s / ddp[x.batch_size]:.2f}x"
            )
    lines.append("load avg    " + " ".join(f"{v:.2f}" for v in r.loadavg))
    return "\n".join(lines)


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
