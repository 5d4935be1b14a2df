"""The cross-tokenizer study's summary: gaps in bits per byte and the share of the
same-tokenizer gap, on hand-made rows.

The study needs a real teacher and an hour of CPU (docs/benchmarks.md); its plumbing was run
at toy sizes with ``python benchmarks/cross_tokenizer.py --quick``. Here only the arithmetic
that turns its result rows into the table is checked.
"""

from __future__ import annotations

import pytest
from cross_tokenizer import (
    CrossConfig,
    best_cross_n16,
    chosen_variants,
    study_variants,
    summarize,
    table,
)


def row(variant: str, seed: int, bpb: float, cache: str = "samples16", train=None) -> dict:
    side = variant.split()[0]
    stats = {"aligned_share": 0.9, "exact_mass_share": 0.8, "mapped_mass_share": 0.85}
    return {
        "variant": variant,
        "seed": seed,
        "side": side,
        "cache": cache,
        "train": train or {},
        "bits_per_byte": bpb,
        "job_wall_s": 60.0,
        "cache_bytes_per_token": 26.0,
        "bytes_per_teacher_token": 3.1,
        "bytes_per_student_token": 3.5,
        **(stats if side == "cross" else {}),
    }


def test_a_cross_students_share_is_its_gap_over_the_same_caches_same_tokenizer_gap():
    rows = [
        row("same CE only", 0, 3.0),
        row("same CE only", 1, 3.2),  # mean 3.1
        row("same N=16", 0, 2.6),  # same-tokenizer gap 0.5
        row("cross CE only", 0, 2.9),
        row("cross N=16 exact", 0, 2.5),  # gap 0.4: 80 %
        row("cross N=64 exact", 0, 2.7, "samples64"),  # no same N=64 yet: no share
        row("same N=16 alpha=0.5", 0, 2.1, train={"alpha": 0.5}),  # gap 1.0
        row("cross N=16 exact alpha=0.5", 0, 2.4, train={"alpha": 0.5}),  # gap 0.5: 50 %
    ]
    lines = {x["variant"]: x for x in summarize(rows)}
    assert lines["same CE only"]["bits_per_byte"] == pytest.approx(3.1)
    assert lines["same CE only"]["spread"] == pytest.approx(0.2)
    assert lines["same CE only"]["gap"] is None
    assert lines["same N=16"]["gap"] == pytest.approx(0.5)
    assert lines["same N=16"]["share"] is None  # the reference itself
    assert lines["cross N=16 exact"]["gap"] == pytest.approx(0.4)
    assert lines["cross N=16 exact"]["share"] == pytest.approx(0.8)
    assert lines["cross N=64 exact"]["share"] is None
    assert lines["cross N=16 exact alpha=0.5"]["share"] == pytest.approx(0.5)  # its own reference
    # per seed: seed 0's same-tokenizer gap is 3.0 - 2.6 = 0.4, the cross gap 0.4: 100 %
    assert lines["cross N=16 exact"]["paired"] == [pytest.approx(1.0)]
    assert lines["cross N=16 exact alpha=0.5"]["paired"] == [pytest.approx(0.5 / 0.9)]
    assert lines["cross N=64 exact"]["paired"] == []
    text = table(summarize(rows))
    want = (
        "| cross N=16 exact | 1 | 2.5000 | 0.0000 | +0.4000 | 80 % | 100 % | 3.50 | 90 % | 80 % |"
    )
    assert want in text
    assert [x["variant"] for x in summarize(rows)][:3] == [
        "same CE only",
        "same N=16",
        "cross CE only",
    ]


def test_the_second_seed_goes_to_the_best_cross_mapping_of_the_first():
    assert best_cross_n16([row("same N=16", 0, 2.0)]) is None
    rows = [row("cross N=16 exact", 0, 2.5), row("cross N=16 prefix", 0, 2.4)]
    assert best_cross_n16([*rows, row("cross N=16 exact", 1, 2.0)]) == "cross N=16 prefix"
    names = [v.key for v in study_variants()]
    assert names[:4] == [
        "same CE only seed=0",
        "same N=16 seed=0",
        "cross CE only seed=0",
        "cross N=16 exact seed=0",
    ]
    assert len(names) == len(set(names))


def test_seed_runs_the_chosen_variants_at_exactly_those_seeds():
    config = CrossConfig("t", "s", "x", "o", only=("same N=16", "cross N=16 chain"))
    assert [v.key for v in chosen_variants(config)] == [
        "same N=16 seed=0",
        "cross N=16 chain seed=0",
        "same N=16 seed=1",
        "cross N=16 chain seed=1",
    ]
    config = CrossConfig("t", "s", "x", "o", only=("same N=16", "cross N=16 chain"), seeds=(2,))
    assert [v.key for v in chosen_variants(config)] == [
        "same N=16 seed=2",
        "cross N=16 chain seed=2",
    ]
