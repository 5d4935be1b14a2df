"""``logitcache bench train``: what a training step costs under three kinds of supervision.

In: a student config (a transformers config with ``model_type``; default a 4x128 Llama with
a 32,000-word vocabulary) and sizes. Out: a ``TrainBench`` of measured numbers.

A teacher ``teacher_width`` times wider than the student is made at random (same depth and
vocabulary), and ``precompute`` writes its top-k cache once. Then the same student (same
seed, same initial weights) trains on the same batches (the cache's sequences in index
order, collated by ``DistillCollator``) under:

- (a) ``ce``: ``DistillModule`` with cross-entropy only;
- (b) ``offline-kd``: ``DistillModule`` with forward KL, bucket tail, targets from the
  cache: what ``logitcache train`` does;
- (c) ``online-kd``: the teacher in memory, its forward under ``no_grad`` each step, and
  the full-vocabulary forward KL of the student's logits against it (TRL's GKD with
  beta=0, torchtune's KD recipe: both materialize [B, L, V] logits for both models);
- (d) ``hf-trainer``: (b)'s loss through the Hugging Face ``Trainer``
  (``DistillationTrainer`` over a ``CacheDataset``, ``bench.train_hf``): what a user's own
  training stack costs against ``logitcache train``'s loop.

A step is forward, backward, grad clip, AdamW step, like ``logitcache train``'s step, with bf16
autocast on CUDA. Step time is the median over the steps after ``warmup``, synchronized.

Peak memory: each variant runs in a fresh Python process (``isolate=True``). On CUDA it is
``torch.cuda.max_memory_allocated`` (the batches live on the host until their step). On
CPU it is the peak RSS of that process minus its RSS after setup (imports and the collated
batches; the high-water mark is reset there on Linux, else ``ru_maxrss`` is used), so it
counts the models' weights (the teacher's too, for (c)), optimizer state and activations.
In-process runs report no CPU peak: memory freed by an earlier variant stays in the
allocator and would hide the next one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.core.errors import LogitcacheError
from logitcache.toy import ToyModelSpec, llama_config_dict

from .peak import VariantPeak, sync
from .precompute import BENCH_TEACHER, synthetic_corpus, synthetic_tokenizer, synthetic_words
from .variant import VariantResult, build_model, read_student_config

__all__ = [
    "DEFAULT_STUDENT",
    "VARIANTS",
    "TrainBench",
    "VariantResult",
    "default_student_config",
    "format_train",
    "run_train_bench",
    "train_as_dict",
]

VARIANTS = ("ce", "offline-kd", "online-kd", "hf-trainer")
_RESULT_PREFIX = "BENCH-TRAIN-RESULT "
_CHUNK_SIZE = 1024  # rows per loss chunk, TrainConfig's default


@dataclass
class TrainBench:
    device: str
    threads: int
    memory_method: str
    student: str
    teacher: str
    student_params: int
    teacher_params: int
    vocab: int
    seq_len: int
    batch_size: int
    steps: int
    warmup: int
    top_k: int
    cache_bytes_per_token: float
    cache_s: float
    """Building the cache once with ``run_precompute`` (teacher loading included)."""
    variants: list[VariantResult]
    time_b_over_a: float
    time_c_over_b: float
    memory_b_over_a: float | None
    memory_c_over_b: float | None
    time_d_over_b: float
    """The HF Trainer path over ``logitcache train``'s step (goal: within 1.05x)."""
    memory_d_over_b: float | None
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]


DEFAULT_STUDENT = ToyModelSpec(
    hidden=128,
    layers=4,
    heads=4,
    intermediate=344,
    max_positions=None,
    vocab_size=32_000,
    tie_embeddings=False,
    init_std=0.02,
)
"""The default student: a 4x128 Llama (9M params, 8M of them the 32k vocabulary)."""


def default_student_config(shape: ToyModelSpec = DEFAULT_STUDENT) -> dict[str, Any]:
    """The config dict of ``shape`` (default: :data:`DEFAULT_STUDENT`)."""
    return llama_config_dict(shape)


def _teacher_config(student: dict[str, Any], width: int) -> dict[str, Any]:
    """The student's config, ``width`` times wider, with logits peaked like a trained LM's."""
    teacher = dict(student)
    teacher["hidden_size"] = student["hidden_size"] * width
    teacher["intermediate_size"] = student["intermediate_size"] * width
    teacher.pop("head_dim", None)  # follows hidden_size / heads
    teacher["initializer_range"] = BENCH_TEACHER.init_std
    return teacher


def _describe(config: dict[str, Any]) -> str:
    return (
        f"{config['model_type']} {config.get('num_hidden_layers', '?')}x{config['hidden_size']}"
        f" (MLP {config['intermediate_size']}, vocab {config['vocab_size']:,})"
    )


def run_train_bench(
    *,
    student_config: str | dict[str, Any] | None = None,
    teacher_width: int = 4,
    steps: int = 5,
    warmup: int = 1,
    batch_size: int = 4,
    seq_len: int = 256,
    top_k: int = 64,
    device: str = "auto",
    isolate: bool = True,
    workdir: str | None = None,
    seed: int = 0,
) -> TrainBench:
    """Time ``steps`` training steps (after ``warmup``) of each variant on the same batches.

    ``student_config``: a JSON/YAML file or a dict (transformers config with model_type);
    None takes ``default_student_config()``.
    """
    from logitcache.models import resolve_device

    _check_sizes(steps, warmup, batch_size, seq_len, teacher_width)
    dev = resolve_device(device)
    loadavg_before = os.getloadavg()
    student, tokenizer = _student(student_config, seq_len)
    teacher = _teacher_config(student, teacher_width)
    n_sequences = (steps + warmup) * batch_size

    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=workdir) as tmp:
        teacher_dir, student_file = _write_models(Path(tmp), student, teacher, tokenizer, seed)
        cache, manifest, cache_s = _bench_cache(
            Path(tmp),
            teacher_dir,
            student["vocab_size"],
            sequences=n_sequences,
            seq_len=seq_len,
            top_k=top_k,
            shard_sequences=batch_size,
            device=str(dev),
        )

        job = {
            "cache": cache,
            "student_config": str(student_file),
            "teacher": str(teacher_dir),
            "steps": steps,
            "warmup": warmup,
            "batch_size": batch_size,
            "device": str(dev),
            "seed": seed,
            "threads": torch.get_num_threads(),
        }
        runs = [
            _run_isolated({**job, "variant": v}) if isolate else run_variant({**job, "variant": v})
            for v in VARIANTS
        ]

    return TrainBench(
        device=str(dev),
        threads=torch.get_num_threads(),
        memory_method=_memory_method(dev, isolate),
        student=_describe(student),
        teacher=_describe(teacher),
        student_params=_count_params(student),
        teacher_params=_count_params(teacher),
        vocab=student["vocab_size"],
        seq_len=seq_len,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        top_k=top_k,
        cache_bytes_per_token=manifest.bytes / manifest.n_tokens,
        cache_s=cache_s,
        variants=runs,
        **_comparisons(runs),
        loadavg_before=loadavg_before,
        loadavg_after=os.getloadavg(),
    )


def _write_models(
    tmp: Path, student: dict[str, Any], teacher: dict[str, Any], tokenizer: Any, seed: int
) -> tuple[Path, Path]:
    """(teacher directory, student config file): the random teacher (weights from
    ``seed + 1``) saved with ``tokenizer``, and the student's config as JSON."""
    teacher_dir = tmp / "teacher"
    build_model(teacher, seed + 1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(str(teacher_dir))
    student_file = tmp / "student.json"
    student_file.write_text(json.dumps(student))
    return teacher_dir, student_file


def _memory_method(dev: torch.device, isolate: bool) -> str:
    """How the variants' peak memory is measured on ``dev``."""
    if dev.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    if isolate:
        return "peak RSS minus RSS after setup, fresh process per variant"
    return "not measured (in-process on CPU)"


def _bench_cache(
    tmp: Path, teacher_dir: Path, vocab: int, *, sequences: int, seq_len: int, **settings: Any
) -> tuple[str, Any, float]:
    """(directory, manifest, seconds) of the cache that every variant trains on: ``sequences``
    x ``seq_len`` tokens of a Zipf corpus over ``vocab``, built once with ``run_precompute``
    (teacher loading included in the seconds)."""
    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute

    words = synthetic_words(min(vocab - 3, 4096))
    corpus = synthetic_corpus(tmp / "corpus.txt", words, sequences * seq_len + 1000)
    t0 = time.perf_counter()
    cache = str(tmp / "cache")
    spec = CorpusSpec(data=(str(corpus),), seq_len=seq_len, max_tokens=sequences * seq_len)
    result = run_precompute(
        PrecomputeConfig(teacher=str(teacher_dir), out=cache, corpus=spec, **settings)
    )
    assert result.manifest is not None
    return cache, result.manifest, time.perf_counter() - t0


def _comparisons(runs: list[VariantResult]) -> dict[str, float | None]:
    """Step time and peak memory of each variant over the one it is compared with: b (offline
    KD) over a (cross-entropy), c (online KD) and d (the HF Trainer) over b; a memory ratio
    is None where a peak was not measured."""
    a, b, c, d = runs
    ratio = lambda x, y: x / y if x is not None and y else None  # noqa: E731
    return {
        "time_b_over_a": b.step_s / a.step_s,
        "time_c_over_b": c.step_s / b.step_s,
        "memory_b_over_a": ratio(b.peak_bytes, a.peak_bytes),
        "memory_c_over_b": ratio(c.peak_bytes, b.peak_bytes),
        "time_d_over_b": d.step_s / b.step_s,
        "memory_d_over_b": ratio(d.peak_bytes, b.peak_bytes),
    }


def _student(config: str | dict[str, Any] | None, seq_len: int) -> tuple[dict[str, Any], Any]:
    """(the student's config dict, a synthetic tokenizer of its vocabulary)."""
    student = (
        read_student_config(config)
        if isinstance(config, str)
        else dict(config or default_student_config())
    )
    tokenizer = synthetic_tokenizer(student["vocab_size"])
    ids = {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    student = {**student, **ids}
    student["max_position_embeddings"] = max(student.get("max_position_embeddings", 0), seq_len)
    return student, tokenizer


def _check_sizes(steps: int, warmup: int, batch_size: int, seq_len: int, width: int) -> None:
    checks = [
        (steps >= 1, f"--steps must be >= 1, got {steps}"),
        (warmup >= 0, f"--warmup must be >= 0, got {warmup}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (seq_len >= 2, f"--seq-len must be >= 2, got {seq_len}"),
        (width >= 1, f"--teacher-width must be >= 1, got {width}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LogitcacheError(message)


def _count_params(config: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = build_model(config, 0)
    return sum(p.numel() for p in model.parameters())


# -- one variant ----------------------------------------------------------------------------
def _run_isolated(job: dict[str, Any]) -> VariantResult:
    """``run_variant`` in a fresh interpreter, so its peak RSS is its own."""
    code = (
        "import sys; from logitcache.bench.train import _variant_main; _variant_main(sys.argv[1])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        what = f"bench variant {job['variant']} failed (exit {proc.returncode})"
        raise RuntimeError(f"{what}:\n{proc.stderr[-4000:]}")
    return VariantResult(**json.loads(lines[-1].removeprefix(_RESULT_PREFIX)))


def _variant_main(job_json: str) -> None:
    job = json.loads(job_json)
    torch.set_num_threads(job["threads"])  # the parent's
    result = run_variant(job, measure_rss=True)
    print(_RESULT_PREFIX + json.dumps(asdict(result)), flush=True)


def run_variant(job: dict[str, Any], *, measure_rss: bool = False) -> VariantResult:
    """Train ``job['variant']`` for warmup + steps batches and time it (see module docstring)."""
    from transformers import AutoModelForCausalLM

    from logitcache.train import CacheDataset, DistillationLoss, DistillCollator
    from logitcache.train.student import DistillModule

    variant, device = job["variant"], torch.device(job["device"])
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant == "hf-trainer":
        from .train_hf import run_hf_variant

        return run_hf_variant(job, measure_rss=measure_rss)
    student_config = json.loads(Path(job["student_config"]).read_text())
    vocab = student_config["vocab_size"]
    data = CacheDataset(job["cache"], split="all", vocab_limit=vocab, verify=False)
    size, n = job["batch_size"], job["steps"] + job["warmup"]
    collate = DistillCollator()
    batches = [
        collate([data[i] for i in range(s, s + size)]) for s in range(0, n * size, size)
    ]  # DistillCollator dicts: input_ids [B, L], teacher_ids [B, L, K], ...

    # -- setup: everything the variant adds is measured from here ----------------------
    memory = VariantPeak(device, measure_rss)
    memory.start()
    model = build_model(student_config, job["seed"]).to(device).train()
    teacher = None
    if variant == "online-kd":
        # Frozen: bf16 weights on CUDA (as TRL/torchtune load a teacher), fp32 on CPU.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(job["teacher"], dtype=dtype)
        teacher.to(device).eval().requires_grad_(False)
    else:
        loss = "ce" if variant == "ce" else "forward-kl"
        module = DistillModule(model, DistillationLoss(loss, chunk_size=_CHUNK_SIZE))
    optimizer = _optimizer(model)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else (contextlib.nullcontext())
    )

    # -- steps -----------------------------------------------------------------------------
    times, cpu_times, loss = [], [], float("nan")
    for cpu_batch in batches:
        sync(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        n_rows = int(DistillationLoss.trained(cpu_batch).sum())
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        with autocast:
            if teacher is None:
                loss_sum = module(batch, n_rows)
            else:
                loss_sum = _online_kd(model, teacher, batch)
        (loss_sum / max(n_rows, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.item() / max(n_rows, 1)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu0)

    peak = memory.added()
    timed, warm = times[job["warmup"] :], job["warmup"]
    tokens = int(batches[0]["attention_mask"].sum())
    step_s = statistics.median(timed)
    return VariantResult(
        variant,
        step_s,
        timed,
        statistics.median(cpu_times[warm:]),
        tokens,
        tokens / step_s,
        peak,
        loss,
    )


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """``logitcache train``'s AdamW (no decay on vectors)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def _online_kd(student, teacher, batch) -> torch.Tensor:
    """Summed KL(teacher || student) over the full vocabulary at the trained rows."""
    import torch.nn.functional as F

    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    trained = batch["labels"][:, 1:] != -100  # [B, L-1]
    logits = student(input_ids=input_ids, attention_mask=mask).logits  # [B, L, V]
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=mask).logits  # [B, L, V]
    s_logp = F.log_softmax(logits[:, :-1][trained].float(), dim=-1)  # [N, V] float32
    t_logp = F.log_softmax(t_logits[:, :-1][trained].float(), dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")


# -- output -----------------------------------------------------------------------------------
def format_train(r: TrainBench) -> str:
    mb = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    load = lambda avg: " ".join(f"{v:.2f}" for v in avg)  # noqa: E731
    lines = [
        f"student     {r.student}: {r.student_params / 1e6:.1f}M params",
        f"teacher     {r.teacher}: {r.teacher_params / 1e6:.1f}M params "
        f"({r.teacher_params / r.student_params:.1f}x)",
        f"batches     {r.batch_size} x {r.seq_len} tokens; median of {r.steps} steps after "
        f"{r.warmup} warm-up; cache top-{r.top_k}, {r.cache_bytes_per_token:.0f} B/token, "
        f"built once in {r.cache_s:.1f} s",
        f"device      {r.device}, torch threads {r.threads}; peak memory: {r.memory_method}",
        f"{'variant':16} {'step ms':>9} {'cpu ms':>9} {'tok/s':>9} {'peak MiB':>9} {'loss':>8}",
    ]
    for label, v in zip(("(a)", "(b)", "(c)", "(d)"), r.variants):
        lines.append(
            f"{label} {v.variant:12} {v.step_s * 1000:9.0f} {v.step_cpu_s * 1000:9.0f} "
            f"{v.tokens_per_s:9,.0f} "
            f"{mb(v.peak_bytes):>9} {v.final_loss:8.3f}"
        )
    lines += [
        f"b/a         time {x(r.time_b_over_a)}   memory {x(r.memory_b_over_a)}",
        f"c/b         time {x(r.time_c_over_b)}   memory {x(r.memory_c_over_b)}",
        f"d/b         time {x(r.time_d_over_b)}   memory {x(r.memory_d_over_b)}",
        f"load avg    {load(r.loadavg_before)} before, {load(r.loadavg_after)} after",
    ]
    return "\n".join(lines)


def train_as_dict(r: TrainBench) -> dict[str, Any]:
    return asdict(r)
