"""Tables and the bytes-vs-gap-closed plot of the real-teacher study, from partial results.

In: the rows of ``results.json`` (one per finished student) and, per corpus, the teacher's
``reference.json`` and each cache's ``study-stats.json``. Out: summary rows (seeds
averaged, with their spread), a Markdown table, a cache-bytes table and a PNG.

The study's caches are written in format 1 with 64-sequence shards; ``format2_bytes``
rewrites each (``convert_cache``) in format 2 with ``precompute``'s default shard size, which
is what a cache costs today; the table and the plot use those bytes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_table", "format2_bytes", "plot_gap", "summarize", "summary_table"]

_REFS = ("CE only", "online KD")


def format2_bytes(out: Path) -> dict[tuple[str, str], float]:
    """Bytes per token of every finished cache of the study rewritten in format 2 at
    ``precompute``'s default shard size, by (corpus, cache directory name); measured once
    (a few seconds a cache) and kept in the cache's ``study-stats.json``."""
    from format_bytes import components
    from real_teacher import write_json

    from logitcache.precompute import PrecomputeConfig
    from logitcache.storage import convert_cache

    per_shard = PrecomputeConfig.shard_sequences  # the dataclass field's default
    found = {}
    for stats_file in sorted(out.glob("*/caches/*/study-stats.json")):
        stats = json.loads(stats_file.read_text())
        if "format2_bytes_per_token" not in stats:
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "format2"
                result = convert_cache(
                    stats_file.parent, copy, format_version=2, shard_sequences=per_shard
                )
                stats["format2_bytes_per_token"] = result.bytes_after / result.manifest.n_tokens
                stats["format2_components_per_token"] = components(copy)["per_token"]
            write_json(stats_file, stats)
        found[(stats_file.parents[2].name, stats_file.parent.name)] = stats[
            "format2_bytes_per_token"
        ]
    return found


def summarize(
    rows: list[dict[str, Any]], format2: dict[tuple[str, str], float] | None = None
) -> list[dict[str, Any]]:
    """One row per (corpus, variant): mean and spread (max - min) over seeds, and the share
    of the CE-only -> online-KD gap closed in held-out CE and in KL (None until both
    references have finished). ``format2``: ``format2_bytes``'s, for a ``bytes_format2``
    column (None where a cache was not measured)."""
    latest = {(row["corpus"], row["key"]): row for row in rows}  # a row kept twice counts once
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in latest.values():
        groups.setdefault((row["corpus"], row["variant"]), []).append(row)
    out = []
    for (corpus, variant), seeds in groups.items():
        ce = [r["eval_ce"] for r in seeds]
        kl = [r["eval_kl"] for r in seeds]
        out.append(
            {
                "corpus": corpus,
                "variant": variant,
                "seeds": len(seeds),
                "eval_ce": sum(ce) / len(ce),
                "ce_spread": max(ce) - min(ce),
                "eval_kl": sum(kl) / len(kl),
                "kl_spread": max(kl) - min(kl),
                "bytes_per_token": seeds[0]["bytes_per_token"],
                "bytes_format2": _format2_of(seeds[0], format2 or {}),
                "entries_per_position": seeds[0]["entries_per_position"],
                "teacher_ce": seeds[0]["teacher_ce"],
                "wall_s": max(r.get("wall_s", 0) for r in seeds),
            }
        )
    for corpus in {r["corpus"] for r in out}:
        mine = {r["variant"]: r for r in out if r["corpus"] == corpus}
        ref = [mine.get(name) for name in _REFS]
        for row in mine.values():
            for metric, key in (("eval_ce", "gap_ce"), ("eval_kl", "gap_kl")):
                span = ref[0][metric] - ref[1][metric] if all(ref) else 0.0
                row[key] = (ref[0][metric] - row[metric]) / span if span > 0 else None
    return sorted(out, key=lambda r: (r["corpus"], r["bytes_per_token"] or 0, r["variant"]))


def _format2_of(row: dict[str, Any], format2: dict[tuple[str, str], float]) -> float | None:
    """The format 2 bytes of a cache-backed row's cache (None for CE-only and online KD)."""
    from real_teacher import Variant

    if row["bytes_per_token"] is None:
        return None
    return format2.get((row["corpus"], Variant("", row.get("store", {})).cache_key))


def summary_table(summary: list[dict[str, Any]]) -> str:
    """Markdown: one line per variant, the teacher's own CE first for each corpus."""
    lines = [
        "| corpus | student | seeds | held-out CE | KL to teacher | B/token | "
        "B/token (format 1) | ids/pos | CE gap closed | KL gap closed |",
        "|---" * 10 + "|",
    ]
    pct = lambda v: "–" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    seen = set()
    for r in summary:
        if r["corpus"] not in seen:
            seen.add(r["corpus"])
            lines.append(
                f"| {r['corpus']} | teacher (SmolLM2-135M) | – | {r['teacher_ce']:.3f} "
                "| 0 | – | – | – | – | – |"
            )
        spread = f" ± {r['ce_spread'] / 2:.3f}" if r["seeds"] > 1 else ""
        kspread = f" ± {r['kl_spread'] / 2:.3f}" if r["seeds"] > 1 else ""
        num = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        epp = "–" if r["entries_per_position"] is None else f"{r['entries_per_position']:.1f}"
        lines.append(
            f"| {r['corpus']} | {r['variant']} | {r['seeds']} | {r['eval_ce']:.3f}{spread} | "
            f"{r['eval_kl']:.3f}{kspread} | {num(r.get('bytes_format2'))} | "
            f"{num(r['bytes_per_token'])} | {epp} | {pct(r['gap_ce'])} | "
            f"{pct(r['gap_kl'])} |"
        )
    return "\n".join(lines)


def cache_table(out: Path) -> str:
    """Markdown: bytes per token of every cache of the study, by component: as written
    (format 1, 64-sequence shards) and, where ``format2_bytes`` measured it, in format 2."""
    names = [
        "ids",
        "ids_table",
        "counts",
        "logprobs",
        "n_entries",
        "tail_mass",
        "input_ids",
        "lengths",
        "loss_mask",
        "doc_starts",
        "framing",
    ]
    lines = [
        "| corpus | cache | format | ids/pos | mass stored | B/token | B/entry | "
        + " | ".join(names)
        + " | teacher tok/s |",
        "|---" * (8 + len(names)) + "|",
    ]
    for stats_file in sorted(out.glob("*/caches/*/study-stats.json")):
        s = json.loads(stats_file.read_text())
        mode = f"top-{s['k']}" if s["mode"] == "topk" else f"sampled N={s['samples']}"
        entries = s["bytes_per_token"] / s["bytes_per_entry"]  # per token
        rate = s.get("teacher_tokens_per_s")
        written = (1, s["components_per_token"], s["bytes_per_token"])
        measured = (2, s.get("format2_components_per_token"), s.get("format2_bytes_per_token"))
        for version, parts, total in (written, measured):
            if parts is None:
                continue
            cells = [f"{parts[n]:.2f}" if n in parts else "–" for n in names]
            lines.append(
                f"| {stats_file.parents[2].name} | {mode} | {version} | "
                f"{s['entries_per_position']:.1f} | {100 * s['mean_covered_mass']:.0f} % | "
                f"{total:.1f} | {total / entries:.2f} | "
                + " | ".join(cells)
                + f" | {'–' if rate is None or version == 2 else f'{rate:.0f}'} |"
            )
    return "\n".join(lines)


def plot_gap(summary: list[dict[str, Any]], path: Path) -> bool:
    """Bytes/token (log; format 2's where measured) against the share of the CE gap closed,
    one panel per corpus; False (and no file) when no cache variant has a gap share yet."""
    points = [r for r in summary if r["bytes_per_token"] is not None and r["gap_ce"] is not None]
    if not points:
        return False
    size = lambda r: r.get("bytes_format2") or r["bytes_per_token"]  # noqa: E731
    format2 = all(r.get("bytes_format2") for r in points)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    corpora = sorted({r["corpus"] for r in points})
    fig, axes = plt.subplots(
        1, len(corpora), figsize=(6.2 * len(corpora), 4.4), dpi=110, squeeze=False
    )
    for ax, corpus in zip(axes[0], corpora):
        mine = [r for r in points if r["corpus"] == corpus]
        refs = {r["variant"]: r for r in summary if r["corpus"] == corpus}
        span = refs["CE only"]["eval_ce"] - refs["online KD"]["eval_ce"]
        for name, level in (("CE only", 0.0), ("online KD", 100.0)):
            half = 100 * refs[name]["ce_spread"] / 2 / span
            ax.axhspan(level - half, level + half, color="gray", alpha=0.15)
            ax.axhline(level, color="gray", linestyle="--", linewidth=1)
        ax.axhline(95, color="tab:green", linestyle=":", linewidth=1, label="goal: 95 %")
        ax.axvline(16, color="tab:green", linestyle=":", linewidth=1)
        for family, marker in (("sampled", "o"), ("top-", "s")):
            fam = [r for r in mine if r["variant"].startswith(family)]
            ax.scatter(
                [size(r) for r in fam],
                [100 * r["gap_ce"] for r in fam],
                marker=marker,
                label=family.rstrip("-"),
            )
            for r in fam:
                ax.annotate(
                    r["variant"].replace("sampled ", ""),
                    (size(r), 100 * r["gap_ce"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.set_xlim(5, 400)  # the same scale in every panel
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([5, 10, 16, 25, 50, 100, 200]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"cache bytes per token (all-in, format {2 if format2 else 1})")
        ax.set_ylabel("share of the CE-only -> online-KD gap closed (%)")
        ax.set_title(f"{corpus}: SmolLM2-135M teacher (gray: seed spread)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
