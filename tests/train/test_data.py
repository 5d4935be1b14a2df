"""The training stream: epoch order, held-out split, rank slices, workers, resume, collation.

Runs on the session's 55-sequence caches (7 shards of 8, the last short); collation is also
checked on records made by hand (ragged lengths, holes in the loss mask, foreign ids).

The stream and the collator are the public ``CacheDataset(...).stream(...)`` and
``DistillCollator``; ``stream()`` and ``collate()`` below view their dict batches as the
trained rows the loss sees (``DistillationLoss.targets``) plus the stream position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from logitcache.storage import CacheReader, SequenceRecord
from logitcache.train import CacheDataset, DistillationLoss, DistillCollator
from logitcache.train.dataset import example_of
from logitcache.train.order import StreamState, count_split, epoch_order, heldout_mask

EVAL_FRACTION = 0.2  # holds out 12 of the 55 sequences: 43 train, a prime count


@pytest.fixture(scope="module")
def reader(topk_cache) -> CacheReader:
    return CacheReader(topk_cache)


@pytest.fixture(scope="module")
def vocab(reader) -> int:
    return reader.spec.vocab_size


@pytest.fixture(scope="module")
def training(reader) -> np.ndarray:
    idx = reader.sequence_indices()
    return idx[~heldout_mask(idx, EVAL_FRACTION)]


def collate(records, *, vocab_limit, target="auto"):
    """Records -> (input_ids [B, L], attention_mask [B, L], rows [N], TeacherTargets of N),
    through ``example_of`` and ``DistillCollator``; rows are flat b * L + p positions."""
    batch = DistillCollator()(
        [example_of(r, vocab_limit=vocab_limit, target=target) for r in records]
    )
    return view(batch)


def view(batch):
    mask = DistillationLoss.trained(batch)  # [B, L-1]
    width = batch["input_ids"].shape[1]
    b, p = torch.nonzero(mask, as_tuple=True)
    rows = b * width + p
    return batch["input_ids"], batch["attention_mask"], rows, DistillationLoss.targets(batch)


@dataclass
class Micro:
    """A stream micro-batch seen as the old trainer saw it."""

    batch: dict
    epoch: int
    consumed_after: int

    @property
    def indices(self) -> list[int]:
        return [i for i in self.batch["index"].tolist() if i >= 0]

    @property
    def sources(self) -> list[int]:
        return [c for c in self.batch["source"].tolist() if c >= 0]

    def __getattr__(self, name):
        fields = dict(zip(("input_ids", "attention_mask", "rows", "targets"), view(self.batch)))
        if name in fields:
            return fields[name]
        if name == "n_tokens":
            return int(self.batch["attention_mask"].sum())
        raise AttributeError(name)


class Viewed:
    """Iterates a CacheStream as ``Micro``s: each with the epoch of its step and the stream
    position once that step is consumed (from the iterator's own state)."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        it = iter(self.stream)
        n, step = self.stream.epoch_size(), self.stream.step_size
        while True:
            s = it.next
            epoch, consumed = (s.epoch + 1, 0) if s.consumed >= n else (s.epoch, s.consumed)
            try:
                batch = next(it)
            except StopIteration:
                return
            yield Micro(batch, epoch, min(consumed + step, n))


def stream(cache, vocab, **kw) -> Viewed:
    data = CacheDataset(str(cache), eval_fraction=EVAL_FRACTION, vocab_limit=vocab)
    settings = dict(
        batch_size=kw.pop("micro_batch", 4), seed=0, start=StreamState(), block_shards=2
    )
    settings.update(kw)
    return Viewed(data.stream(**settings))


def take(batches, n: int) -> list:
    return list(itertools.islice(iter(batches), n))


def indices(batches) -> list[list[int]]:
    return [b.indices for b in batches]


# -- epoch order and split -----------------------------------------------------------------
def test_epoch_order_is_a_permutation(reader):
    shards = [(s.first_sequence, s.n_sequences) for s in reader.shards]
    everything = reader.sequence_indices()
    for seed, epoch, block in [(0, 0, 1), (1, 3, 2), (7, 1, 100)]:
        order = epoch_order(shards, seed=seed, epoch=epoch, block_shards=block)
        assert sorted(order.tolist()) == everything.tolist()


def test_order_depends_on_seed_and_epoch_only(reader):
    shards = [(s.first_sequence, s.n_sequences) for s in reader.shards]

    def order(seed, epoch):
        return epoch_order(shards, seed=seed, epoch=epoch, block_shards=2).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert order(1, 0) != order(0, 1)


def test_order_shuffles_within_blocks_of_shards(reader):
    """A block of ``block_shards`` shards is consumed before the next one starts."""
    shards = [(s.first_sequence, s.n_sequences) for s in reader.shards]
    order = epoch_order(shards, seed=3, epoch=0, block_shards=2)
    shard_of = np.searchsorted([f for f, _ in shards], order, side="right") - 1
    by_first_seen = sorted(range(len(shards)), key=lambda j: np.flatnonzero(shard_of == j)[0])
    start = 0
    for block in (by_first_seen[i : i + 2] for i in range(0, len(shards), 2)):
        size = sum(shards[j][1] for j in block)
        assert set(shard_of[start : start + size].tolist()) == set(block)
        start += size
    assert start == len(order)
    # ... and shuffled inside a block, not left in index order.
    assert not np.all(np.diff(order[:16]) == 1)


def test_heldout_split_is_stable_and_nested(reader, training):
    idx = reader.sequence_indices()
    held = heldout_mask(idx, EVAL_FRACTION)
    assert 0 < held.sum() < len(idx)
    # One index's fate does not depend on which array it comes in, or in which order.
    singly = np.array([heldout_mask(np.array([i]), EVAL_FRACTION)[0] for i in idx])
    assert np.array_equal(held, singly)
    assert np.array_equal(heldout_mask(idx[::-1], EVAL_FRACTION), held[::-1])
    # A larger fraction holds out a superset; 0 holds out nothing.
    assert np.all(heldout_mask(idx, 0.5) >= held)
    assert not heldout_mask(idx, 0.0).any()
    assert count_split(reader, EVAL_FRACTION) == (len(training), int(held.sum()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_split_never_trained_on(topk_cache, vocab, reader, training, seed):
    """Whatever the seed, an epoch trains on exactly the sequences outside the split."""
    seen = [i for b in stream(topk_cache, vocab, seed=seed, epochs=2) for i in b.indices]
    held = set(reader.sequence_indices().tolist()) - set(training.tolist())
    assert held and not held & set(seen)
    assert sorted(seen) == sorted(training.tolist() * 2)


def test_eval_split_is_the_heldout_split(topk_cache, reader, vocab, training):
    idx = reader.sequence_indices()
    held = idx[heldout_mask(idx, EVAL_FRACTION)]
    data = CacheDataset(str(topk_cache), split="eval", eval_fraction=EVAL_FRACTION)
    assert [int(data[i]["index"]) for i in range(len(data))] == held.tolist()
    first_tokens = [int(data[i]["input_ids"][0]) for i in range(len(data))]
    assert first_tokens == [int(reader.read(int(i)).input_ids[0]) for i in held]
    capped = CacheDataset(
        str(topk_cache), split="eval", eval_fraction=EVAL_FRACTION, max_sequences=3
    )
    assert len(capped) == 3
    train = CacheDataset(str(topk_cache), eval_fraction=EVAL_FRACTION)
    assert [int(train[i]["index"]) for i in range(len(train))] == training.tolist()
    assert len(CacheDataset(str(topk_cache), split="all")) == 55


# -- one epoch, any batch size -----------------------------------------------------------
@pytest.mark.parametrize("micro_batch", [1, 3, 4, 7, 8, 43, 64])
def test_every_training_sequence_once_per_epoch(topk_cache, vocab, training, micro_batch):
    batches = list(stream(topk_cache, vocab, micro_batch=micro_batch, epochs=1))
    seen = [i for b in batches for i in b.indices]
    assert len(seen) == len(set(seen)) == len(training)
    assert set(seen) == set(training.tolist())
    sizes = [len(b.indices) for b in batches]
    assert sizes[:-1] == [micro_batch] * (len(sizes) - 1)
    assert sizes[-1] == len(training) - micro_batch * (len(sizes) - 1)
    assert [b.consumed_after for b in batches] == [
        min(len(training), micro_batch * (i + 1)) for i in range(len(batches))
    ]
    for b in batches:
        assert b.input_ids.shape[0] == len(b.indices)
        assert b.epoch == 0


def test_stream_takes_its_batch_size_positionally(topk_cache, vocab):
    """As docs/api.md writes it: ``data.stream(8)`` is ``data.stream(batch_size=8)``."""
    data = CacheDataset(str(topk_cache), vocab_limit=vocab)
    first = next(iter(data.stream(8, epochs=1)))
    assert torch.equal(first["index"], next(iter(data.stream(batch_size=8, epochs=1)))["index"])
    assert len(first["index"]) == 8


def test_epochs_follow_each_other(topk_cache, vocab, training):
    """An endless stream moves to epoch 1 (a new order) after the last partial batch."""
    batches = take(stream(topk_cache, vocab, micro_batch=4), 22)
    per_epoch = -(-len(training) // 4)
    assert [b.epoch for b in batches] == [0] * per_epoch + [1] * (22 - per_epoch)
    first = [i for b in batches[:per_epoch] for i in b.indices]
    second = [i for b in batches[per_epoch : 2 * per_epoch] for i in b.indices]
    assert sorted(second) == sorted(first) and second != first


# -- ranks and workers ---------------------------------------------------------------------
@pytest.mark.parametrize("micro_batch", [2, 4])
def test_ranks_take_disjoint_slices_of_the_world_order(topk_cache, vocab, training, micro_batch):
    """Rank 0 then rank 1 is the world-size-1 stream of twice the micro-batch, batch by batch."""
    whole = list(stream(topk_cache, vocab, micro_batch=2 * micro_batch, epochs=1))
    ranks = [
        list(stream(topk_cache, vocab, micro_batch=micro_batch, rank=r, world_size=2, epochs=1))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for one, r0, r1 in zip(whole, *ranks, strict=True):
        assert r0.indices + r1.indices == one.indices
        assert r0.consumed_after == r1.consumed_after == one.consumed_after
        assert not set(r0.indices) & set(r1.indices)
    # 43 = 10 * 4 + 3 and 5 * 8 + 3: rank 1's last micro-batch holds 1 sequence, or none.
    last = ranks[1][-1]
    assert len(last.indices) == (1 if micro_batch == 2 else 0)
    if not last.indices:
        assert last.rows.shape == (0,) and last.targets.ids.shape[0] == 0
        assert last.n_tokens == 0


def test_gradient_accumulation_splits_steps_like_ranks(topk_cache, vocab, training):
    """An optimizer step takes the same sequences from (2 ranks x 1) as from (1 rank x 2
    accumulated) micro-batches, and never runs into the next epoch: the last step of an
    epoch is short instead, with an empty micro-batch where 43 = 5 * 8 + 3 runs out."""
    accum = list(stream(topk_cache, vocab, grad_accum=2, epochs=2))
    ranks = [list(stream(topk_cache, vocab, rank=r, world_size=2, epochs=2)) for r in (0, 1)]
    steps = [accum[i : i + 2] for i in range(0, len(accum), 2)]
    assert len(steps) == len(ranks[0]) == len(ranks[1]) == 2 * 6
    for (a0, a1), r0, r1 in zip(steps, *ranks, strict=True):
        assert a0.indices == r0.indices and a1.indices == r1.indices
        assert a0.epoch == a1.epoch == r0.epoch
        assert a0.consumed_after == a1.consumed_after == r1.consumed_after
    last = steps[5]
    assert [len(b.indices) for b in last] == [3, 0] and last[1].epoch == 0
    assert last[0].consumed_after == len(training)
    assert steps[6][0].epoch == 1 and steps[6][0].consumed_after == 8


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def batch_equal(a: Micro, b: Micro) -> bool:
    same_place = (a.epoch, a.consumed_after) == (b.epoch, b.consumed_after)
    return same_place and same_batch(a.batch, b.batch)


def test_dataloader_workers_keep_the_order(topk_cache, vocab):
    """Two workers yield the same batches, in the same order, as the main process."""
    s = stream(topk_cache, vocab, micro_batch=3, rank=1, world_size=2, start=StreamState(0, 6))
    direct = take(s, 13)
    workers = take(DataLoader(s.stream, batch_size=None, num_workers=2), 13)
    assert len(direct) == len(workers) == 13
    assert len({b.epoch for b in direct}) == 2  # crosses an epoch boundary
    for a, b in zip(direct, workers, strict=True):
        assert same_batch(a.batch, b)


# -- resume --------------------------------------------------------------------------------
def state_after(batch) -> StreamState:
    return StreamState(batch.epoch, batch.consumed_after)


@pytest.mark.parametrize("k", [1, 5, 10, 11, 12, 16])
def test_resume_continues_the_uninterrupted_stream(topk_cache, vocab, k):
    """11 micro-batches of 4 make an epoch of 43: k = 10, 11, 12 straddle the boundary."""
    reference = take(stream(topk_cache, vocab), 30)
    state = StreamState()
    state.load_state_dict(state_after(reference[k - 1]).state_dict())
    resumed = take(stream(topk_cache, vocab, start=state), 30 - k)
    assert all(batch_equal(a, b) for a, b in zip(reference[k:], resumed, strict=True))


def test_resume_twice(topk_cache, vocab):
    reference = indices(take(stream(topk_cache, vocab, micro_batch=3), 40))
    first = take(stream(topk_cache, vocab, micro_batch=3), 9)
    second = take(stream(topk_cache, vocab, micro_batch=3, start=state_after(first[-1])), 14)
    third = take(stream(topk_cache, vocab, micro_batch=3, start=state_after(second[-1])), 17)
    assert second[-1].epoch == 1 and third[-1].epoch == 2  # 15 micro-batches per epoch
    assert indices(first + second + third) == reference


def test_resume_with_another_world_size(topk_cache, vocab, training):
    """World size 2 stops after 3 global micro-batches; world size 1 finishes the epoch."""
    ranks = [
        take(stream(topk_cache, vocab, micro_batch=2, rank=r, world_size=2, epochs=1), 3)
        for r in (0, 1)
    ]
    seen = [i for r in ranks for b in r for i in b.indices]
    state = state_after(ranks[0][-1])
    assert state == state_after(ranks[1][-1]) == StreamState(0, 12)
    rest = [
        i
        for b in stream(topk_cache, vocab, micro_batch=3, start=state, epochs=1)
        for i in b.indices
    ]
    assert not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(training.tolist())
    order = indices(stream(topk_cache, vocab, micro_batch=len(training), epochs=1))[0]
    assert rest == order[12:]


# -- collation -----------------------------------------------------------------------------
def test_collate_topk_records(reader, vocab):
    records = [reader.read(i) for i in (54, 3, 20)]  # 54 is the short last sequence
    assert records[0].n_tokens < records[1].n_tokens
    ids, mask, rows, t = collate(records, vocab_limit=vocab)
    width = max(r.n_tokens for r in records)
    assert ids.shape == mask.shape == (3, width) and ids.dtype == torch.int64
    assert len(t) == rows.shape[0] == sum(int(r.loss_mask[1:].sum()) for r in records)
    start = 0
    for b, r in enumerate(records):
        assert ids[b, : r.n_tokens].tolist() == r.input_ids.tolist()
        assert mask[b].tolist() == [1] * r.n_tokens + [0] * (width - r.n_tokens)
        positions = np.flatnonzero(r.loss_mask[1:])
        mine = slice(start, start + len(positions))
        start += len(positions)
        assert rows[mine].tolist() == (b * width + positions).tolist()
        assert t.labels[mine].tolist() == r.input_ids[positions + 1].tolist()
        for row, p in zip(range(mine.start, mine.stop), positions, strict=True):
            lo, hi = r.offsets[p], r.offsets[p + 1]
            assert t.ids[row][t.valid[row]].tolist() == r.ids[lo:hi].tolist()
            assert torch.allclose(
                t.probs[row][t.valid[row]], torch.from_numpy(np.exp(r.logprobs[lo:hi]))
            )
            assert t.tail[row].item() == pytest.approx(float(r.tail_mass[p]))
    assert torch.equal(t.labels, ids.reshape(-1)[rows + 1])


def test_collate_sampled_records_gives_counts_over_n(sampled_cache):
    sampled = CacheReader(sampled_cache)
    records = [sampled.read(i) for i in (0, 54)]
    _, _, _, t = collate(records, vocab_limit=sampled.spec.vocab_size)
    assert torch.all(t.tail == 0)
    assert torch.allclose(t.probs.sum(1), torch.ones(len(t)))
    draws = torch.where(t.valid, t.probs * 16, torch.zeros(()))
    assert torch.allclose(draws, draws.round(), atol=1e-4)  # counts / N with N = 16
    r = records[0]
    p = int(np.flatnonzero(r.loss_mask[1:])[0])
    lo, hi = r.offsets[p], r.offsets[p + 1]
    assert (t.probs[0][t.valid[0]] * 16).round().tolist() == r.counts[lo:hi].tolist()
    with pytest.raises(ValueError, match="probs"):
        collate(records, vocab_limit=sampled.spec.vocab_size, target="probs")


def make_record(index, n_tokens, *, seed, vocab=50, k=4, counts=True, logprobs=True, holes=()):
    """A record with ragged entries per position, chosen probabilities and loss-mask holes."""
    rng = np.random.default_rng(seed)
    n_entries = rng.integers(1, k + 1, size=n_tokens - 1).astype(np.int32)
    ids = np.concatenate([rng.choice(vocab, n, replace=False) for n in n_entries])
    draws = np.concatenate([rng.integers(1, 9, n) for n in n_entries]).astype(np.uint8)
    lp = np.log(rng.uniform(0.01, 1.0 / k, ids.shape[0])).astype(np.float32)
    sums = np.add.reduceat(np.exp(lp), np.concatenate([[0], np.cumsum(n_entries)[:-1]]))
    loss_mask = np.ones(n_tokens, dtype=bool)
    loss_mask[0] = False
    loss_mask[list(holes)] = False
    return SequenceRecord(
        index=index,
        input_ids=rng.integers(0, vocab, n_tokens).astype(np.uint32),
        loss_mask=loss_mask,
        doc_starts=np.zeros(1, dtype=np.uint32),
        ids=ids.astype(np.uint32),
        n_entries=n_entries,
        tail_mass=(1 - sums).astype(np.float32),
        logprobs=lp if logprobs else None,
        counts=draws if counts else None,
    )


def test_collate_respects_the_loss_mask():
    records = [make_record(0, 9, seed=0, holes=(3, 4, 8)), make_record(1, 5, seed=1, holes=(2,))]
    ids, _, rows, t = collate(records, vocab_limit=50)
    width = ids.shape[1]
    # Token t trained <=> position t - 1 is a row.
    assert rows.tolist() == [0, 1, 4, 5, 6] + [width + p for p in (0, 2, 3)]
    assert t.labels.tolist() == [int(ids.reshape(-1)[r + 1]) for r in rows]


@pytest.mark.parametrize(
    ("target", "counts", "logprobs", "expect"),
    [
        ("auto", True, False, "counts"),
        ("auto", True, True, "probs"),
        ("counts", True, True, "counts"),
        ("probs", True, True, "probs"),
        ("auto", False, True, "probs"),
    ],
)
def test_collate_target_choice(target, counts, logprobs, expect):
    """``counts`` is counts/N with no tail even when log-probs are stored too."""
    r = make_record(0, 7, seed=2, counts=counts, logprobs=logprobs)
    _, _, _, t = collate([r], vocab_limit=50, target=target)
    p = np.arange(6)
    starts = r.offsets[:-1]
    if expect == "counts":
        n = np.add.reduceat(r.counts.astype(np.float64), starts)
        want = r.counts / np.repeat(n, r.n_entries)
        assert torch.all(t.tail == 0)
    else:
        want = np.exp(r.logprobs.astype(np.float64))
        assert np.allclose(t.tail.numpy(), r.tail_mass[p])
    got = t.probs[t.valid].numpy()
    assert np.allclose(got, want, atol=1e-6)


def test_collate_rejects_a_target_the_cache_lacks():
    with pytest.raises(ValueError, match="sampled"):
        collate([make_record(0, 5, seed=0, counts=False)], vocab_limit=50, target="counts")


def test_ids_beyond_the_student_vocabulary_move_to_the_tail():
    records = [make_record(0, 8, seed=3, vocab=50), make_record(1, 6, seed=4, vocab=50)]
    _, _, _, full = collate(records, vocab_limit=50, target="probs")
    _, _, _, cut = collate(records, vocab_limit=30, target="probs")
    foreign = full.valid & (full.ids >= 30)
    assert foreign.any() and (full.valid & (full.ids < 30)).any()
    assert not (cut.valid & (cut.ids >= 30)).any()
    assert torch.equal(cut.valid, full.valid & ~foreign)
    assert torch.equal(cut.probs[cut.valid], full.probs[cut.valid])
    moved = torch.where(foreign, full.probs, torch.zeros(())).sum(1)
    assert torch.allclose(cut.tail, full.tail + moved)
    # The mass is conserved: support + tail is the same distribution, coarser.
    assert torch.allclose(cut.probs.sum(1) + cut.tail, full.probs.sum(1) + full.tail)
    assert torch.equal(cut.labels, full.labels)
