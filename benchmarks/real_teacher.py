"""The cache-mode study on a real pretrained teacher (``python benchmarks/real_teacher.py``).

In: a teacher (a local ``.gguf`` or model directory; the study was sized for
SmolLM2-135M-Instruct Q4_1, vocabulary 49,152), tinyshakespeare and/or the Python standard
library source, a ``StudyBudget``. Out, under ``out``: per corpus a slice and a held-out
file, the caches (one teacher pass per cache mode), the teacher's full-vocabulary held-out
log-probs, one student per variant, and ``results.json`` (one row per finished variant,
kept across runs: a rerun skips them) plus ``caches.json`` (bytes by component per cache).

Every variant trains the same from-scratch student (a shrunk SmolLM2 config sharing the
teacher's tokenizer) on the same slice for the same steps, through the library's
``run_precompute`` / ``train``; each cache, reference and variant runs in its own process
(``python benchmarks/real_teacher.py --job JOB.json``), so a killed study loses at most one
job, and a killed student resumes from its last checkpoint. Students are evaluated on
held-out text they never saw: cross-entropy, and KL(teacher || student) over the full
vocabulary against the teacher's stored log-probs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import Reporter

__all__ = [
    "CORE",
    "FULL_STUDY",
    "QUICK_STUDY",
    "TWINS",
    "StudyBudget",
    "StudyConfig",
    "Variant",
    "first_pass_variants",
    "load_results",
    "run_study",
    "shakespeare_documents",
    "write_json",
]


@dataclass(frozen=True)
class StudyBudget:
    """Sizes of the study (see docs/benchmarks.md, "How the study was sized")."""

    name: str
    seq_len: int = 256
    slice_tokens: int = 40_960
    """Tokens of the slice every cache covers and every student trains on."""
    heldout_tokens: int = 8_192
    """Held-out tokens (files no student saw) for evaluation."""
    steps: int = 400
    batch_size: int = 4
    """Sequences per step: 4 x 256 = 1,024 tokens; 400 steps = 10 passes over the slice."""
    lr: float = 3e-3
    student_hidden: int = 128
    student_layers: int = 4
    student_heads: int = 4
    student_kv_heads: int = 2
    student_intermediate: int = 384
    threads: int = 2
    """torch threads per job."""


FULL_STUDY = StudyBudget(name="full")
QUICK_STUDY = StudyBudget(
    name="quick",
    seq_len=64,
    slice_tokens=1_024,
    heldout_tokens=256,
    steps=4,
    batch_size=2,
    student_hidden=32,
    student_layers=1,
    student_heads=2,
    student_kv_heads=1,
    student_intermediate=64,
)


@dataclass(frozen=True)
class Variant:
    """One student: what its cache stores and how it trains from it."""

    name: str
    store: dict[str, Any] = field(default_factory=dict)
    """``PrecomputeConfig`` fields of its cache (CE-only and online KD read the N=16 cache
    for their tokens only)."""
    train: dict[str, Any] = field(default_factory=dict)
    """``TrainConfig`` fields beyond the budget's; ``online_teacher: True`` means the teacher."""
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.name} seed={self.seed}"

    @property
    def cache_key(self) -> str:
        return "_".join(f"{k}{v}" for k, v in sorted(self.store.items()))


_TOKENS = {"samples": 16}  # the cache whose tokens CE-only and online KD train on


CORE = ("CE only", "online KD", "sampled N=16", "sampled N=8")
"""The variants that decide the goal (>= 95 % of the gap at <= 16 B/token): run first on
every corpus, before any other variant."""
TWINS = ("CE only", "sampled N=16", "online KD")
"""Run again at seed 1 (the spread) right after the core, in this order: online KD last, as
it costs ~5 cache-backed students (a teacher forward every step)."""


def first_pass_variants() -> list[Variant]:
    """Every variant at seed 0, most informative first (the ``CORE`` ones lead)."""
    n = lambda k: {"samples": k}  # noqa: E731
    top = lambda k: {"top_k": k}  # noqa: E731
    counts = {"target": "counts"}
    return [
        Variant("CE only", _TOKENS, {"loss": "ce"}),
        Variant("online KD", _TOKENS, {"online_teacher": True}),
        Variant("sampled N=16", n(16), counts),
        Variant("sampled N=8", n(8), counts),
        Variant("sampled N=12", n(12), counts),
        Variant("sampled N=64", n(64), counts),
        Variant("top-128 label", top(128), {"tail": "label"}),
        Variant("top-128 bucket", top(128), {"tail": "bucket"}),
        Variant("sampled N=32", n(32), counts),
        # between 16 and 32: on code N=32 is 17.0 B/token, N=24 14.3 (the <= 16 goal); N=26
        # on code and N=15 on prose are what `precompute --bytes-per-token 16` first chose
        # (N=28 and N=16 since its calibration predicts the cache's shards)
        Variant("sampled N=15", n(15), counts),
        Variant("sampled N=24", n(24), counts),
        Variant("sampled N=26", n(26), counts),
        Variant("sampled N=28", n(28), counts),
        Variant("top-32 label", top(32), {"tail": "label"}),
        Variant("top-32 bucket", top(32), {"tail": "bucket"}),
        Variant("top-128 bucket alpha=0.5", top(128), {"tail": "bucket", "alpha": 0.5}),
        Variant("top-32 label alpha=0.5", top(32), {"tail": "label", "alpha": 0.5}),
        Variant("sampled N=16 alpha=0.5", n(16), {**counts, "alpha": 0.5}),
        # the mix on code's budget pick, and the reference with the same mix (is the gain the
        # cache's, or the mix's?)
        Variant("sampled N=28 alpha=0.5", n(28), {**counts, "alpha": 0.5}),
        Variant("online KD alpha=0.5", _TOKENS, {"online_teacher": True, "alpha": 0.5}),
    ]


def shakespeare_documents(path: Path) -> list[tuple[str, str]]:
    """tinyshakespeare as documents of ~40 paragraphs (whole scenes go to one split)."""
    paragraphs = [p.strip() for p in Path(path).read_text().split("\n\n") if p.strip()]
    return [
        (f"shakespeare/{i:05d}", "\n\n".join(paragraphs[i : i + 40]))
        for i in range(0, len(paragraphs), 40)
    ]


@dataclass(frozen=True)
class StudyConfig:
    teacher: str
    """A ``.gguf`` file or model directory (the study's teacher, its tokenizer shared)."""
    out: str
    """Work directory (caches, students, results.json); reusing it resumes the study."""
    shakespeare: str | None = None
    """tinyshakespeare.txt: the first corpus when given."""
    stdlib: bool = True
    """The Python standard library source (the demo's corpus) as the second corpus."""
    budget: StudyBudget = FULL_STUDY
    only: tuple[str, ...] = ()
    """Run only the variants with these names (all when empty)."""
    second_seed_best: int = 2
    """Cache modes (the best by held-out CE) that also run at seed 1, beside CE-only and
    online KD."""


def run_study(config: StudyConfig, reporter: Reporter) -> list[dict[str, Any]]:
    """Run every unfinished job of the study; returns all result rows so far."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = _corpora(config)
    if not corpora:
        raise LogitcacheError("no corpus: give --shakespeare PATH and/or keep --stdlib")
    for corpus, docs in corpora:
        _prepare(out / corpus, docs, config)
    variants = [v for v in first_pass_variants() if not config.only or v.name in config.only]
    # the core variants of every corpus, their seed-1 twins (the spread), then the rest,
    # then seed 1 of the best cache modes
    core = [v for v in variants if v.name in CORE]
    twins = sorted((v for v in variants if v.name in TWINS), key=lambda v: TWINS.index(v.name))
    phases = (
        core,
        [Variant(v.name, v.store, v.train, seed=1) for v in twins],
        [v for v in variants if v.name not in CORE],
    )
    for group in phases:
        for corpus, _ in corpora:
            for variant in group:
                _run_variant(out, corpus, variant, config, reporter)
    for corpus, _ in corpora:
        for variant in _second_seeds(out, corpus, variants, config.second_seed_best):
            _run_variant(out, corpus, variant, config, reporter)
    return load_results(out)


def _corpora(config: StudyConfig) -> list[tuple[str, list[tuple[str, str]]]]:
    from logitcache import toy

    found = []
    if config.shakespeare:
        found.append(("shakespeare", shakespeare_documents(Path(config.shakespeare))))
    if config.stdlib:
        found.append(("stdlib", toy.stdlib_documents()))
    return found


def _prepare(work: Path, docs: list[tuple[str, str]], config: StudyConfig) -> None:
    """slice.jsonl, heldout.jsonl and student_config.json of one corpus (kept once made).

    Held out: a stable 5 % of the documents (by a hash of their names); the slice: other
    documents in hash order, ~6 bytes of text per wanted token (cut to the exact count by
    the teacher pass's max_tokens).
    """

    work.mkdir(parents=True, exist_ok=True)
    b = config.budget
    if not (work / "slice.jsonl").is_file():
        write_slice(work, docs, b)
    student = student_config(b, _teacher_vocab(config.teacher), b.seq_len)
    (work / "student_config.json").write_text(json.dumps(student, indent=1))


def write_slice(work: Path, docs: list[tuple[str, str]], b: StudyBudget) -> None:
    """heldout.jsonl (a stable 5 % of ``docs`` by a hash of their names) and slice.jsonl
    (other documents in hash order), ~6 bytes of text per wanted token."""
    import hashlib

    from logitcache import toy

    train_docs, held_docs = toy.split_heldout(docs, 0.05)
    order = lambda ds: sorted(ds, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())  # noqa: E731
    toy.write_jsonl(_take_bytes(order(held_docs), b.heldout_tokens * 6), work / "heldout.jsonl")
    toy.write_jsonl(_take_bytes(order(train_docs), b.slice_tokens * 6), work / "slice.jsonl")


def student_config(b: StudyBudget, vocab: int, max_positions: int) -> dict[str, Any]:
    """The study's shrunk SmolLM2 body with ``vocab`` ids (tied embeddings)."""
    from logitcache import toy

    shape = toy.ToyModelSpec(
        hidden=b.student_hidden,
        layers=b.student_layers,
        heads=b.student_heads,
        intermediate=b.student_intermediate,
        max_positions=max_positions,
        vocab_size=vocab,
    )
    # grouped-query attention and SmolLM2-135M's rope_theta and norm eps (SmolLM2-135M:
    # hidden 576, 30 layers, 9/3 heads, intermediate 1536)
    return toy.llama_config_dict(shape) | {
        "num_key_value_heads": b.student_kv_heads,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    }


def _take_bytes(docs: list[tuple[str, str]], n_bytes: int) -> list[tuple[str, str]]:
    taken, size = [], 0
    for doc in docs:
        if size >= n_bytes:
            break
        taken.append(doc)
        size += len(doc[1].encode())
    return taken


def _teacher_vocab(teacher: str) -> int:
    from logitcache.models import load_teacher_config

    return int(load_teacher_config(teacher).vocab_size)


def _second_seeds(out: Path, corpus: str, variants: list[Variant], n_best: int) -> list[Variant]:
    """Seed 1 of CE-only, online KD and the ``n_best`` cache modes with the lowest CE."""
    rows = [r for r in load_results(out) if r["corpus"] == corpus and r["seed"] == 0]
    cached = sorted(
        (r for r in rows if r["bytes_per_token"] is not None), key=lambda r: r["eval_ce"]
    )
    best = {r["variant"] for r in cached[:n_best]}
    chosen = [v for v in variants if v.name in ("CE only", "online KD") or v.name in best]
    return [Variant(v.name, v.store, v.train, seed=1) for v in chosen]


# -- the orchestrator's side: one process per job --------------------------------------
def _run_variant(
    out: Path, corpus: str, variant: Variant, config: StudyConfig, reporter: Reporter
) -> None:
    if any(r["corpus"] == corpus and r["key"] == variant.key for r in load_results(out)):
        return
    work = out / corpus
    if not (work / "reference" / "reference.json").is_file():
        _job(out, {"kind": "reference", "corpus": corpus}, config, reporter)
    if not (work / "caches" / variant.cache_key / "study-stats.json").is_file():
        _job(out, {"kind": "cache", "corpus": corpus, "store": variant.store}, config, reporter)
    t0 = time.perf_counter()
    done = work / "students" / _slug(variant.key) / "result.json"
    if not done.is_file():  # (a study stopped after a job but before this row kept it)
        _job(
            out, {"kind": "variant", "corpus": corpus, "variant": asdict(variant)}, config, reporter
        )
    row = json.loads(done.read_text())
    row.setdefault("wall_s", time.perf_counter() - t0)
    results = [*load_results(out), row]
    write_json(out / "results.json", results)
    reporter.log(
        f"[{corpus}] {variant.key}: CE {row['eval_ce']:.4f}, KL {row['eval_kl']:.4f}, "
        f"{row['wall_s']:.0f} s"
    )


def _job(out: Path, job: dict[str, Any], config: StudyConfig, reporter: Reporter) -> None:
    job = {**job, "out": str(out), "teacher": config.teacher, "budget": asdict(config.budget)}
    path = out / "jobs" / f"{job['kind']}-{os.getpid()}.json"
    write_json(path, job)
    env = {**os.environ, "OMP_NUM_THREADS": str(config.budget.threads)}
    what = job.get("variant", {}).get("name") or job.get("store") or ""
    reporter.log(f"[{job['corpus']}] {time.strftime('%H:%M:%S')} job {job['kind']} {what}")
    code = subprocess.call(
        [sys.executable, str(Path(__file__).resolve()), "--job", str(path)], env=env
    )
    if code != 0:
        raise LogitcacheError(f"study job {path} failed with exit code {code}; rerun to resume")


def load_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else []


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written to a temporary name and renamed (a killed study
    never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-=." else "_" for c in text)


# -- the job side: what runs in each child process -------------------------------------
def run_job(job: dict[str, Any]) -> None:
    """Run one job description (written by the orchestrator) in this process."""
    import torch

    torch.set_num_threads(job["budget"]["threads"])
    budget = StudyBudget(**job["budget"])
    work = Path(job["out"]) / job["corpus"]
    if job["kind"] == "cache":
        cache_dir(work, job["teacher"], budget, job["store"])
    elif job["kind"] == "reference":
        from real_teacher_eval import write_reference

        held = cache_dir(work, job["teacher"], budget, {"top_k": 64}, held_out=True)
        write_reference(job["teacher"], held, work / "reference")
    elif job["kind"] == "variant":
        _train_variant(work, job["teacher"], budget, Variant(**job["variant"]))
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")


def cache_dir(
    work: Path, teacher: str, budget: StudyBudget, store: dict[str, Any], *, held_out: bool = False
) -> Path:
    """The cache of ``store`` over the slice (or the held-out file), written if missing."""
    from real_teacher_eval import cache_components

    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute

    key = Variant("", store).cache_key
    dest = work / "caches" / (f"heldout-{key}" if held_out else key)
    data = work / ("heldout.jsonl" if held_out else "slice.jsonl")
    tokens = budget.heldout_tokens if held_out else budget.slice_tokens
    extra = {"logprob_codec": "float32"} if held_out else {}
    corpus = CorpusSpec(data=(str(data),), max_tokens=tokens, seq_len=budget.seq_len)
    # format 1, as the study's first caches were (a resumed study must match them): the
    # report measures format 2 by converting each (real_teacher_report.format2_bytes)
    result = run_precompute(
        PrecomputeConfig(
            teacher=teacher,
            out=str(dest),
            corpus=corpus,
            shard_sequences=64,
            device="cpu",
            batch_tokens=4 * budget.seq_len,
            format_version=1,
            **store,
            **extra,
        )
    )
    stats_file = dest / "study-stats.json"
    if not held_out and not stats_file.is_file():
        stats = cache_components(dest)
        if result.teacher_s:
            stats["teacher_tokens_per_s"] = result.teacher_tokens / result.teacher_s
        write_json(stats_file, stats)
    return dest


def study_train_config(
    budget: StudyBudget,
    variant: Variant,
    *,
    cache: Path,
    out: Path,
    student_config: Path,
    tokenizer: str,
    held: Path,
    **flags: Any,
) -> Any:
    """The ``TrainConfig`` of one study student: the budget's steps, batch and schedule, the
    held-out cache as its evaluation, resumable, on the CPU (shared by the cross-tokenizer
    study)."""
    from logitcache.train import TrainConfig

    steps = budget.steps
    return TrainConfig(
        cache=str(cache),
        out=str(out),
        student_config=str(student_config),
        tokenizer=tokenizer,
        eval_cache=str(held),
        eval_fraction=0.0,
        steps=steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        warmup_steps=steps // 10,
        eval_every=max(1, steps // 4),
        save_every=max(1, steps // 8),
        seed=variant.seed,
        loader_workers=0,
        device="cpu",
        resume=True,
        quiet=True,
        **flags,
    )


def _train_variant(work: Path, teacher: str, budget: StudyBudget, variant: Variant) -> None:
    from online_kd import OnlineKD
    from real_teacher_eval import evaluate_student

    from logitcache.train import train

    t0 = time.perf_counter()
    cache = cache_dir(work, teacher, budget, variant.store)
    held = work / "caches" / "heldout-top_k64"
    dest = work / "students" / _slug(variant.key)
    flags = dict(variant.train)
    online = flags.pop("online_teacher", False)  # the reference: not a train setting
    config = study_train_config(
        budget,
        variant,
        cache=cache,
        out=dest,
        student_config=work / "student_config.json",
        tokenizer=teacher,
        held=held,
        **flags,
    )
    result = train(config, loss=OnlineKD.load(teacher, config) if online else None)
    evals = evaluate_student(Path(result.model_dir), held, work / "reference")
    stats_file = cache / "study-stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    on_cache = not (online or flags.get("loss") == "ce")
    row = {
        "corpus": work.name,
        "variant": variant.name,
        "seed": variant.seed,
        "key": variant.key,
        "store": variant.store,
        "train": variant.train,
        **evals,
        "bytes_per_token": stats.get("bytes_per_token") if on_cache else None,
        "entries_per_position": stats.get("entries_per_position") if on_cache else None,
        "steps": result.steps,
        "train_tokens": result.tokens,
        "train_wall_s": result.wall_s,
        "job_wall_s": time.perf_counter() - t0,
        "loop_eval": result.final_eval,
    }
    write_json(dest / "result.json", row)
    shutil.rmtree(dest / "checkpoints", ignore_errors=True)  # ~100 MB each; the model is kept


@click.command()
@click.option("--teacher", help="A .gguf file or model directory (required for a study).")
@click.option(
    "--out",
    default="logitcache-real-teacher",
    show_default=True,
    help="Work directory; rerunning with the same --out resumes the study.",
)
@click.option("--shakespeare", default=None, help="tinyshakespeare.txt (the first corpus).")
@click.option("--stdlib/--no-stdlib", default=True, show_default=True)
@click.option("--quick", is_flag=True, help="Toy sizes (plumbing check).")
@click.option("--only", multiple=True, help="Only these variants (repeatable).")
@click.option(
    "--report",
    "report_only",
    is_flag=True,
    help="Run nothing: print results so far, write OUT/real-teacher.png.",
)
@click.option("--job", "job_file", default=None, hidden=True, help="Run one job (internal).")
def main(teacher, out, shakespeare, stdlib, quick, only, report_only, job_file) -> None:
    """The cache-mode study on a real LLM teacher (GGUF or directory); resumable."""
    from real_teacher_report import cache_table, format2_bytes, plot_gap, summarize, summary_table

    if job_file is not None:
        run_job(json.loads(Path(job_file).read_text()))
        return
    if teacher is None and not report_only:
        raise click.UsageError("--teacher is required (or --report)")
    budget = QUICK_STUDY if quick else FULL_STUDY
    config = StudyConfig(
        teacher=teacher,
        out=out,
        shakespeare=shakespeare,
        stdlib=stdlib,
        budget=budget,
        only=tuple(only),
    )
    try:
        rows = load_results(Path(out)) if report_only else run_study(config, Reporter())
    except LogitcacheError as exc:
        raise click.ClickException(str(exc)) from None
    summary = summarize(rows, format2_bytes(Path(out)))
    click.echo(summary_table(summary) + "\n\n" + cache_table(Path(out)))
    if plot_gap(summary, Path(out) / "real-teacher.png"):
        click.echo(f"plot: {Path(out) / 'real-teacher.png'}")


if __name__ == "__main__":
    main()
