"""Tests for logitcache.precompute.blocks and .shares: each worker tokenizes only its blocks
and reads only its sequences, which equal one process's reading of the whole corpus."""

import contextlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from logitcache.precompute import blocks, packing, run
from logitcache.precompute.blocks import TokenStore, iter_blocks
from logitcache.precompute.corpus import CorpusError, CorpusSpec
from logitcache.precompute.packing import iter_sequences
from logitcache.precompute.run import PrecomputeConfig
from logitcache.precompute.shares import plan_share, tokenize_share
from logitcache.storage import CacheWriter, Location

SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "",
    "A cache of teacher logits is made once and read by every student",
    "Shards hold sequences in order",
    "x",
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of ~3 documents: a tiny corpus spans many of them."""
    monkeypatch.setattr(blocks, "BLOCK_CHARS", 120)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """40 one-line documents of varied length (3 empty ones, some of one token)."""
    lines = [f"{i} " + SENTENCES[i % 5] * (1 + i % 3) if i % 13 else "  " for i in range(40)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def store_at(tmp_path: Path, tokenizer, spec: CorpusSpec) -> TokenStore:
    eos = tokenizer.eos_token_id
    return TokenStore(
        Location(str(tmp_path / "cache")), "cid", seq_len=spec.seq_len, eos_id=eos, vocab=300
    )


class CountingTokenizer:
    """The tokenizer, counting the documents it encodes."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)

    def __len__(self):
        return len(self.inner)


def share_of_documents(spec: CorpusSpec, workers: int, empty: bool = False) -> list[int]:
    """Documents of each worker's blocks: non-empty ones, or all with ``empty``."""
    counts = [0] * workers
    for index, docs, _ in iter_blocks(spec):
        counts[index % workers] += sum(1 for d in docs if empty or d.text.strip())
    return counts


def as_tuples(seqs):
    return [(s.input_ids.tolist(), s.loss_mask.tolist(), s.doc_starts.tolist()) for s in seqs]


@pytest.mark.parametrize(
    "settings",
    [
        dict(seq_len=16),
        dict(seq_len=7, max_tokens=150),
        dict(seq_len=16, max_tokens=16 * 9 + 1),  # a one-token remainder is dropped
        dict(seq_len=12, pack=False),
        dict(seq_len=12, pack=False, max_tokens=100),
    ],
)
def test_workers_read_their_share_and_the_sequences_of_one_process(
    tmp_path, small_blocks, corpus, tiny_tokenizer, settings
):
    spec = CorpusSpec(data=(str(corpus),), **settings)
    want = as_tuples(iter_sequences(spec, tiny_tokenizer))
    assert len(list(iter_blocks(spec))) > 6
    for workers in (2, 3):
        store = store_at(tmp_path / str(workers), tiny_tokenizer, spec)
        counting = [CountingTokenizer(tiny_tokenizer) for _ in range(workers)]
        for w in range(workers):  # step 1 of every worker (concurrent in a real run)
            tokenize_share(store, spec, counting[w], w, workers)
        plans = [plan_share(store, spec, counting[w], w, workers) for w in range(workers)]
        if spec.max_tokens is None:  # each worker tokenized its blocks, and no others
            assert [t.calls for t in counting] == share_of_documents(spec, workers)
        else:  # up to about the budget's block
            assert 0 < sum(t.calls for t in counting) < 36
        got = []
        for first in range(0, len(want), 5):  # shards of 5, each read by its worker
            worker = (first // 5) % workers
            count = min(5, len(want) - first)
            pairs = list(plans[worker].sequences(first, count))
            assert [i for i, _ in pairs] == list(range(first, first + count))
            got.extend(seq for _, seq in pairs)
        assert as_tuples(got) == want


def test_a_worker_alone_makes_the_blocks_others_did_not(
    tmp_path, small_blocks, corpus, tiny_tokenizer
):
    """A job-array task that runs before (or without) the others still gets every sequence."""
    spec = CorpusSpec(data=(str(corpus),), seq_len=16)
    store = store_at(tmp_path, tiny_tokenizer, spec)
    lone = CountingTokenizer(tiny_tokenizer)
    plan = plan_share(store, spec, lone, 1, 3)
    assert lone.calls == 36  # the 40 documents less the 4 empty ones
    want = as_tuples(iter_sequences(spec, tiny_tokenizer))
    assert as_tuples(seq for _, seq in plan.sequences(0, plan.total)) == want
    later = CountingTokenizer(tiny_tokenizer)
    plan_share(store, spec, later, 0, 3)
    assert later.calls == 0  # resumed or late: nothing left to tokenize


def test_with_max_tokens_workers_stop_near_the_budget(tmp_path, small_blocks, tiny_tokenizer):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{i} {SENTENCES[i % 5]}\n" for i in range(2000)))
    spec = CorpusSpec(data=(str(path),), seq_len=16, max_tokens=200)
    store = store_at(tmp_path, tiny_tokenizer, spec)
    counting = [CountingTokenizer(tiny_tokenizer) for _ in range(2)]
    plans = [plan_share(store, spec, counting[w], w, 2) for w in range(2)]
    assert sum(t.calls for t in counting) < 120  # of 2000 documents
    want = as_tuples(iter_sequences(spec, tiny_tokenizer))
    assert as_tuples(seq for _, seq in plans[1].sequences(0, plans[1].total)) == want


def test_an_empty_corpus_says_so(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    spec = CorpusSpec(data=(str(path),), seq_len=16)
    with pytest.raises(CorpusError, match="corpus is empty"):
        plan_share(store_at(tmp_path, tiny_tokenizer, spec), spec, tiny_tokenizer, 0, 2)


def test_a_damaged_block_is_refused_with_what_to_do(tmp_path, small_blocks, corpus, tiny_tokenizer):
    spec = CorpusSpec(data=(str(corpus),), seq_len=16)
    store = store_at(tmp_path, tiny_tokenizer, spec)
    plan = plan_share(store, spec, tiny_tokenizer, 0, 1)
    payload = Path(store.loc.path(store._rel(1, ".bin")))
    payload.write_bytes(payload.read_bytes()[:-1] + b"\xff")
    with pytest.raises(CorpusError, match=r"token block 1 .* is damaged .*sha256.*delete"):
        list(plan.sequences(0, plan.total))


def test_block_counts_match_packing(tmp_path, small_blocks, corpus, tiny_tokenizer):
    spec = CorpusSpec(data=(str(corpus),), seq_len=12, pack=False)
    store = store_at(tmp_path, tiny_tokenizer, spec)
    for index, docs, last in iter_blocks(spec):
        summary = store.tokenize(index, docs, last, tiny_tokenizer)
        pairs = list(store.load(summary).documents())
        seqs = list(packing.pack_sequences(pairs, seq_len=12, eos_id=0, pack=False))
        assert summary.sequences == len(seqs)
        assert summary.sequence_tokens == sum(len(s.input_ids) for s in seqs)
        assert summary.tokens == sum(len(ids) for ids, _ in pairs)
        assert np.all([len(ids) > 0 for ids, _ in pairs])


# ---------------------------------------------------------------------------------------
# The teacher pass: workers as threads that meet at a barrier, as torchrun ranks do


def pass_config(teacher: Path, data: Path, out: Path, **settings) -> PrecomputeConfig:
    corpus = CorpusSpec(data=(str(data),), seq_len=16)
    return PrecomputeConfig(
        teacher=str(teacher),
        out=str(out),
        corpus=corpus,
        device="cpu",
        shard_sequences=3,
        samples=8,
        **settings,
    )


def tree(cache: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(cache)): p.read_bytes()
        for p in sorted(cache.rglob("*"))
        if p.is_file() and ".locks" not in p.parts and "parts" not in p.parts
    }


def run_as_ranks(monkeypatch, configs: list[PrecomputeConfig]) -> dict[int, int]:
    """Run one worker per config in threads that meet at a barrier; documents each tokenized."""
    barrier = threading.Barrier(len(configs))
    calls: dict[int, int] = {}
    owner: dict[int, int] = {}  # id of a worker's tokenizer -> the worker
    real, real_load = blocks.tokenize_document, run.load_tokenizer

    def load(*args, **kwargs):  # called on the worker's thread, named by its index
        tokenizer = real_load(*args, **kwargs)
        owner[id(tokenizer)] = int(threading.current_thread().name)
        return tokenizer

    def counted(doc, tokenizer):  # called on the worker's reader thread
        worker = owner[id(tokenizer)]
        calls[worker] = calls.get(worker, 0) + 1
        return real(doc, tokenizer)

    @contextlib.contextmanager
    def group(launched):
        yield barrier.wait

    # Loading a model swaps class attributes for its duration (transformers' no_tie_weights
    # and no_init_weights are not thread-safe): two loads at once would leave
    # PreTrainedModel.tie_weights a no-op for the rest of the process. Real workers are
    # processes; these threads load their teachers one at a time.
    loading, real_teacher = threading.Lock(), run._teacher

    def one_load_at_a_time(config):
        with loading:
            return real_teacher(config)

    monkeypatch.setattr(blocks, "tokenize_document", counted)
    monkeypatch.setattr(run, "load_tokenizer", load)
    monkeypatch.setattr(run, "ranks_group", group)
    monkeypatch.setattr(run, "_teacher", one_load_at_a_time)
    errors: list[BaseException] = []

    def work(config):
        try:
            run.run_precompute(config)
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(c,), name=str(c.worker_index)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return calls


def test_one_two_and_three_workers_write_the_same_cache_each_tokenizing_its_share(
    monkeypatch, tmp_path, small_blocks, corpus, tiny_teacher_dir
):
    single = tmp_path / "single"
    run.run_precompute(pass_config(tiny_teacher_dir, corpus, single))
    want = tree(single)
    assert len([n for n in want if n.startswith("shards/")]) > 4
    spec = CorpusSpec(data=(str(corpus),), seq_len=16)
    for workers in (2, 3):
        out = tmp_path / f"workers-{workers}"
        configs = [
            pass_config(tiny_teacher_dir, corpus, out, num_workers=workers, worker_index=w)
            for w in range(workers)
        ]
        calls = run_as_ranks(monkeypatch, configs)
        share = share_of_documents(spec, workers, empty=True)
        assert [calls.get(w, 0) for w in range(workers)] == share
        assert tree(out) == want  # the token blocks are gone, the rest is byte for byte


def test_a_crashed_worker_resumes_without_tokenizing_again(
    monkeypatch, tmp_path, small_blocks, corpus, tiny_teacher_dir
):
    single = tmp_path / "single"
    run.run_precompute(pass_config(tiny_teacher_dir, corpus, single))
    out = tmp_path / "split"
    configs = [
        pass_config(tiny_teacher_dir, corpus, out, num_workers=2, worker_index=w) for w in range(2)
    ]
    real_write = CacheWriter.write_shard

    def crash_on_worker_1(self, shard, records, stats=None):
        if self.worker == 1 and self.manifest.shards:
            raise KeyboardInterrupt  # killed after its first shard
        return real_write(self, shard, records, stats)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_on_worker_1)
    with pytest.raises(KeyboardInterrupt):
        run_as_ranks(monkeypatch, configs)
    assert not (out / "manifest.json").exists() and (out / "tokens").is_dir()
    monkeypatch.setattr(CacheWriter, "write_shard", real_write)
    calls = run_as_ranks(monkeypatch, configs[1:])  # the task rerun alone
    assert calls == {}  # its blocks and the others' are in the store
    assert tree(out) == tree(single)
