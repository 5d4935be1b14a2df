"""The real-teacher study's summary: gap shares, seed spreads and the plot, on partial rows.

The study itself needs hours of CPU (docs/benchmarks.md); its plumbing was run at toy sizes
with ``python benchmarks/real_teacher.py --quick``. Here only the arithmetic that turns its
result rows into the table and the plot is checked, on hand-made rows.
"""

from __future__ import annotations

import pytest
from real_teacher import first_pass_variants
from real_teacher_report import plot_gap, summarize, summary_table


def row(variant: str, seed: int, ce: float, kl: float, bpt: float | None = None) -> dict:
    return {
        "corpus": "prose",
        "variant": variant,
        "seed": seed,
        "key": f"{variant} seed={seed}",
        "eval_ce": ce,
        "eval_kl": kl,
        "bytes_per_token": bpt,
        "entries_per_position": None if bpt is None else 8.0,
        "teacher_ce": 3.0,
        "wall_s": 1.0,
    }


def test_gap_shares_use_the_seed_means_of_both_references():
    rows = [
        row("CE only", 0, 6.0, 2.0),
        row("CE only", 1, 6.2, 2.2),
        row("online KD", 0, 5.0, 1.0),
        row("online KD", 1, 5.2, 1.2),
        row("sampled N=16", 0, 5.55, 1.3, 25.0),
        row("sampled N=16", 0, 5.55, 1.3, 25.0),
    ]  # the same row kept twice
    by_name = {r["variant"]: r for r in summarize(rows)}
    n16 = by_name["sampled N=16"]
    assert n16["gap_ce"] == pytest.approx((6.1 - 5.55) / (6.1 - 5.1))
    assert n16["gap_kl"] == pytest.approx((2.1 - 1.3) / (2.1 - 1.1))
    assert by_name["CE only"]["ce_spread"] == pytest.approx(0.2)
    assert (by_name["CE only"]["seeds"], n16["seeds"]) == (2, 1)
    assert (by_name["CE only"]["gap_ce"], by_name["online KD"]["gap_ce"]) == (0.0, 1.0)
    table = summary_table(summarize(rows))
    assert "| prose | sampled N=16 | 1 | 5.550 |" in table
    assert "6.100 ± 0.100" in table  # two seeds: the mean, half the range


def test_partial_results_give_no_gap_and_no_plot(tmp_path):
    rows = [row("CE only", 0, 6.0, 2.0), row("sampled N=16", 0, 5.5, 1.3, 25.0)]
    summary = summarize(rows)
    assert all(r["gap_ce"] is None for r in summary)
    assert "| – | – |" in summary_table(summary)
    assert not plot_gap(summary, tmp_path / "gap.png")
    assert not (tmp_path / "gap.png").exists()


def test_the_plot_is_written_once_a_cache_variant_has_a_gap_share(tmp_path):
    rows = [
        row("CE only", 0, 6.0, 2.0),
        row("online KD", 0, 5.0, 1.0),
        row("sampled N=16", 0, 5.5, 1.3, 25.0),
        row("top-128 label", 0, 5.2, 1.1, 280.0),
    ]
    assert plot_gap(summarize(rows), tmp_path / "gap.png")
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_come_references_first_and_every_name_once():
    names = [v.name for v in first_pass_variants()]
    assert names[:2] == ["CE only", "online KD"]
    assert len(set(names)) == len(names)
    assert len({v.key for v in first_pass_variants()}) == len(names)


def test_format2_bytes_rewrites_each_cache_once_and_feeds_the_table(
    tmp_path, tiny_teacher_dir, text_corpus, monkeypatch
):
    """The study writes format 1 caches; the report measures each in format 2 (kept in its
    study-stats.json, so a second report converts nothing) and shows both."""
    import json

    import real_teacher_report as report
    from real_teacher import Variant
    from real_teacher_eval import cache_components

    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute

    store = {"samples": 8}
    cache = tmp_path / "prose" / "caches" / Variant("", store).cache_key
    run_precompute(
        PrecomputeConfig(
            teacher=str(tiny_teacher_dir),
            out=str(cache),
            device="cpu",
            shard_sequences=2,
            corpus=CorpusSpec(data=(str(text_corpus),), seq_len=16),
            format_version=1,
            **store,
        )
    )
    (cache / "study-stats.json").write_text(json.dumps(cache_components(cache)))
    measured = report.format2_bytes(tmp_path)
    written = cache_components(cache)["bytes_per_token"]
    assert 0 < measured[("prose", cache.name)] < written
    monkeypatch.setattr("logitcache.storage.convert_cache", None)  # kept: no second rewrite
    assert report.format2_bytes(tmp_path) == measured
    rows = [{**row("sampled N=8", 0, 5.5, 1.3, written), "store": store}]
    summary = summarize(rows, measured)
    assert summary[0]["bytes_format2"] == measured[("prose", cache.name)]
    assert f"| {measured[('prose', cache.name)]:.1f} | {written:.1f} |" in summary_table(summary)
    table = report.cache_table(tmp_path)
    assert "| prose | sampled N=8 | 1 |" in table and "| prose | sampled N=8 | 2 |" in table


def test_the_study_writes_its_caches_in_format_1(tmp_path, monkeypatch):
    """The report's "format 1" column is the cache as written; format 2 is measured apart."""
    from types import SimpleNamespace

    import real_teacher as rt

    import logitcache.precompute

    seen = []
    fake = lambda config: seen.append(config) or SimpleNamespace(teacher_s=0)  # noqa: E731
    monkeypatch.setattr(logitcache.precompute, "run_precompute", fake)
    rt.cache_dir(tmp_path, "t.gguf", rt.QUICK_STUDY, {"top_k": 64}, held_out=True)
    assert [c.format_version for c in seen] == [1]
