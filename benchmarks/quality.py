"""Which cache should I write, and how big is it? (``python benchmarks/quality.py``)

On the demo's teacher and corpus (and on tinyshakespeare with a teacher made the same
way), trains the same student for the same steps on the same slice under: cross-entropy
only; online full-vocabulary KD with the teacher in memory (the upper reference); and from
caches: top-k for k in {8, 32, 128} with each tail policy, sampled with N in {16, 64} with
and without stored log-probs. Reports held-out cross-entropy, KL(teacher || student) on
held-out positions, bytes per token, and the share of the CE-only -> online-KD gap closed.
Every cache and student is made by the same library calls the commands make
(``run_precompute``, ``train``) on configs built as the demo builds them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click

from logitcache.core.progress import Reporter
from logitcache.demo import (
    FULL,
    HELDOUT_STORE,
    QUICK,
    DemoBudget,
    command_line,
    ensure_teacher,
    precompute_config,
    prepare_corpus,
    read_evals,
    run_cache,
    take_text,
    teacher_heldout_ce,
    train_config,
    write_student_config,
)

__all__ = ["QualityRow", "cache_variants", "run_quality"]


@dataclass
class QualityRow:
    corpus: str
    regime: str
    """``slice``: students see less data than the teacher; ``more-data``: 4x the slice."""
    student: str
    eval_ce: float
    eval_kl: float
    bytes_per_token: float | None
    gap_closed: float | None
    """(CE-only CE - this CE) / (CE-only CE - online KD CE)."""
    wall_s: float


Settings = dict[str, Any]


def cache_variants(quick: bool) -> list[tuple[str, Settings, Settings]]:
    """(name, precompute settings, train settings) of every cache-backed student."""
    ks = (8, 32) if quick else (8, 32, 128)
    tails = ("bucket",) if quick else ("renorm", "bucket", "label")
    out = [(f"top-{k} {t}", {"top_k": k}, {"tail": t}) for k in ks for t in tails]
    for n in (16,) if quick else (16, 64):
        out.append((f"sampled N={n}", {"samples": n}, {"target": "counts"}))
        out.append(
            (
                f"sampled N={n} + log-probs",
                {"samples": n, "sampled_logprobs": True},
                {"target": "probs", "tail": "bucket"},
            )
        )
    return out


def _shakespeare_docs(path: Path) -> list[tuple[str, str]]:
    paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    # ~40 paragraphs per document, so the held-out split takes whole scenes, not lines
    return [
        (f"shakespeare/{i:05d}", "\n\n".join(paragraphs[i : i + 40]))
        for i in range(0, len(paragraphs), 40)
    ]


def _corpora(
    shakespeare: Path | None, quick: bool, stdlib: bool = True
) -> list[tuple[str, Any, DemoBudget]]:
    from logitcache import toy

    base = QUICK if quick else FULL
    out: list[tuple[str, Any, DemoBudget]] = [("stdlib", toy.stdlib_documents, base)] * stdlib
    if shakespeare is not None:
        small = replace(
            base, slice_tokens=base.slice_tokens // 4, heldout_tokens=base.heldout_tokens // 2
        )
        out.append(("shakespeare", lambda: _shakespeare_docs(shakespeare), small))
    return out


@dataclass
class _Study:
    """One corpus of the study: its teacher, slice, held-out cache and student config."""

    corpus: str
    budget: DemoBudget
    work: Path
    teacher: Path
    slice_file: Path
    held: Path
    config: Path
    reporter: Reporter

    def cache(self, store: Settings, tokens: int, regime: str = "slice") -> tuple[Path, float]:
        """A cache written by the teacher pass (a no-op when it already exists)."""
        from logitcache.storage import Location, read_manifest

        dest = self.work / "caches" / f"{regime}-{store_key(store)}"
        data = self.slice_file if regime == "slice" else self.work / "more.jsonl"
        config = precompute_config(self.teacher, data, dest, self.budget, tokens, store)
        self.reporter.log(f"[{self.corpus}/{regime}] {command_line(config)}")
        run_cache(config, Reporter(enabled=False))
        return dest, read_manifest(Location(dest)).stats()["bytes_per_token"]

    def student(self, name: str, cache: Path, settings: Settings, regime: str = "slice"):
        from online_kd import OnlineKD

        from logitcache.train import train

        t0 = time.perf_counter()
        dest = self.work / "students" / f"{regime}-{name.replace(' ', '_').replace('=', '')}"
        settings = dict(settings)
        teacher = settings.pop("online_teacher", None)  # the reference: not a train setting
        config = train_config(cache, dest, self.config, self.held, self.budget, settings)
        done = dest / "model" / "config.json"
        if not done.is_file():  # a finished student of an interrupted study is kept
            self.reporter.log(f"[{self.corpus}/{regime}] {command_line(config)}")
            train(config, loss=OnlineKD.load(teacher, config) if teacher else None)
        final = read_evals(dest / "metrics.jsonl")[-1]
        row = QualityRow(
            self.corpus,
            regime,
            name,
            final["eval_ce"],
            final["eval_kl"],
            None,
            None,
            time.perf_counter() - t0,
        )
        self.reporter.log(
            f"[{self.corpus}/{regime}] {name}: CE {row.eval_ce:.4f} KL {row.eval_kl:.4f}"
        )
        return row

    def regime(self, variants, tokens: int, regime: str) -> list[QualityRow]:
        """CE only, online KD and each cache variant, on ``tokens`` of data."""
        top8, _ = self.cache({"top_k": 8}, tokens, regime)
        ce = self.student("CE only", top8, {"loss": "ce"}, regime)
        online = self.student("online full KD", top8, {"online_teacher": str(self.teacher)}, regime)
        rows = [ce, online]
        for name, store, flags in variants:
            cache, bpt = self.cache(store, tokens, regime)
            row = self.student(name, cache, flags, regime)
            row.bytes_per_token = bpt
            rows.append(row)
        _gap(rows, ce, online)
        return rows


def run_quality(
    *,
    out: Path,
    home: Path,
    reporter: Reporter,
    shakespeare: Path | None,
    quick: bool = False,
    stdlib: bool = True,
    only: tuple[str, ...] = (),
    more_data: bool = True,
) -> list[QualityRow]:
    """``only``: run just the cache variants with these names (all when empty)."""
    from logitcache import toy

    rows: list[QualityRow] = []
    for corpus, load_docs, budget in _corpora(shakespeare, quick, stdlib):
        work = out / corpus
        work.mkdir(parents=True, exist_ok=True)
        train_docs, slice_file, held_file = prepare_corpus(load_docs(), budget, work)
        teacher = ensure_teacher(train_docs, budget, home, tag=corpus, reporter=reporter)
        held = work / "heldout-cache"
        run_cache(
            precompute_config(
                teacher, held_file, held, budget, budget.heldout_tokens, HELDOUT_STORE
            ),
            Reporter(enabled=False),
        )
        config = write_student_config(budget, teacher, work)
        study = _Study(corpus, budget, work, teacher, slice_file, held, config, reporter)
        teacher_ce = teacher_heldout_ce(teacher, held)
        reporter.log(f"[{corpus}] teacher held-out CE {teacher_ce:.4f}")
        rows.append(QualityRow(corpus, "slice", "teacher", teacher_ce, 0.0, None, None, 0.0))
        variants = [v for v in cache_variants(quick) if not only or v[0] in only]
        group = study.regime(variants, budget.slice_tokens, "slice")
        rows += group
        if more_data and not quick:
            # the data-size axis: 4x the slice at the same steps; the best cache mode only
            toy.write_jsonl(_more_docs(train_docs, budget.slice_tokens * 4), work / "more.jsonl")
            best = _best_cache_variant(group)
            variants = [v for v in cache_variants(quick) if v[0] == best]
            rows += study.regime(variants, budget.slice_tokens * 4, "more-data")
        (out / f"quality-{corpus}.json").write_text(json.dumps([asdict(r) for r in rows]))
    return rows


def store_key(store: Settings) -> str:
    """A cache's directory name from its settings: {"top_k": 8} -> "top-k_8"."""
    parts = []
    for key, value in store.items():
        parts += [key.replace("_", "-")] + ([] if value is True else [str(value)])
    return "_".join(parts)


def _more_docs(train_docs, n_tokens: int):
    return take_text(train_docs, n_tokens * 4)


def _gap(rows: list[QualityRow], ce: QualityRow, online: QualityRow) -> None:
    span = ce.eval_ce - online.eval_ce
    for row in rows:
        row.gap_closed = (ce.eval_ce - row.eval_ce) / span if span > 0 else None


def _best_cache_variant(rows: list[QualityRow]) -> str:
    cached = [r for r in rows if r.bytes_per_token is not None]
    return min(cached, key=lambda r: r.eval_ce).student


def format_rows(rows: list[QualityRow]) -> str:
    lines = [
        f"{'corpus':12} {'regime':10} {'student':28} {'held-out CE':>11} {'KL':>8} "
        f"{'B/token':>8} {'gap closed':>10}"
    ]
    for r in rows:
        bpt = f"{r.bytes_per_token:8.1f}" if r.bytes_per_token is not None else f"{'-':>8}"
        gap = f"{100 * r.gap_closed:9.0f}%" if r.gap_closed is not None else f"{'-':>10}"
        lines.append(
            f"{r.corpus:12} {r.regime:10} {r.student:28} {r.eval_ce:11.4f} "
            f"{r.eval_kl:8.4f} {bpt} {gap}"
        )
    return "\n".join(lines)


@click.command()
@click.option(
    "--out",
    default="logitcache-quality",
    show_default=True,
    help="Work directory: caches, students, quality.json.",
)
@click.option("--home", default=None, help="Where teachers are kept (as for the demo).")
@click.option(
    "--shakespeare", default=None, help="Path of tinyshakespeare.txt to add the second corpus."
)
@click.option("--quick", is_flag=True, help="Tiny sizes and fewer variants (plumbing check).")
@click.option(
    "--stdlib/--no-stdlib",
    default=True,
    show_default=True,
    help="Include the demo's corpus (the Python standard library).",
)
@click.option("--only", multiple=True, help="Only these cache variants (repeatable).")
@click.option(
    "--more-data/--no-more-data",
    default=True,
    show_default=True,
    help="Also the data-size point (4x the slice, best variant).",
)
@click.option("--json", "as_json", is_flag=True)
def main(out, home, shakespeare, quick, stdlib, only, more_data, as_json) -> None:
    """Students from each cache mode vs CE-only and online KD, on toy teachers trained here.

    The study on a real teacher is benchmarks/real_teacher.py."""
    from logitcache.demo import default_home

    rows = run_quality(
        out=Path(out),
        home=Path(home).expanduser() if home else default_home(),
        reporter=Reporter(enabled=not as_json),
        shakespeare=Path(shakespeare) if shakespeare else None,
        quick=quick,
        stdlib=stdlib,
        only=tuple(only),
        more_data=more_data,
    )
    click.echo(json.dumps([asdict(r) for r in rows], indent=1) if as_json else format_rows(rows))


if __name__ == "__main__":
    main()
