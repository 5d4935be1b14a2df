"""Tests for logitcache.precompute.corpus and .packing: reading, tokenizing and packing."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.precompute.corpus import (
    CorpusError,
    CorpusSpec,
    Document,
    corpus_identity,
    iter_documents,
    resolve_files,
)
from logitcache.precompute.packing import (
    CorpusStats,
    iter_sequences,
    pack_sequences,
    tokenize_document,
)

EOS = 0


def texts(spec: CorpusSpec) -> list[str]:
    return [d.text for d in iter_documents(spec)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synthetic_docs(lengths: list[int], start: int = 10) -> list[tuple[list[int], list[bool]]]:
    """Documents of the given lengths with distinct, EOS-free ids."""
    docs, next_id = [], start
    for n in lengths:
        docs.append((list(range(next_id, next_id + n)), [True] * n))
        next_id += n
    return docs


# ---------------------------------------------------------------------------------------
# Reading


def test_txt_one_document_per_line(text_corpus):
    docs = texts(CorpusSpec(data=(str(text_corpus),)))
    assert docs == text_corpus.read_text().splitlines()
    assert len(docs) == 24


def test_txt_paragraphs_split_at_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first line\nstill first\n\n\n  \nsecond\n\nthird a\n  third b\n\n")
    assert texts(CorpusSpec(data=(str(path),))) == [
        "first line\nstill first",
        "second",
        "third a\n  third b",
    ]


def test_txt_trailing_blank_lines_keep_line_mode(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("\n\none\ntwo\n\n\n")
    assert texts(CorpusSpec(data=(str(path),))) == ["one", "two"]


def test_jsonl_text_messages_and_input_ids(tmp_path):
    rows = [{"text": "hello", "id": 1}, {"input_ids": [3, 4, 5]}, {"body": "x", "text": "again"}]
    path = tmp_path / "x.jsonl"
    path.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n")  # blank lines skipped
    docs = list(iter_documents(CorpusSpec(data=(str(path),))))
    assert [d.text for d in docs] == ["hello", None, "again"]
    assert docs[1].input_ids == [3, 4, 5]

    chats = write_jsonl(tmp_path / "c.json", [{"conv": [{"role": "user", "content": "hi"}]}])
    (doc,) = iter_documents(CorpusSpec(data=(str(chats),), messages_field="conv"))
    assert doc.messages == [{"role": "user", "content": "hi"}]


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"id": [1, 2, 3], "body": ["a b", "c", "d e f"]})
    pq.write_table(table, path, row_group_size=2)
    assert texts(CorpusSpec(data=(str(path),), text_field="body")) == ["a b", "c", "d e f"]

    ids_path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), ids_path)
    docs = list(iter_documents(CorpusSpec(data=(str(ids_path),))))
    assert [d.input_ids for d in docs] == [[1, 2], [3]]


def test_globs_sorted_and_deduplicated(tmp_path):
    for name in ["b.txt", "a.txt", "c.jsonl"]:
        path = tmp_path / name
        if name.endswith(".txt"):
            path.write_text(name + "\n")
        else:
            write_jsonl(path, [{"text": name}])
    spec = CorpusSpec(data=(str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path)))
    assert [Path(p).name for p in resolve_files(spec)] == ["a.txt", "b.txt", "c.jsonl"]
    assert texts(spec) == ["a.txt", "b.txt", "c.jsonl"]


def test_hub_dataset_path_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, *, split, revision, streaming):
        calls.append((name, config, split, revision, streaming))
        return [{"text": "from the hub"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = CorpusSpec(data=("someone/corpus",), data_config="en", split="validation")
    assert resolve_files(spec) is None
    assert texts(spec) == ["from the hub"]
    assert calls == [("someone/corpus", "en", "validation", None, False)]
    assert corpus_identity(spec) == {
        "kind": "hub",
        "name": "someone/corpus",
        "config": "en",
        "split": "validation",
        "revision": None,
        "text_field": "text",
        "messages_field": None,
    }


def test_hub_load_failure_is_a_corpus_error(monkeypatch):
    import datasets

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(CorpusError, match="cannot load Hugging Face dataset 'someone/corpus'"):
        list(iter_documents(CorpusSpec(data=("someone/corpus",))))


# ---------------------------------------------------------------------------------------
# Tokenization


def test_text_tokenized_without_special_tokens(tiny_tokenizer):
    ids, mask = tokenize_document(Document(text="The cache holds ids."), tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == "The cache holds ids."
    assert all(mask) and len(mask) == len(ids)
    assert EOS not in ids


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_none(tiny_tokenizer, text):
    assert tokenize_document(Document(text=text), tiny_tokenizer) is None


def test_input_ids_used_as_is_and_range_checked(tiny_tokenizer):
    ids, mask = tokenize_document(Document(input_ids=[7, 8, 9]), tiny_tokenizer)
    assert ids == [7, 8, 9] and mask == [True] * 3
    vocab = len(tiny_tokenizer)
    with pytest.raises(CorpusError, match=rf"hold {vocab}, outside .*\[0, {vocab}\)"):
        tokenize_document(Document(input_ids=[1, vocab], source="f row 2"), tiny_tokenizer)


def test_chat_mask_covers_assistant_content_and_end_marker(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does the cache hold?"},
        {"role": "assistant", "content": "Token ids and log probabilities."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "The mass that was left out."},
    ]
    ids, mask = tokenize_document(Document(messages=messages), tiny_tokenizer)
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(ids) == rendered

    # Contiguous True runs, decoded, are exactly the assistant turns plus <|end|>.
    spans, run = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    assert [tiny_tokenizer.decode(s) for s in spans] == [
        "Token ids and log probabilities.<|end|>",
        "The mass that was left out.<|end|>",
    ]
    assistant_header = tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert assistant_header in ids
    assert not any(m for t, m in zip(ids, mask, strict=True) if t == assistant_header)


def test_chat_without_assistant_has_no_targets(tiny_tokenizer):
    ids, mask = tokenize_document(
        Document(messages=[{"role": "user", "content": "hi"}]), tiny_tokenizer
    )
    assert ids and not any(mask)


def test_chat_template_not_prefix_stable_is_an_error(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    # Renders messages newest first, so no earlier render is a prefix of a later one.
    tok.chat_template = (
        "{% for m in messages|reverse %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    with pytest.raises(CorpusError, match=r"not prefix-stable on chat\.jsonl row 0"):
        tokenize_document(Document(messages=messages, source="chat.jsonl row 0"), tok)


# ---------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("seq_len", [2, 5, 8, 64])
def test_packing_is_exact_concatenation(seq_len):
    docs = synthetic_docs([3, 1, 7, 4, 9, 2])
    seqs = list(pack_sequences(docs, seq_len=seq_len, eos_id=EOS, pack=True))

    stream = [t for ids, _ in docs for t in [*ids, EOS]]
    assert np.concatenate([s.input_ids for s in seqs]).tolist() == stream
    assert all(len(s.input_ids) == seq_len for s in seqs[:-1])
    assert 2 <= len(seqs[-1].input_ids) <= seq_len
    for s in seqs:
        assert s.input_ids.dtype == np.int32 and s.loss_mask.dtype == bool
        assert s.doc_starts.dtype == np.int32
        assert not s.loss_mask[0]
        assert s.loss_mask[1:].all()

    # doc_starts, mapped back to stream positions, are exactly where documents begin.
    offsets = np.cumsum([0] + [len(s.input_ids) for s in seqs[:-1]])
    found = [int(o + p) for o, s in zip(offsets, seqs, strict=True) for p in s.doc_starts]
    expected = np.cumsum([0] + [len(ids) + 1 for ids, _ in docs[:-1]]).tolist()
    assert found == expected


def test_packing_drops_a_one_token_tail_and_keeps_existing_eos():
    docs = [([5, 6, EOS], [True] * 3), ([7, 8], [True, True])]  # stream: 5 6 0 7 8 0
    seqs = list(pack_sequences(docs, seq_len=5, eos_id=EOS, pack=True))
    assert [s.input_ids.tolist() for s in seqs] == [[5, 6, EOS, 7, 8]]  # tail [0] dropped


def test_packing_eos_follows_last_token_mask():
    docs = [([5, 6], [False, True]), ([7, 8], [True, False]), ([9, 10], [False, False])]
    (seq,) = pack_sequences(docs, seq_len=16, eos_id=EOS, pack=True)
    assert seq.input_ids.tolist() == [5, 6, EOS, 7, 8, EOS, 9, 10, EOS]
    assert seq.loss_mask.tolist() == [False, True, True, True, False, False, False, False, False]
    assert seq.doc_starts.tolist() == [0, 3, 6]


def test_no_pack_truncates_and_skips_short():
    docs = synthetic_docs([1, 3, 6, 5, 1])
    stats = CorpusStats()
    seqs = list(pack_sequences(docs, seq_len=5, eos_id=EOS, pack=False, stats=stats))
    assert [s.input_ids.tolist() for s in seqs] == [
        [11, 12, 13, EOS],  # fits: EOS appended
        [14, 15, 16, 17, 18],  # truncated, no room for EOS
        [20, 21, 22, 23, 24],  # exactly seq_len: no EOS
    ]
    assert all(s.doc_starts.tolist() == [0] and not s.loss_mask[0] for s in seqs)
    assert (stats.skipped_short, stats.truncated, stats.sequences, stats.tokens) == (2, 1, 3, 14)


def test_no_pack_without_eos_appends_nothing():
    (seq,) = pack_sequences(synthetic_docs([3]), seq_len=8, eos_id=None, pack=False)
    assert seq.input_ids.tolist() == [10, 11, 12]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("max_tokens", [2, 7, 8, 14, 100])
def test_max_tokens_is_exact(pack, max_tokens):
    docs = synthetic_docs([6, 6, 6, 6])
    stats = CorpusStats()
    seqs = list(
        pack_sequences(docs, seq_len=4, eos_id=EOS, pack=pack, max_tokens=max_tokens, stats=stats)
    )
    total = sum(len(s.input_ids) for s in seqs)
    available = 28 if pack else 16  # packed: 4 docs + EOS; else 4 docs cut to 4
    assert total == min(max_tokens, available) == stats.tokens
    assert all(len(s.input_ids) >= 2 for s in seqs)


def test_max_tokens_drops_a_one_token_remainder():
    seqs = list(pack_sequences(synthetic_docs([9]), seq_len=4, eos_id=EOS, pack=True, max_tokens=9))
    assert [len(s.input_ids) for s in seqs] == [4, 4]


def test_max_tokens_stops_reading_documents():
    read = []

    def docs():
        for i, doc in enumerate(synthetic_docs([4] * 100)):
            read.append(i)
            yield doc

    list(pack_sequences(docs(), seq_len=8, eos_id=EOS, pack=True, max_tokens=10))
    assert len(read) <= 3


def test_packing_needs_eos():
    with pytest.raises(CorpusError, match="tokenizer has no EOS token; packing needs one"):
        pack_sequences(synthetic_docs([3]), seq_len=4, eos_id=None, pack=True)


# ---------------------------------------------------------------------------------------
# The chain


def test_iter_sequences_counts_and_is_deterministic(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "The teacher runs once."}, {"text": "  "}, {"text": ""}, {"text": "Small."}]
        + [{"text": f"Document {i} keeps the shards small."} for i in range(6)],
    )
    spec = CorpusSpec(data=(str(path),), seq_len=16)
    stats = CorpusStats()
    first = list(iter_sequences(spec, tiny_tokenizer, stats))
    second = list(iter_sequences(spec, tiny_tokenizer))
    assert (stats.documents, stats.skipped_empty) == (10, 2)
    assert stats.sequences == len(first) and stats.tokens == sum(len(s.input_ids) for s in first)
    assert len(first) == len(second) > 1
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids)
        assert np.array_equal(a.loss_mask, b.loss_mask)
        assert np.array_equal(a.doc_starts, b.doc_starts)
    decoded = tiny_tokenizer.decode(np.concatenate([s.input_ids for s in first]))
    assert decoded.startswith("The teacher runs once.<|eos|>Small.<|eos|>Document 0")


def test_iter_sequences_on_text_fixture(text_corpus, tiny_tokenizer):
    spec = CorpusSpec(data=(str(text_corpus),), seq_len=32, max_tokens=100)
    seqs = list(iter_sequences(spec, tiny_tokenizer))
    assert [len(s.input_ids) for s in seqs] == [32, 32, 32, 4]


def test_corpus_identity_tracks_file_contents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n")
    spec = CorpusSpec(data=(str(path),), text_field="body")
    ident = corpus_identity(spec)
    assert ident["kind"] == "files" and ident["text_field"] == "body"
    assert ident["files"][0]["path"] == str(path) and ident["files"][0]["bytes"] == 8
    json.dumps(ident)
    assert corpus_identity(spec) == ident
    path.write_text("one\nTWO\n")
    changed = corpus_identity(spec)
    assert changed["files"][0]["sha256"] != ident["files"][0]["sha256"]


# ---------------------------------------------------------------------------------------
# Errors


def test_missing_text_field_lists_existing_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": 1, "content": "hi"}])
    with pytest.raises(
        CorpusError, match=r"text field 'body' not found in .*x\.jsonl row 0; fields: id, content"
    ):
        list(iter_documents(CorpusSpec(data=(str(path),), text_field="body")))


def test_missing_parquet_column_lists_existing_fields(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": [1], "content": ["hi"]}), path)
    with pytest.raises(CorpusError, match=r"'text' not found in .*row 0; fields: id, content"):
        list(iter_documents(CorpusSpec(data=(str(path),))))


def test_missing_messages_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}])
    with pytest.raises(CorpusError, match=r"messages field 'conv' not found .* fields: text"):
        list(iter_documents(CorpusSpec(data=(str(path),), messages_field="conv")))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": 3}, r"text field 'text' in .*row 1 is int, expected a string"),
        ({"text": None}, r"text field 'text' in .*row 1 is NoneType"),
        ({"input_ids": [1, "2"]}, r"input_ids in .*row 1 must be a list of integers"),
        ([1, 2], r"row 1: expected a JSON object, got list"),
    ],
)
def test_bad_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "fine"}, row])
    with pytest.raises(CorpusError, match=message):
        list(iter_documents(CorpusSpec(data=(str(path),))))


def test_bad_messages(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"m": [{"role": "user"}]}])
    with pytest.raises(CorpusError, match=r"message 0 in .*row 0 must be a dict with string"):
        list(iter_documents(CorpusSpec(data=(str(path),), messages_field="m")))


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad JSON in .*x\.jsonl line 3"):
        list(iter_documents(CorpusSpec(data=(str(path),))))


def test_empty_corpus(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": " "}, {"text": ""}])
    stats = CorpusStats()
    with pytest.raises(CorpusError, match=r"corpus is empty: .*\(2 documents read, 2 empty"):
        list(iter_sequences(CorpusSpec(data=(str(path),)), tiny_tokenizer, stats))
    assert stats.skipped_empty == 2


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(CorpusError, match=r"no files match '.*\*\.parquet'"):
        iter_documents(CorpusSpec(data=(str(tmp_path / "*.parquet"),)))


@pytest.mark.parametrize("arg", ["./missing", "/nowhere/x", "~/nope-logitcache", "data.jsonl"])
def test_missing_path(tmp_path, arg):
    with pytest.raises(CorpusError, match="no such file or directory: "):
        iter_documents(CorpusSpec(data=(arg,)))


def test_unsupported_file_and_mixed_hub_name(tmp_path):
    other = tmp_path / "notes.md"
    other.write_text("x")
    with pytest.raises(CorpusError, match=r"unsupported file type: .*notes\.md"):
        resolve_files(CorpusSpec(data=(str(other),)))
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(CorpusError, match="must be the only data argument"):
        resolve_files(CorpusSpec(data=(str(txt), "someone/corpus")))
    with pytest.raises(CorpusError, match="apply only to a Hugging Face dataset"):
        resolve_files(CorpusSpec(data=(str(txt),), revision="main"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"data": ()}, "at least one"),
        ({"text_field": ""}, "text_field"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(CorpusError, match=message):
        CorpusSpec(**{"data": ("a.txt",), **kwargs})


def test_spec_accepts_a_bare_string():
    assert CorpusSpec(data="a.txt").data == ("a.txt",)


def test_not_utf8_txt(tmp_path):
    path = tmp_path / "b.txt"
    path.write_bytes(b"\xff\xfe bad\n")
    with pytest.raises(CorpusError, match=r"b\.txt is not UTF-8"):
        list(iter_documents(CorpusSpec(data=(str(path),))))


def test_relative_glob_keeps_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("d")
    Path("d/x.txt").write_text("hi\n")
    ident = corpus_identity(CorpusSpec(data=("d/*.txt",)))
    assert [f["path"] for f in ident["files"]] == [os.path.join("d", "x.txt")]


def test_documents_say_how_much_of_the_corpus_is_read(tmp_path):
    """``Document.read``: by bytes over the files (of the lines read, in text and JSON lines
    files), by rows within a parquet file; it never falls and ends at 1."""
    big = tmp_path / "a.txt"
    big.write_text("".join(f"line {i} " + "x" * 60 + "\n" for i in range(2000)))  # ~140 KB
    rows = write_jsonl(tmp_path / "b.jsonl", [{"text": f"row {i}"} for i in range(50)])
    table = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"p{i}" for i in range(10)]}), table, row_group_size=3)
    spec = CorpusSpec(data=(str(big), str(rows), str(table)))
    sizes = [os.path.getsize(p) for p in (big, rows, table)]
    reads = [d.read for d in iter_documents(spec)]
    assert len(reads) == 2060 and reads == sorted(reads) and reads[0] > 0 and reads[-1] == 1.0
    ends = np.cumsum(sizes) / sum(sizes)
    assert reads[1999] == pytest.approx(ends[0]) and reads[2049] == pytest.approx(ends[1])
    half = sum(len(f"line {i} " + "x" * 60 + "\n") for i in range(1000))
    assert reads[999] == pytest.approx(half / sum(sizes))  # to the byte
    assert reads[2050] == pytest.approx(ends[1] + sizes[2] / sum(sizes) / 10)  # 1 of 10 rows


def test_hub_documents_are_read_by_rows_where_the_count_is_known(monkeypatch):
    import datasets

    class Streamed:  # an IterableDataset: no len; the dataset card may count the split
        def __init__(self, rows, count):
            self.rows, splits = rows, datasets.SplitDict()
            if count:
                splits.add(datasets.SplitInfo("train", num_examples=count))
            self.info = datasets.DatasetInfo(splits=splits)

        def __iter__(self):
            return iter(self.rows)

    rows = [{"text": f"t{i}"} for i in range(4)]
    for loaded, expected in [
        (rows, [0.25, 0.5, 0.75, 1.0]),
        (Streamed(rows, 8), [0.125, 0.25, 0.375, 0.5]),
        (Streamed(rows, 0), [None] * 4),
    ]:
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, loaded=loaded, **k: loaded)
        assert [d.read for d in iter_documents(CorpusSpec(data=("someone/corpus",)))] == expected


def test_tokens_to_come_extrapolate_the_share_read_and_respect_max_tokens():
    assert CorpusStats(tokens=300, read=0.25).tokens_to_come() == 900
    assert CorpusStats(tokens=300, read=0.25).tokens_to_come(max_tokens=1000) == 700
    assert CorpusStats(tokens=300).tokens_to_come(max_tokens=1000) == 700  # share unknown
    assert CorpusStats(tokens=300).tokens_to_come() is None
    assert CorpusStats(tokens=300, read=1.0).tokens_to_come() == 0
