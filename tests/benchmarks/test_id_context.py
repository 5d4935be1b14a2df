"""The ids context-model probe (bench/id_context.py): its renumbering is invertible, and its
baseline is exactly the ids bytes a format 2 writer makes."""

from __future__ import annotations

import numpy as np
from format_bytes import components, reencode
from id_context import probe, to_front
from storage_synth import make_spec, write_cache


def test_to_front_is_a_permutation_of_every_position():
    vocab = 50
    context = np.array([[7, 3, -1], [-1, -1, -1], [49, 0, 12]])  # -1: unused slot
    n = np.full(3, vocab)
    ranks = np.tile(np.arange(vocab), 3)
    renamed = to_front(ranks, n, context).reshape(3, vocab)
    for row, ctx in zip(renamed, context, strict=True):
        assert sorted(row.tolist()) == list(range(vocab))
        valid = ctx[ctx >= 0]
        assert row[valid].tolist() == list(range(valid.size))  # context ranks lead, in order
        rest = np.setdiff1d(np.arange(vocab), valid)
        assert (np.diff(row[rest]) > 0).all()  # the others keep their order


def test_probe_baseline_is_format_2_ids_bytes(tmp_path):
    spec = make_spec(mode="sampled", format_version=1, shard_sequences=8, vocab_size=300)
    write_cache(tmp_path / "v1", spec, 8)
    reencode(tmp_path / "v1", tmp_path / "v2", 2, batch_sequences=4)
    got = probe(str(tmp_path / "v1"), batch_sequences=4)
    assert got["baseline"] == components(tmp_path / "v2")["per_token"]["ids"]
    assert 0 <= got["label_among_ids"] <= 1
    assert {"label", "bigram-1", "label+bigram-8", "bigram-8_table"} <= set(got)
