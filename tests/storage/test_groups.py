"""Format 2 (storage/formats/v2.py): round trips over group sizes and vocabulary edges, the id
table, the order of entries, format 1 still written and read, and damaged groups."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
from storage_synth import assert_records_match, make_spec, shard_records, write_cache

from logitcache.storage import CacheError, CacheReader, CacheWriter, ShardCorruptError
from logitcache.storage.formats.v2 import GroupCodec


def round_trip(tmp_path, spec, n_total: int) -> list:
    records = write_cache(tmp_path, spec, n_total)
    reader = CacheReader(tmp_path)
    got = list(reader)
    assert [r.index for r in got] == list(range(n_total))
    for a, b in zip(got, records):
        assert_records_match(spec, a, b)
    for i in np.random.default_rng(0).permutation(n_total):  # random access, other readers
        assert_records_match(spec, CacheReader(tmp_path).read(int(i)), records[i])
    return got


@pytest.mark.parametrize("container", ["arrow", "zarr"])
@pytest.mark.parametrize(
    ("mode", "sampled_logprobs", "vocab_size", "batch_sequences", "samples"),
    [
        ("topk", False, 2, 1, 12),  # groups of one sequence, 1-bit vocabulary
        ("topk", False, 65536, 2, 12),  # the last vocabulary that fits uint16 ranks
        ("topk", False, 65537, 3, 12),  # the first that needs uint32
        ("sampled", False, 300, 2, 1),  # one draw: one entry per position
        ("sampled", False, 300, 3, 255),  # the most draws
        ("sampled", True, 151936, 2, 40),  # log-probs and tail mass kept
    ],
)
def test_round_trip(
    tmp_path, container, mode, sampled_logprobs, vocab_size, batch_sequences, samples
):
    """7 sequences (lengths 2..12, id V-1 at position 0) in shards of 3: partial groups."""
    spec = make_spec(
        container=container,
        mode=mode,
        sampled_logprobs=sampled_logprobs,
        vocab_size=vocab_size,
        k=min(6, vocab_size),
        samples=samples,
        batch_sequences=batch_sequences,
    )
    got = round_trip(tmp_path, spec, 7)
    assert any(int(r.ids.max()) == vocab_size - 1 for r in got)
    assert min(r.n_tokens for r in got) == 2


def test_format_1_is_still_written_and_read(tmp_path):
    spec = make_spec(mode="sampled", format_version=1)
    round_trip(tmp_path, spec, 5)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format_version"] == 1 and "batch_sequences" not in raw["spec"]
    assert "lengths" not in raw["spec"]["codecs"]
    with pa.ipc.open_file(pa.memory_map(str(tmp_path / "shards/shard-000000.arrow"))) as f:
        assert f.num_record_batches == 3  # one per sequence


def test_a_shard_of_format_2_has_a_row_per_group(tmp_path):
    spec = make_spec(shard_sequences=5, batch_sequences=2)
    write_cache(tmp_path, spec, 5)
    with pa.ipc.open_file(pa.memory_map(str(tmp_path / "shards/shard-000000.arrow"))) as f:
        assert f.num_record_batches == 3
        assert f.get_batch(2).column("index").to_pylist() == [4]
        assert b"logitcache.ids_table" in f.schema.metadata


def test_topk_keeps_the_order_by_probability_and_sampled_is_sorted_by_rank(tmp_path):
    for mode in ("topk", "sampled"):
        spec = make_spec(mode=mode, sampled_logprobs=True)
        written = write_cache(tmp_path / mode, spec, 3)
        got = CacheReader(tmp_path / mode).read(1)
        if mode == "topk":
            np.testing.assert_array_equal(got.ids, written[1].ids)
            continue
        # within a position: increasing rank, so the table's ids first, in table order
        codec = GroupCodec(spec)
        table = codec.expand_table(codec.make_table(written))
        rank = np.argsort(table)[got.ids]
        pos = np.repeat(np.arange(got.n_positions), got.n_entries)
        assert (np.diff(rank)[pos[1:] == pos[:-1]] > 0).all()


def test_id_table_is_the_most_frequent_ids_first(tmp_path):
    spec = make_spec(vocab_size=50)
    records = shard_records(spec, 0, 3)
    table = GroupCodec(spec).make_table(records)
    freq = np.bincount(np.concatenate([r.ids for r in records]), minlength=50)
    assert list(table) == sorted(np.flatnonzero(freq), key=lambda i: (-freq[i], i))


@pytest.mark.parametrize(
    ("table", "match"), [([3, 3], "repeats"), ([1000], "vocab_size"), ([1, 2, 3], None)]
)
def test_decode_table_checks_the_ids(table, match):
    codec = GroupCodec(make_spec(vocab_size=1000))
    blob = codec.encode_table(np.asarray(table, dtype=np.uint32))
    if match is None:
        full = codec.decode_table(blob, "here")
        assert list(full[:4]) == [1, 2, 3, 0] and sorted(full) == list(range(1000))
    else:
        with pytest.raises(CacheError, match=match):
            codec.decode_table(blob, "here")


def group_blobs(spec, records):
    codec = GroupCodec(spec)
    table = codec.expand_table(codec.make_table(records))
    return codec, table, codec.encode(records, table)


@pytest.mark.parametrize(
    ("field", "values", "match"),
    [
        ("lengths", np.array([2, 13], dtype=np.uint32), "lengths outside"),
        ("ids", None, "rank >= vocab_size"),
        ("counts", None, "counts do not add up"),
        ("n_entries", None, "entry counts disagree"),
    ],
)
def test_decode_refuses_inconsistent_groups(field, values, match):
    spec = make_spec(mode="sampled", batch_sequences=2)
    records = shard_records(spec, 0, 2)
    codec, table, blobs = group_blobs(spec, records)
    decoded = {f: codec.codecs[f].decode(b) for f, b in blobs.items()}
    if values is None:
        values = decoded[field].copy()
        values[-1] = {"ids": 1000, "counts": 255, "n_entries": 0}[field]
    blobs[field] = codec.codecs[field].encode(values)
    with pytest.raises(CacheError, match=match):
        codec.decode(0, blobs, table, "group")


def test_writer_refuses_bad_doc_starts(tmp_path):
    spec = make_spec()
    records = shard_records(spec, 0, 3)
    records[1] = dataclasses.replace(records[1], doc_starts=np.array([0, 0], dtype=np.uint32))
    with CacheWriter(tmp_path, spec) as writer, pytest.raises(CacheError, match="doc_starts"):
        writer.write_shard(0, records)


def test_a_damaged_group_is_a_shard_corrupt_error_naming_it(tmp_path):
    spec = make_spec(shard_sequences=4, batch_sequences=2, seq_len=64, vocab_size=5000)
    write_cache(tmp_path, spec, 4)
    path = tmp_path / "shards/shard-000000.arrow"
    with pa.ipc.open_file(pa.memory_map(str(path))) as f:
        blob = f.get_batch(1).column("logprobs")[0].as_py()
    data = bytearray(path.read_bytes())
    data[data.index(blob) + len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = CacheReader(tmp_path, verify=False)
    reader.read(1)  # group 0 is intact
    with pytest.raises(ShardCorruptError) as err:
        reader.read(2)
    message = str(err.value)
    assert "shard shards/shard-000000.arrow group 1: field 'logprobs'" in message
    assert "\n" not in message


def test_resuming_a_format_1_cache_as_format_2_is_refused(tmp_path):
    v1 = make_spec(format_version=1)
    with CacheWriter(tmp_path, v1) as writer:
        writer.write_shard(0, shard_records(v1, 0, 5))
    with pytest.raises(CacheError, match="holds a format 1 cache; resume it with --format-v"):
        CacheWriter(tmp_path, make_spec())


def test_random_reads_decode_each_group_once_within_the_byte_budget(tmp_path, monkeypatch):
    """A training window reads its sequences in random order: each group is decoded once
    while the decoded groups fit ``_DECODED_BYTES``; past it the oldest are forgotten."""
    from logitcache.storage import reader as reader_module

    spec = make_spec(shard_sequences=16, batch_sequences=2)
    write_cache(tmp_path, spec, 48)  # 24 groups in 3 shards (more than a count of 16 kept)
    decodes = []
    real = GroupCodec.decode
    monkeypatch.setattr(
        GroupCodec, "decode", lambda self, first, *a: decodes.append(first) or real(self, first, *a)
    )
    order = [int(i) for i in np.random.default_rng(0).permutation(48)] * 2
    reader = CacheReader(tmp_path)
    for i in order:
        reader.read(i)
    assert sorted(decodes) == list(range(0, 48, 2))  # every group once
    one_group = reader_module._nbytes(reader._decoded[(0, 0)])
    monkeypatch.setattr(reader_module, "_DECODED_BYTES", one_group * 3)
    decodes.clear()
    reader = CacheReader(tmp_path)
    for i in order:
        reader.read(i)
    assert len(decodes) > 24 and len(reader._decoded) <= 3
