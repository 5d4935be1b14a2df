"""Tests for logitcache.precompute.run: the teacher pass in process, checked value by value.

Stored targets are compared with the teacher run directly (one sequence, no padding,
log-softmax in float32); sampled draws are compared with the teacher's distribution by a
calibration chi-square that is also shown to reject a tempered distribution.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import Reporter
from logitcache.precompute import CorpusSpec, PrecomputeConfig, PrecomputeResult, run_precompute
from logitcache.precompute import run as run_module
from logitcache.storage import CacheReader, Location, SequenceRecord, read_manifest, verify_cache

SEQ_LEN = 64
SHARD_SEQUENCES = 4
TOP_K = 8
SAMPLES = 64
STEP = 1 / 32  # the lossy codec's default step: |error| <= STEP / 2
# A sequence shorter than its padded width runs next to masked padding keys, which rounds
# its logits differently from a run on the sequence alone by up to ~2e-6 (float32, CPU).
PAD_NOISE = 1e-5


def precompute(teacher: Path, data: Path, out: Path, **settings) -> PrecomputeResult:
    """Run the teacher pass on CPU; corpus keywords go to CorpusSpec, the rest to the config."""
    corpus_keys = ("seq_len", "pack", "text_field", "messages_field", "max_tokens")
    corpus = {"seq_len": SEQ_LEN, **{k: settings.pop(k) for k in corpus_keys if k in settings}}
    settings.setdefault("shard_sequences", SHARD_SEQUENCES)
    config = PrecomputeConfig(
        teacher=str(teacher),
        out=str(out),
        corpus=CorpusSpec(data=(str(data),), **corpus),
        device="cpu",
        **settings,
    )
    return run_precompute(config)


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "shards").iterdir())}


def listed_hashes(cache: Path) -> dict[int, str]:
    return {s.index: s.sha256 for s in read_manifest(Location(str(cache))).shards}


def entry_positions(record: SequenceRecord) -> np.ndarray:
    """[E] int64: the position each stored entry belongs to."""
    return np.repeat(np.arange(record.n_positions), record.n_entries)


def tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Teacher:
    """The teacher run the slow obvious way: one sequence at a time, no padding, no mask."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def logprobs(self, input_ids: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """[T-1, V] float32 log-softmax of the predictions of tokens 1..T-1."""
        ids = torch.from_numpy(input_ids.astype(np.int64))[None]
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
        return torch.log_softmax(logits / temperature, dim=-1).numpy()


def padded(record: SequenceRecord) -> bool:
    """Whether the pipeline may have run this sequence beside padding (see PAD_NOISE)."""
    return record.n_tokens < SEQ_LEN


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir) -> Teacher:
    return Teacher(tiny_teacher_dir)


@pytest.fixture(scope="module")
def sharp_teacher(sharp_teacher_dir) -> Teacher:
    return Teacher(sharp_teacher_dir)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, tiny_teacher_dir, text_corpus) -> Path:
    out = tmp_path_factory.mktemp("run") / "topk"
    precompute(tiny_teacher_dir, text_corpus, out, top_k=TOP_K)
    return out


@pytest.fixture(scope="module")
def topk_f32_cache(tmp_path_factory, tiny_teacher_dir, text_corpus) -> Path:
    out = tmp_path_factory.mktemp("run") / "topk-f32"
    precompute(tiny_teacher_dir, text_corpus, out, top_k=TOP_K, logprob_codec="float32")
    return out


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, sharp_teacher_dir, text_corpus) -> Path:
    """Sharp teacher, N=64 draws, seed 0, exact (float32) log-probs of the drawn ids."""
    out = tmp_path_factory.mktemp("run") / "sampled"
    precompute(
        sharp_teacher_dir,
        text_corpus,
        out,
        samples=SAMPLES,
        sampled_logprobs=True,
        logprob_codec="float32",
    )
    return out


# ---------------------------------------------------------------------------------------
# Top-k: exactness


@pytest.mark.parametrize("codec", ["lossy", "float32"])
def test_topk_targets_equal_the_teacher_run_directly(codec, request, tiny_teacher):
    cache = request.getfixturevalue("topk_cache" if codec == "lossy" else "topk_f32_cache")
    tie = 1e-5  # ids whose log-probs are this close may come in either order
    n_positions = n_tied = 0
    for record in CacheReader(cache):
        ref = tiny_teacher.logprobs(record.input_ids)  # [T-1, V]
        top_lp, top_ids = torch.topk(torch.from_numpy(ref), TOP_K + 1, dim=-1)
        top_lp, top_ids = top_lp.numpy(), top_ids.numpy()
        ids = record.ids.reshape(-1, TOP_K).astype(np.int64)  # [T-1, k]
        tied = (np.diff(-top_lp, axis=-1) < tie).any(axis=-1)
        np.testing.assert_array_equal(ids[~tied], top_ids[~tied, :TOP_K])
        # Where ties blur the order, the stored ids must still be a top-k set.
        np.testing.assert_allclose(
            np.take_along_axis(ref, ids, -1), top_lp[:, :TOP_K], rtol=0, atol=tie
        )
        n_positions += len(ids)
        n_tied += int(tied.sum())

        exact = np.take_along_axis(ref, ids, -1).reshape(-1)  # [E] reference at stored ids
        noise = PAD_NOISE if padded(record) else 0.0
        if codec == "lossy":
            np.testing.assert_allclose(record.logprobs, exact, rtol=0, atol=STEP / 2 + noise)
        elif noise:
            np.testing.assert_allclose(record.logprobs, exact, rtol=0, atol=noise)
        else:
            np.testing.assert_array_equal(record.logprobs, exact)

        tail = 1.0 - np.exp(exact.reshape(-1, TOP_K).astype(np.float64)).sum(-1)
        # tail_mass is stored as float16: half an ulp is 2**-11 relative.
        np.testing.assert_allclose(record.tail_mass, tail, rtol=2**-11, atol=1e-6)
    assert n_tied < 0.05 * n_positions  # the exact id check covered nearly every position


def test_topk_ids_are_sorted_by_probability_with_ties_by_id(topk_f32_cache):
    for record in CacheReader(topk_f32_cache):
        lp = record.logprobs.reshape(-1, TOP_K)
        ids = record.ids.reshape(-1, TOP_K)
        assert (np.diff(lp, axis=-1) <= 0).all()
        same = np.diff(lp, axis=-1) == 0
        assert (np.diff(ids.astype(np.int64), axis=-1)[same] > 0).all()


def test_sequences_concatenate_to_the_tokenized_documents_with_eos(
    topk_cache, text_corpus, tiny_tokenizer
):
    expected: list[int] = []
    for line in text_corpus.read_text().splitlines():
        expected += [*tokenize(tiny_tokenizer, line), tiny_tokenizer.eos_token_id]
    records = list(CacheReader(topk_cache))
    assert [r.index for r in records] == list(range(len(records)))
    np.testing.assert_array_equal(np.concatenate([r.input_ids for r in records]), expected)
    assert all(r.n_tokens == SEQ_LEN for r in records[:-1])
    assert 2 <= records[-1].n_tokens < SEQ_LEN
    manifest = read_manifest(Location(str(topk_cache)))
    assert manifest.complete and manifest.n_sequences_total == len(records)
    assert manifest.n_tokens == len(expected)


# ---------------------------------------------------------------------------------------
# Sampled mode


def dense_counts(record: SequenceRecord, vocab: int) -> np.ndarray:
    """[T-1, V] draws of each id at each position."""
    out = np.zeros((record.n_positions, vocab), dtype=np.int64)
    out[entry_positions(record), record.ids] = record.counts
    return out


def calibration_chi2(counts: np.ndarray, probs: np.ndarray, n: int) -> float:
    """Sum over probability bins of z**2, z = (draws in the bin - expected) / sd.

    counts, probs: [P, V]. (position, id) pairs are grouped by their probability under the
    tested distribution. Draws are multinomial(n, probs[p]) per position, independent
    across positions, so a bin holding mass q_p of position p expects n * sum(q_p) draws
    with variance n * sum(q_p * (1 - q_p)). About chi-square with (bins - 1) dof: ~7.
    """
    edges = np.array([0.0, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0])
    bins = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, len(edges) - 2)
    chi2 = 0.0
    for b in range(len(edges) - 1):
        inside = bins == b
        mass = np.where(inside, probs, 0.0).sum(axis=1)  # [P]
        variance = n * float((mass * (1.0 - mass)).sum())
        if variance > 0:
            chi2 += (counts[inside].sum() - n * mass.sum()) ** 2 / variance
    return chi2


def test_sampled_counts_add_up_and_logprobs_are_exact(sampled_cache, sharp_teacher):
    for record in CacheReader(sampled_cache):
        pos = entry_positions(record)
        assert (record.n_entries >= 1).all()
        np.testing.assert_array_equal(np.bincount(pos, weights=record.counts), SAMPLES)
        keys = pos * 1_000_000 + record.ids
        assert len(np.unique(keys)) == len(keys)  # distinct ids per position

        ref = sharp_teacher.logprobs(record.input_ids)  # [T-1, V]
        exact = ref[pos, record.ids]
        if padded(record):
            np.testing.assert_allclose(record.logprobs, exact, rtol=0, atol=PAD_NOISE)
        else:
            np.testing.assert_array_equal(record.logprobs, exact)
        covered = np.bincount(pos, weights=np.exp(exact.astype(np.float64)))
        np.testing.assert_allclose(record.tail_mass, 1.0 - covered, rtol=2**-11, atol=1e-6)


def test_sampled_draws_follow_the_teacher_distribution(sampled_cache, sharp_teacher):
    records = list(CacheReader(sampled_cache))
    vocab = read_manifest(Location(str(sampled_cache))).spec.vocab_size
    counts = np.concatenate([dense_counts(r, vocab) for r in records])  # [P, V]
    assert len(counts) > 1500  # ~110k draws: power to spare against a tempered teacher
    probs = np.concatenate([np.exp(sharp_teacher.logprobs(r.input_ids)) for r in records])
    tempered = np.concatenate(
        [np.exp(sharp_teacher.logprobs(r.input_ids, temperature=2.0)) for r in records]
    )
    threshold = 40.0  # chi-square(7) exceeds 40 with probability ~1e-6
    assert calibration_chi2(counts, probs.astype(np.float64), SAMPLES) < threshold
    # Negative control: the same statistic rejects the right draws against a wrong
    # distribution, so passing above means something.
    assert calibration_chi2(counts, tempered.astype(np.float64), SAMPLES) > 10 * threshold


def test_sampled_draws_depend_only_on_seed_and_sequence(
    tmp_path, sharp_teacher_dir, text_corpus, sampled_cache
):
    runs = {
        "seed0-small-batches": {"seed": 0, "batch_tokens": 64},
        "seed0-large-batches": {"seed": 0, "batch_tokens": 4096},
        "seed1": {"seed": 1},
    }
    for name, settings in runs.items():
        precompute(sharp_teacher_dir, text_corpus, tmp_path / name, samples=SAMPLES, **settings)
    small, large, seed1 = (tmp_path / name for name in runs)
    assert listed_hashes(small) == listed_hashes(large)
    assert shard_bytes(small) == shard_bytes(large)

    with_lp = list(CacheReader(sampled_cache))
    n_positions = n_changed = 0
    for a, b, other in zip(CacheReader(small), with_lp, CacheReader(seed1), strict=True):
        assert a.logprobs is None  # stored only with --sampled-logprobs ...
        np.testing.assert_array_equal(a.ids, b.ids)  # ... which does not change the draws
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(np.bincount(entry_positions(other), other.counts), SAMPLES)
        for p in range(a.n_positions):
            sa, sb = a.offsets[p : p + 2], other.offsets[p : p + 2]
            draws_a = (a.ids[sa[0] : sa[1]].tolist(), a.counts[sa[0] : sa[1]].tolist())
            draws_b = (other.ids[sb[0] : sb[1]].tolist(), other.counts[sb[0] : sb[1]].tolist())
            n_changed += draws_a != draws_b
        n_positions += a.n_positions
    assert n_changed > 0.9 * n_positions


# ---------------------------------------------------------------------------------------
# Packing, no-pack and chat masks


def test_packed_sequences_record_document_starts_and_mask_their_first_token(
    topk_cache, text_corpus, tiny_tokenizer
):
    lengths = [len(tokenize(tiny_tokenizer, t)) + 1 for t in text_corpus.read_text().splitlines()]
    starts = np.cumsum([0, *lengths[:-1]])  # where each document begins in the stream
    mid_document = 0
    for record in CacheReader(topk_cache):
        first = record.index * SEQ_LEN
        inside = starts[(starts >= first) & (starts < first + record.n_tokens)] - first
        np.testing.assert_array_equal(record.doc_starts, inside)
        mid_document += 0 not in inside
        assert not record.loss_mask[0]  # nothing in the sequence predicts its first token
        assert record.loss_mask[1:].all()  # plain text: every other token is a target
    assert mid_document > 0  # some sequences begin inside a document


def test_no_pack_stores_each_document_unpadded(
    tmp_path, tiny_teacher_dir, text_corpus, tiny_tokenizer
):
    seq_len = 128
    documents = [tokenize(tiny_tokenizer, t) for t in text_corpus.read_text().splitlines()]
    assert max(map(len, documents)) < seq_len  # none is cut; each gets its EOS
    precompute(
        tiny_teacher_dir, text_corpus, tmp_path / "c", top_k=TOP_K, pack=False, seq_len=seq_len
    )
    records = list(CacheReader(tmp_path / "c"))
    assert len(records) == len(documents)
    for record, ids in zip(records, documents, strict=True):
        assert record.n_tokens == len(ids) + 1
        np.testing.assert_array_equal(record.input_ids, [*ids, tiny_tokenizer.eos_token_id])
        np.testing.assert_array_equal(record.doc_starts, [0])
        assert not record.loss_mask[0] and record.loss_mask[1:].all()
        assert len(record.ids) == TOP_K * len(ids)
    assert len({r.n_tokens for r in records}) > 5  # lengths really vary
    manifest = read_manifest(Location(str(tmp_path / "c")))
    assert not manifest.spec.pack
    assert manifest.n_tokens == sum(len(ids) + 1 for ids in documents)


CHATS = [
    [
        {"role": "user", "content": "What does the teacher write?"},
        {"role": "assistant", "content": "Its predictions at every position."},
    ],
    [
        {"role": "system", "content": "Answer in few words."},
        {"role": "user", "content": "Why compress the shards?"},
        {"role": "assistant", "content": "Small shards load fast."},
        {"role": "user", "content": "And the hashes?"},
        {"role": "assistant", "content": "They keep the shards honest."},
    ],
    [
        {"role": "user", "content": "Say nothing after this."},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "A last question that stays unanswered."},
    ],
] * 3


def expected_chat_mask(ids: list[int], tokenizer) -> list[bool]:
    """True from after each <|assistant|> header through the <|end|> that closes it."""
    header = tokenizer.convert_tokens_to_ids("<|assistant|>")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    mask, inside = [], False
    for token in ids:
        mask.append(inside)
        if token == header:
            inside = True
        elif token == end:
            inside = False
    return mask


def test_chat_loss_mask_covers_only_assistant_turns(tmp_path, tiny_teacher_dir, tiny_tokenizer):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    seq_len = 32  # short, so sequences start inside assistant turns
    precompute(
        tiny_teacher_dir,
        data,
        tmp_path / "c",
        top_k=TOP_K,
        messages_field="messages",
        seq_len=seq_len,
    )
    records = list(CacheReader(tmp_path / "c"))

    stream, mask = [], []
    for chat in CHATS:
        ids = tokenize(tiny_tokenizer, tiny_tokenizer.apply_chat_template(chat, tokenize=False))
        chat_mask = expected_chat_mask(ids, tiny_tokenizer)
        targets = [t for t, m in zip(ids, chat_mask) if m]
        answers = [m["content"] + "<|end|>" for m in chat if m["role"] == "assistant"]
        assert tiny_tokenizer.decode(targets) == "".join(answers)  # the expectation itself
        stream += [*ids, tiny_tokenizer.eos_token_id]
        mask += [*chat_mask, chat_mask[-1]]  # EOS is a target iff the chat ends on one
    expected = np.array(mask)
    expected[::seq_len] = False  # no sequence predicts its first token
    np.testing.assert_array_equal(np.concatenate([r.input_ids for r in records]), stream)
    np.testing.assert_array_equal(np.concatenate([r.loss_mask for r in records]), expected)
    assert any(np.array(mask)[::seq_len][1:])  # some sequence starts inside an answer


# ---------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": TOP_K},
        {"top_k": TOP_K, "pack": False, "seq_len": 128, "logprob_codec": "float32"},
        {
            "samples": 16,
            "sampled_logprobs": True,
            "pack": False,
            "seq_len": 100,
            "logprob_codec": "float32",
        },
    ],
    ids=["topk-packed-lossy", "topk-nopack-float32", "sampled-nopack-float32"],
)
def test_shards_are_byte_identical_for_any_batch_size(
    settings, tmp_path, sharp_teacher_dir, text_corpus
):
    for batch_tokens in (64, 4096):
        precompute(
            sharp_teacher_dir,
            text_corpus,
            tmp_path / f"bt{batch_tokens}",
            batch_tokens=batch_tokens,
            **settings,
        )
    assert listed_hashes(tmp_path / "bt64") == listed_hashes(tmp_path / "bt4096")
    assert shard_bytes(tmp_path / "bt64") == shard_bytes(tmp_path / "bt4096")


# ---------------------------------------------------------------------------------------
# Progress


class RecordingBar:
    """The teacher-pass bar: its (tokens done, total) at every update."""

    def __init__(self, total: float | None) -> None:
        self.total, self.n, self.seen = total, 0, []

    def update(self, tokens: int) -> None:
        self.n += tokens
        self.seen.append((self.n, self.total))

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class BarReporter(Reporter):
    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.bars: list[RecordingBar] = []

    def bar(self, total=None, desc="", unit="tok", **kw) -> RecordingBar:
        self.bars.append(RecordingBar(total))
        return self.bars[-1]


@pytest.mark.parametrize("max_tokens", [None, 12_000])
def test_the_bar_has_a_total_for_local_files_so_an_eta(max_tokens, tmp_path, tiny_teacher_dir):
    """The bar's total is estimated from how much of the corpus's bytes gave how many tokens
    (the corpus is tokenized as it streams), set from the first update on; it ends exact.
    With --max-tokens, the smaller of the two."""
    data = tmp_path / "corpus.txt"
    sentence = "a teacher runs once and its students train many times from the cache"
    lines = (f"Line {i}: {sentence[: 12 + 6 * (i % 9)]}.\n" for i in range(600))
    data.write_text("".join(lines))
    corpus = CorpusSpec(data=(str(data),), seq_len=SEQ_LEN, max_tokens=max_tokens)
    config = PrecomputeConfig(
        teacher=str(tiny_teacher_dir),
        out=str(tmp_path / "cache"),
        corpus=corpus,
        top_k=4,
        shard_sequences=16,
        device="cpu",
    )
    reporter = BarReporter()
    result = run_precompute(config, reporter)
    (bar,) = reporter.bars
    tokens = sum(shard.n_tokens for shard in result.manifest.shards)
    assert tokens > 10_000  # many shards: the first update comes early
    assert bar.seen[-1] == (tokens, tokens)
    first_done, first_total = bar.seen[0]
    assert first_done < tokens / 4 and abs(first_total - tokens) < 0.1 * tokens


# ---------------------------------------------------------------------------------------
# Disk full


def fill_disk_at_shard(monkeypatch, fail_at: int | None) -> None:
    """Make the fail_at-th shard publish (every one if None) write half, then hit ENOSPC."""
    publish = Location.publish_bytes
    shards_seen = []

    def publish_bytes(self: Location, rel: str, data: bytes) -> None:
        if rel.startswith("shards/"):
            shards_seen.append(rel)
            if fail_at is None or len(shards_seen) == fail_at:
                with self.staged(rel) as tmp:
                    Path(tmp).write_bytes(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        publish(self, rel, data)

    monkeypatch.setattr(Location, "publish_bytes", publish_bytes)


def test_disk_full_discards_the_partial_shard_and_a_rerun_completes(
    tmp_path, monkeypatch, tiny_teacher_dir, text_corpus, topk_cache
):
    out = tmp_path / "c"
    fill_disk_at_shard(monkeypatch, fail_at=3)
    with pytest.raises(LogitcacheError, match=r"disk full while writing shard 2 .*rerun"):
        precompute(tiny_teacher_dir, text_corpus, out, top_k=TOP_K)
    on_disk = sorted(p.name for p in (out / "shards").iterdir())
    listed = [Path(s.path).name for s in read_manifest(Location(str(out))).shards]
    assert on_disk == listed == ["shard-000000.arrow", "shard-000001.arrow"]
    assert not read_manifest(Location(str(out))).complete

    monkeypatch.undo()
    result = precompute(tiny_teacher_dir, text_corpus, out, top_k=TOP_K)
    assert (result.shards_skipped, result.shards_written) == (2, 5)
    manifest, problems = verify_cache(str(out))
    assert manifest.complete and problems == []
    assert shard_bytes(out) == shard_bytes(topk_cache)


def test_a_write_error_while_the_reader_lags_fails_instead_of_hanging(
    tmp_path, monkeypatch, tiny_teacher_dir, text_corpus
):
    """Regression: the reader gave up its end marker after the writer's stop, and the
    teacher loop waited on the empty queue forever."""
    read = run_module.iter_sequences

    def slow_read(*args, **kwargs):
        for sequence in read(*args, **kwargs):
            time.sleep(0.3)  # the writer fails while the reader is between sequences
            yield sequence

    monkeypatch.setattr(run_module, "iter_sequences", slow_read)
    fill_disk_at_shard(monkeypatch, fail_at=None)
    raised: list[BaseException] = []

    def target() -> None:
        try:
            precompute(
                tiny_teacher_dir, text_corpus, tmp_path / "c", top_k=TOP_K, shard_sequences=1
            )
        except BaseException as err:
            raised.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the teacher pass hung after a write error"
    assert len(raised) == 1 and isinstance(raised[0], LogitcacheError)
    assert "disk full while writing shard 0" in str(raised[0])
