"""``logitcache demo``: the whole story on a laptop CPU, with no download.

In: the running Python's standard library source. Out (under ``--out``): a teacher-logit
cache, two students (cross-entropy only, and distilled from the cache) trained on the same
tokens for the same steps, a table of held-out cross-entropy and KL to the teacher, a PNG
of the held-out curves, and the exact commands that produced each artifact.

The regime is the everyday one where distillation pays: the teacher has learned from the
whole corpus (pretrained here on first run, then reused from ``~/.cache/logitcache``), while
the cache covers only a smaller slice and both students see only that slice.

The stages run as library calls (``run_precompute``, ``train``) on configs; the command
lines printed are those configs' ``to_argv()``. The demo owns ``--out``: outputs of an
earlier demo of another size are removed before any work (``claim_out``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import Reporter
from logitcache.precompute.config import PrecomputeConfig
from logitcache.precompute.corpus import CorpusSpec
from logitcache.precompute.defaults import DEFAULT_SAMPLES
from logitcache.train.config import TrainConfig

__all__ = [
    "FULL",
    "HELDOUT_STORE",
    "QUICK",
    "DemoBudget",
    "claim_out",
    "command_line",
    "default_home",
    "ensure_teacher",
    "precompute_config",
    "prepare_corpus",
    "read_evals",
    "run_cache",
    "run_demo",
    "take_text",
    "teacher_heldout_ce",
    "train_config",
    "write_student_config",
]


@dataclass(frozen=True)
class DemoBudget:
    """Sizes and steps of one demo variant (full or quick)."""

    name: str
    vocab_size: int
    """Byte-level BPE vocabulary trained on the corpus."""
    teacher_hidden: int
    teacher_layers: int
    teacher_heads: int
    teacher_intermediate: int
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    seq_len: int
    slice_tokens: int
    """Tokens of the slice the cache covers and both students train on."""
    heldout_tokens: int
    """Tokens of held-out files (never seen by teacher or students) for evaluation."""
    student_hidden: int
    student_layers: int
    student_heads: int
    student_intermediate: int
    student_steps: int
    student_batch: int
    student_lr: float
    eval_every: int
    teacher_text_bytes: int | None = None
    """Train tokenizer and teacher on at most this much text (None: the whole split)."""

    def teacher_key(self) -> str:
        """Teachers are reused when everything that shapes them is equal."""
        fields = {k: v for k, v in asdict(self).items() if k.startswith(("teacher", "vocab"))}
        fields["seq_len"] = self.seq_len
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


FULL = DemoBudget(
    name="full",
    vocab_size=4096,
    teacher_hidden=192,
    teacher_layers=4,
    teacher_heads=4,
    teacher_intermediate=512,
    teacher_steps=450,
    teacher_batch=16,
    teacher_lr=3e-3,
    seq_len=128,
    slice_tokens=150_000,
    heldout_tokens=30_000,
    student_hidden=64,
    student_layers=2,
    student_heads=2,
    student_intermediate=172,
    student_steps=300,
    student_batch=16,
    student_lr=3e-3,
    eval_every=50,
    teacher_text_bytes=6_000_000,
)
QUICK = DemoBudget(
    name="quick",
    vocab_size=1024,
    teacher_hidden=64,
    teacher_layers=2,
    teacher_heads=2,
    teacher_intermediate=172,
    teacher_steps=60,
    teacher_batch=8,
    teacher_lr=3e-3,
    seq_len=64,
    slice_tokens=20_000,
    heldout_tokens=5_000,
    student_hidden=32,
    student_layers=1,
    student_heads=2,
    student_intermediate=86,
    student_steps=30,
    student_batch=8,
    student_lr=3e-3,
    eval_every=10,
    teacher_text_bytes=1_500_000,
)


HELDOUT_STORE = {"top_k": 256, "logprob_codec": "float32"}
"""How evaluation caches are written: KL measured against nearly the whole teacher."""
_MARKER = ".logitcache-demo.json"
_OWNED = (
    "cache",
    "heldout-cache",
    "student-ce-only",
    "student-distilled",
    "slice.jsonl",
    "heldout.jsonl",
    "student_config.json",
    "summary.json",
    "demo.png",
)


def default_home() -> Path:
    """Where the demo keeps its teacher: $LOGITCACHE_HOME or ~/.cache/logitcache."""
    env = os.environ.get("LOGITCACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "logitcache"


def command_line(config: PrecomputeConfig | TrainConfig) -> str:
    """The shell command that runs ``config``."""
    command = "precompute" if isinstance(config, PrecomputeConfig) else "train"
    return " ".join(["logitcache", command, *map(shlex.quote, config.to_argv())])


def claim_out(out: Path, budget: DemoBudget, reporter: Reporter) -> None:
    """Make ``out`` this demo's: outputs of a demo of another size are removed, files the
    demo did not write are refused (one line, before any expensive work)."""
    identity = {"demo": budget.name, "budget": asdict(budget)}
    marker = out / _MARKER
    present = [name for name in _OWNED if (out / name).exists()]
    if present:
        previous = _previous_demo(out)
        if previous is None:
            raise LogitcacheError(
                f"--out {out} already holds {', '.join(present)}, not written by a demo: choose "
                "an empty or new --out"
            )
        if previous != identity:
            reporter.log(
                f"replacing the outputs of the earlier {previous.get('demo')} demo in {out}"
            )
            for name in present:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=1))


def _previous_demo(out: Path) -> dict[str, Any] | None:
    """The identity of the demo whose outputs are in ``out`` (None: not a demo's)."""
    for name, read in (
        (_MARKER, lambda d: d),
        ("summary.json", lambda d: {"demo": d["budget"]["name"], "budget": d["budget"]}),
    ):
        try:
            return read(json.loads((out / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def prepare_corpus(
    docs: list[tuple[str, str]], budget: DemoBudget, out: Path
) -> tuple[list[tuple[str, str]], Path, Path]:
    """(teacher training docs, slice .jsonl, held-out .jsonl): a stable 5 % of the files is
    held out; the slice is a part of the rest, about ``budget.slice_tokens`` tokens."""
    from logitcache import toy

    train_docs, heldout_docs = toy.split_heldout(docs, 0.05)
    slice_docs = take_text(train_docs, budget.slice_tokens * 4)  # ~4 bytes per token
    held_docs = take_text(heldout_docs, budget.heldout_tokens * 4)
    slice_file = toy.write_jsonl(slice_docs, out / "slice.jsonl")
    held_file = toy.write_jsonl(held_docs, out / "heldout.jsonl")
    return train_docs, slice_file, held_file


def ensure_teacher(
    train_docs: list[tuple[str, str]],
    budget: DemoBudget,
    home: Path,
    *,
    tag: str,
    reporter: Reporter,
    seed: int = 0,
) -> Path:
    """A teacher pretrained on ``train_docs``, made once and reused from ``home``."""
    from logitcache import toy

    teacher_dir = home / f"{tag}-teacher-{budget.name}-{budget.teacher_key()}"
    if (teacher_dir / "config.json").is_file():
        reporter.log(f"reusing the teacher in {teacher_dir}")
        return teacher_dir
    reporter.log(f"first run: pretraining a teacher into {teacher_dir} (kept for later runs)")
    if budget.teacher_text_bytes is not None:
        train_docs = take_text(train_docs, budget.teacher_text_bytes)
    tok_dir = home / "corpus" / f"{tag}-tok-{budget.name}-{budget.teacher_key()}"
    tokenizer = toy.train_tokenizer([t for _, t in train_docs], budget.vocab_size, tok_dir)
    tokens = toy.tokenize_corpus(train_docs, tokenizer)
    spec = toy.ToyModelSpec(
        hidden=budget.teacher_hidden,
        layers=budget.teacher_layers,
        heads=budget.teacher_heads,
        intermediate=budget.teacher_intermediate,
        max_positions=budget.seq_len,
    )
    toy.pretrain(
        teacher_dir,
        tokenizer,
        tokens,
        spec=spec,
        steps=budget.teacher_steps,
        batch_size=budget.teacher_batch,
        seq_len=budget.seq_len,
        lr=budget.teacher_lr,
        seed=seed,
        progress=reporter.enabled,
    )
    return teacher_dir


def precompute_config(
    teacher: Path, data: Path, dest: Path, budget: DemoBudget, tokens: int, store: dict[str, Any]
) -> PrecomputeConfig:
    """The teacher pass of a demo or study cache; ``store``: how the cache stores targets
    (e.g. ``{"top_k": 8}``; default: sampled, as ``precompute``'s default)."""
    mode = {} if "top_k" in store or "samples" in store else {"samples": DEFAULT_SAMPLES}
    corpus = CorpusSpec(data=(str(data),), seq_len=budget.seq_len, max_tokens=tokens)
    return PrecomputeConfig(
        teacher=str(teacher),
        out=str(dest),
        corpus=corpus,
        shard_sequences=64,
        device="cpu",
        **mode,
        **store,
    )


def train_config(
    cache: Path,
    out: Path,
    config: Path,
    held_cache: Path,
    budget: DemoBudget,
    extra: dict[str, Any],
    seed: int = 0,
    steps: int | None = None,
    quiet: bool = True,
) -> TrainConfig:
    """The training run of a demo or study student; ``extra``: its own settings. The
    student's tokenizer is the one stored in the cache."""
    steps = steps or budget.student_steps
    return TrainConfig(
        cache=str(cache),
        out=str(out),
        student_config=str(config),
        eval_cache=str(held_cache),
        eval_fraction=0.0,
        steps=steps,
        batch_size=budget.student_batch,
        lr=budget.student_lr,
        warmup_steps=steps // 10,
        eval_every=budget.eval_every,
        seed=seed,
        loader_workers=0,
        device="cpu",
        quiet=quiet,
        overwrite=True,  # the demo owns its out (claim_out): a rerun trains its students again
        **extra,
    )


def run_cache(config: PrecomputeConfig, reporter: Reporter) -> None:
    """Write (or finish) the cache of ``config``."""
    from logitcache.describe import summary_text
    from logitcache.precompute import run_precompute

    result = run_precompute(config, reporter)
    if result.manifest is not None and result.manifest.complete:
        reporter.log(summary_text(result.manifest, config.out))


def run_demo(
    budget: DemoBudget, *, home: Path, out: Path, reporter: Reporter, seed: int = 0
) -> dict[str, Any]:
    """Run every stage; returns the summary also written to ``out/summary.json``."""
    import torch

    from logitcache import toy
    from logitcache.train import train

    claim_out(out, budget, reporter)
    timings: dict[str, float] = {}
    commands: list[str] = []
    torch.manual_seed(seed)

    # 1. corpus: stdlib files, a stable held-out split, the slice the students will see
    t0 = time.perf_counter()
    docs = toy.stdlib_documents()
    train_docs, slice_file, held_file = prepare_corpus(docs, budget, out)
    reporter.log(f"corpus: {len(docs)} stdlib files, {len(train_docs)} for the teacher")

    # 2. tokenizer + teacher, pretrained once on the whole training split and reused
    teacher_dir = ensure_teacher(
        train_docs, budget, home, tag="stdlib", reporter=reporter, seed=seed
    )
    timings["teacher"] = time.perf_counter() - t0

    # 3. the teacher pass: the slice (for training) and the held-out files (for evaluation)
    t0 = time.perf_counter()
    cache, held_cache = out / "cache", out / "heldout-cache"
    # the training cache in the default mode; the held-out cache keeps 256 ids in float32,
    # so "KL to teacher" is measured against nearly the whole teacher distribution
    for data, dest, tokens, store in (
        (slice_file, cache, budget.slice_tokens, {}),
        (held_file, held_cache, budget.heldout_tokens, HELDOUT_STORE),
    ):
        config = precompute_config(teacher_dir, data, dest, budget, tokens, store)
        commands.append(command_line(config))
        run_cache(config, reporter)
    timings["precompute"] = time.perf_counter() - t0

    # 4. two students on the same tokens and steps: cross-entropy only, and distilled
    student_config = write_student_config(budget, teacher_dir, out)
    results = {}
    for name, loss in (("ce-only", {"loss": "ce"}), ("distilled", {})):
        t0 = time.perf_counter()
        config = train_config(
            cache,
            out / f"student-{name}",
            student_config,
            held_cache,
            budget,
            loss,
            seed,
            quiet=not reporter.enabled,
        )
        commands.append(command_line(config))
        train(config)
        timings[name] = time.perf_counter() - t0
        results[name] = read_evals(out / f"student-{name}" / "metrics.jsonl")

    # 5. the teacher's own held-out numbers, on the same held-out sequences
    teacher_ce = teacher_heldout_ce(teacher_dir, held_cache)
    summary = _summarize(budget, out, cache, teacher_ce, results, timings, commands)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, out / "demo.png")
    return summary


def write_student_config(budget: DemoBudget, teacher_dir: Path, out: Path) -> Path:
    path = out / "student_config.json"
    path.write_text(json.dumps(_student_config(budget, _vocab_of(teacher_dir)), indent=1))
    return path


def take_text(docs: list[tuple[str, str]], n_bytes: int) -> list[tuple[str, str]]:
    """Files in (stable hash) order until about n_bytes of text."""
    ordered = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    taken, size = [], 0
    for path, text in ordered:
        if size >= n_bytes:
            break
        taken.append((path, text))
        size += len(text.encode())
    return taken


def _vocab_of(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def _student_config(b: DemoBudget, vocab: int) -> dict[str, Any]:
    from logitcache import toy

    shape = toy.ToyModelSpec(
        hidden=b.student_hidden,
        layers=b.student_layers,
        heads=b.student_heads,
        intermediate=b.student_intermediate,
        max_positions=b.seq_len,
        vocab_size=vocab,
    )
    return toy.llama_config_dict(shape)


def read_evals(path: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in rows if "eval_ce" in r]


def teacher_heldout_ce(teacher_dir: Path, held_cache: Path) -> float:
    """The teacher's cross-entropy on the trained positions of the held-out cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.storage import CacheReader

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for record in CacheReader(held_cache):
            ids = torch.from_numpy(record.input_ids.astype("int64"))[None]
            logits = model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
            mask = torch.from_numpy(record.loss_mask[1:])
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(ce[mask].sum())
            n += int(mask.sum())
    return total / max(n, 1)


def _summarize(budget, out, cache, teacher_ce, results, timings, commands) -> dict[str, Any]:
    from logitcache.storage import Location, read_manifest

    manifest = read_manifest(Location(cache))
    final = {name: rows[-1] for name, rows in results.items()}
    ce_only, kd = final["ce-only"]["eval_ce"], final["distilled"]["eval_ce"]
    return {
        "budget": asdict(budget),
        "out": str(out),
        "teacher_heldout_ce": teacher_ce,
        "students": {n: {k: r[k] for k in ("eval_ce", "eval_kl")} for n, r in final.items()},
        "curves": results,
        "distilled_minus_ce_only": kd - ce_only,
        "cache_bytes_per_token": manifest.stats()["bytes_per_token"],
        "cache_mode": f"top-{manifest.spec.k}"
        if manifest.spec.mode == "topk"
        else f"sampled N={manifest.spec.samples}",
        "cache_tokens": manifest.n_tokens,
        "timings_s": timings,
        "commands": commands,
    }


def format_summary(s: dict[str, Any]) -> str:
    st = s["students"]
    t = s["timings_s"]
    rows = [
        f"{'model':28} {'held-out CE':>12} {'KL to teacher':>14} {'wall s':>8}",
        f"{'teacher (pretrained)':28} {s['teacher_heldout_ce']:12.4f} {'0':>14} "
        f"{t['teacher']:8.0f}",
        f"{'student, cross-entropy only':28} {st['ce-only']['eval_ce']:12.4f} "
        f"{st['ce-only']['eval_kl']:14.4f} {t['ce-only']:8.0f}",
        f"{'student, distilled (cache)':28} {st['distilled']['eval_ce']:12.4f} "
        f"{st['distilled']['eval_kl']:14.4f} {t['distilled']:8.0f}",
    ]
    gain = -s["distilled_minus_ce_only"]
    verdict = "beats" if gain > 0 else "does NOT beat"
    rows += [
        "",
        f"cache: {s['cache_tokens']:,} tokens at {s['cache_bytes_per_token']:.1f} bytes/token "
        f"({s['cache_mode']}), teacher pass {t['precompute']:.0f} s",
        f"the distilled student {verdict} the cross-entropy-only student by {gain:.4f} nats/token",
        f"outputs in {s['out']}: cache/, student-*/model/ (from_pretrained), demo.png, "
        "summary.json",
        "",
        "commands run (rerun them with your own --teacher, --data and --student):",
        *[f"  {c}" for c in s["commands"]],
    ]
    return "\n".join(rows)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, rows in summary["curves"].items():
        ax.plot([r["step"] for r in rows], [r["eval_ce"] for r in rows], marker="o", label=name)
    ax.axhline(summary["teacher_heldout_ce"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("student optimizer step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("logitcache demo: students trained on the same slice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
