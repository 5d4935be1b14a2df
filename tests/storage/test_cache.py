"""Writer/reader round trips, atomic publishing, resume, locking, workers, verify_cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from storage_synth import (
    assert_records_match,
    make_records,
    make_spec,
    sha256_file,
    shard_records,
    tree_bytes,
    write_cache,
)

from logitcache.storage import (
    CacheError,
    CacheReader,
    CacheWriter,
    Manifest,
    merge_parts,
    read_manifest,
    verify_cache,
)
from logitcache.storage.location import Location

CONTAINERS = ["arrow", "zarr"]
HERE = Path(__file__).parent


def disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_cache(root: Path, spec, records, verify: bool = True) -> None:
    """Everything a reader promises, against the records that were written."""
    n = len(records)
    reader = CacheReader(root)
    assert reader.spec == spec
    assert len(reader) == n
    np.testing.assert_array_equal(reader.sequence_indices(), np.arange(n))

    seen = list(reader)
    assert [r.index for r in seen] == list(range(n))
    for got, want in zip(seen, records):
        assert_records_match(spec, got, want)

    fresh = CacheReader(root)  # random access opens shards out of order
    for i in np.random.default_rng(n).permutation(n):
        assert_records_match(spec, fresh.read(int(i)), records[i])
    for bad in (-1, n, n + 10):
        with pytest.raises(IndexError):
            fresh.read(bad)

    m = reader.manifest
    s = spec.shard_sequences
    assert m.complete and m.n_sequences_total == n
    assert [x.index for x in m.shards] == list(range(-(-n // s)))
    for info in m.shards:
        assert info.first_sequence == info.index * s
        assert info.n_sequences == min(s, n - info.first_sequence)
        assert info.bytes == disk_size(root / info.path)
        if spec.container == "arrow":
            assert info.sha256 == sha256_file(root / info.path)
    assert m.n_sequences == n
    assert m.n_tokens == sum(r.n_tokens for r in records)
    assert m.n_positions == sum(r.n_tokens - 1 for r in records)
    assert m.n_entries == sum(int(r.n_entries.sum()) for r in records)
    assert m.bytes == disk_size(root / "shards")  # nothing else, no leftovers
    covered = sum(float(np.sum(1.0 - r.tail_mass, dtype=np.float64)) for r in records)
    assert m.stats()["mean_covered_mass"] == pytest.approx(covered / m.n_positions)
    if verify:
        assert verify_cache(root)[1] == []


# -- round trips ------------------------------------------------------------------------

MODES = (
    [("topk", False, lp) for lp in ("lossy", "float16", "float32")]
    + [("sampled", True, lp) for lp in ("lossy", "float16", "float32")]
    + [("sampled", False, "lossy")]  # no logprobs stored: the codec is unused
)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize(("mode", "sampled_logprobs", "logprobs"), MODES)
def test_round_trip_modes_and_codecs(tmp_path, container, mode, sampled_logprobs, logprobs):
    """5 sequences (lengths 2..12) in shards of 3: a full shard and a final partial one."""
    spec = make_spec(
        container=container, mode=mode, sampled_logprobs=sampled_logprobs, logprobs=logprobs
    )
    check_cache(tmp_path, spec, write_cache(tmp_path, spec, 5), verify=False)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize(
    ("n_total", "shard_sequences", "seq_len", "vocab_size", "k"),
    [
        (1, 1, 2, 2, 1),  # the smallest cache: one length-2 sequence, 1-bit ids, k=1
        (3, 1, 2, 300, 300),  # shards of one sequence, k = vocab
        (4, 8, 9, 151936, 16),  # one partial shard, 18-bit ids
        (7, 3, 12, 1000, 6),  # two full shards and a partial one
    ],
)
def test_round_trip_sizes(tmp_path, container, n_total, shard_sequences, seq_len, vocab_size, k):
    spec = make_spec(
        container=container,
        shard_sequences=shard_sequences,
        seq_len=seq_len,
        vocab_size=vocab_size,
        k=k,
    )
    check_cache(tmp_path, spec, write_cache(tmp_path, spec, n_total))


def test_fsspec_url_round_trip(tmp_path):
    """A file:// URL is the same cache as its path."""
    spec = make_spec()
    records = write_cache(f"file://{tmp_path}", spec, 4)
    check_cache(tmp_path, spec, records)
    assert len(CacheReader(f"file://{tmp_path}")) == 4


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_zarr_rows_read_by_ranges_from_a_store(tmp_path, mode):
    """A remote Zarr shard read row by row (no local copy) gives the records written."""
    import fsspec

    spec = make_spec(container="zarr", mode=mode, samples=1, shard_sequences=3)
    records = write_cache(tmp_path / "cache", spec, 7)
    store, root = fsspec.filesystem("memory"), f"/zarr-{mode}"
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file() and ".locks" not in path.parts:
            store.pipe(
                f"{root}/{path.relative_to(tmp_path / 'cache').as_posix()}", path.read_bytes()
            )
    reader = CacheReader(f"memory://{root}", local_cache=tmp_path / "local", prefetch=0)
    for i in (5, 0, 6, 3):
        assert_records_match(spec, reader.read(i), records[i])
    assert not list((tmp_path / "local").rglob("*.zarr"))  # ranged reads, no copies
    store.rm(root, recursive=True)


# -- atomic publishing ------------------------------------------------------------------


@pytest.mark.parametrize("container", CONTAINERS)
def test_failed_publish_leaves_nothing_visible(tmp_path, monkeypatch, container):
    spec = make_spec(container=container, shard_sequences=2)
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, 5))
    before = tree_bytes(tmp_path)
    listings = []
    real_replace = os.replace

    def replace_then_fail(src, dst):
        if "shard-000001" in os.fspath(dst):
            listings.append(sorted(p.name for p in (tmp_path / "shards").iterdir()))
            raise OSError("simulated failure while publishing")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with CacheWriter(tmp_path, spec) as writer, pytest.raises(OSError, match="simulated"):
        writer.write_shard(1, shard_records(spec, 1, 5))
    # the unfinished shard existed only under its .tmp- name, beside the finished one
    (names,) = listings
    assert len(names) == 2 and names[1] == f"shard-000000.{container}"
    assert names[0].startswith(f".tmp-shard-000001.{container}.")
    # afterwards: no shard, no temporary, manifest byte-identical
    assert tree_bytes(tmp_path) == before
    assert [s.index for s in read_manifest(Location(tmp_path)).shards] == [0]


def test_failure_inside_zarr_write_leaves_nothing_visible(tmp_path, monkeypatch):
    import zarr

    spec = make_spec(container="zarr", shard_sequences=2)
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, 5))
    before = tree_bytes(tmp_path)
    real_create = zarr.Group.create_array
    calls = []

    def create_then_fail(self, name, **kwargs):
        calls.append(sorted(p.name for p in (tmp_path / "shards").iterdir()))
        if len(calls) == 4:  # midway through the fields
            raise RuntimeError("simulated crash inside the container")
        return real_create(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", create_then_fail)
    with CacheWriter(tmp_path, spec) as writer, pytest.raises(RuntimeError, match="simulated"):
        writer.write_shard(1, shard_records(spec, 1, 5))
    for names in calls:
        assert [n for n in names if not n.startswith(".tmp-")] == ["shard-000000.zarr"]
    assert tree_bytes(tmp_path) == before


CRASH_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[3])
from storage_synth import make_spec, shard_records
from logitcache.storage import CacheWriter

spec = make_spec(container=sys.argv[2], shard_sequences=2)
with CacheWriter(sys.argv[1], spec) as writer:
    writer.write_shard(0, shard_records(spec, 0, 5))
    os.replace = lambda src, dst: os._exit(3)  # power cut just before the rename
    writer.write_shard(1, shard_records(spec, 1, 5))
"""


# arrow only, to keep the suite fast: a zarr group is staged the same way (tested above)
@pytest.mark.parametrize("container", ["arrow"])
def test_crashed_writer_leaves_only_a_temporary(tmp_path, container):
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), container, str(HERE)],
        capture_output=True,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert len(names) == 2 and names[1] == f"shard-000000.{container}"
    assert names[0].startswith(f".tmp-shard-000001.{container}.")
    spec = make_spec(container=container, shard_sequences=2)
    reader = CacheReader(tmp_path)
    assert [s.index for s in reader.shards] == [0] and len(reader) == 2
    assert not reader.manifest.complete

    with CacheWriter(tmp_path, spec) as writer:  # the next writer clears the leftover
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == names[1:]
        assert writer.is_done(0) and not writer.is_done(1)
        for j in (1, 2):
            writer.write_shard(j, shard_records(spec, j, 5))
        writer.finish(5)
    check_cache(tmp_path, spec, make_records(spec, 0, 5))


def test_stale_temporaries_are_removed_only_by_their_owner(tmp_path):
    spec = make_spec(shard_sequences=2)
    shards = tmp_path / "shards"
    shards.mkdir(parents=True)
    stale = [".tmp-shard-000001.arrow.deadbeef", ".tmp-shard-000002.arrow.cafef00d"]
    for name in stale:
        (shards / name).write_bytes(b"half a shard")
    (shards / ".tmp-shard-000004.zarr.0badcafe").mkdir()
    (shards / ".tmp-shard-000004.zarr.0badcafe" / "zarr.json").write_text("{}")
    with CacheWriter(tmp_path, spec, worker=1, num_workers=2):
        assert sorted(p.name for p in shards.iterdir()) == sorted(
            [stale[1], ".tmp-shard-000004.zarr.0badcafe"]
        )
    with CacheWriter(tmp_path, spec, worker=0, num_workers=2):
        assert list(shards.iterdir()) == []


def test_manifest_lists_only_completed_shards(tmp_path, monkeypatch):
    spec = make_spec(shard_sequences=2)
    published = []
    real_replace = os.replace

    def watch(src, dst):  # when the manifest is replaced, every shard it lists exists
        real_replace(src, dst)
        if os.fspath(dst).endswith("manifest.json"):
            manifest = Manifest.from_json(Path(dst).read_bytes())
            assert all((tmp_path / s.path).exists() for s in manifest.shards)
            published.append([s.index for s in manifest.shards])

    monkeypatch.setattr(os, "replace", watch)
    with CacheWriter(tmp_path, spec) as writer:
        for j in (2, 0, 1):
            writer.write_shard(j, shard_records(spec, j, 5))
            assert not read_manifest(Location(tmp_path)).complete
        writer.finish(5)
    assert published == [[2], [0, 2], [0, 1, 2], [0, 1, 2]]
    assert read_manifest(Location(tmp_path)).complete


@pytest.mark.parametrize("container", CONTAINERS)
def test_shard_bytes_are_fsynced_before_the_rename(tmp_path, fsynced, container):
    spec = make_spec(container=container)
    with CacheWriter(tmp_path, spec) as writer:
        fsynced.clear()
        writer.write_shard(0, make_records(spec, 0, 3))
    staged = [p for p in fsynced if "/shards/.tmp-shard-000000" in p]
    published = list((tmp_path / "shards" / f"shard-000000.{container}").rglob("*"))
    assert len(staged) == max(1, sum(p.is_file() for p in published))  # every file
    assert str(tmp_path / "shards") in fsynced  # the rename itself
    assert any("/.tmp-manifest.json" in p for p in fsynced)
    assert fsynced.index(str(tmp_path / "shards")) < fsynced.index(
        next(p for p in fsynced if "/.tmp-manifest.json" in p)
    )


# -- resume, spec changes, locking ------------------------------------------------------


@pytest.mark.parametrize("container", CONTAINERS)
def test_reopen_with_same_spec_resumes(tmp_path, container):
    spec = make_spec(container=container, shard_sequences=2)
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, 5))
        writer.write_shard(2, shard_records(spec, 2, 5))
    shard0 = tree_bytes(tmp_path / "shards")
    with CacheWriter(tmp_path, spec) as writer:
        assert [writer.is_done(j) for j in range(4)] == [True, False, True, False]
        assert not writer.complete
        with pytest.raises(CacheError, match=r"shards \[1\] are not written in full"):
            writer.finish(5)
        writer.write_shard(1, shard_records(spec, 1, 5))
        manifest = writer.finish(5)
    assert manifest.complete and manifest.n_sequences_total == 5
    after = tree_bytes(tmp_path / "shards")
    assert all(after[name] == data for name, data in shard0.items())  # not rewritten
    check_cache(tmp_path, spec, make_records(spec, 0, 5))
    with CacheWriter(tmp_path, spec) as writer:  # a finished cache stays finished
        assert writer.complete and all(writer.is_done(j) for j in range(3))


def test_reopen_with_other_spec_is_refused(tmp_path):
    spec = make_spec(shard_sequences=2)
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, 5))
    before = tree_bytes(tmp_path)
    other = make_spec(shard_sequences=2, k=7, teacher="another-teacher")
    with pytest.raises(CacheError, match="other settings") as err:
        CacheWriter(tmp_path, other)
    assert "k (6 -> 7)" in str(err.value)
    assert "teacher.name_or_path ('toy-teacher' -> 'another-teacher')" in str(err.value)
    assert "vocab_size" not in str(err.value)
    assert tree_bytes(tmp_path) == before
    # the refused writer let go of its lock: the right spec opens again in this process
    with CacheWriter(tmp_path, spec) as writer:
        assert writer.is_done(0)


def test_spec_with_tuples_resumes(tmp_path):
    """A spec compares by its JSON form: tuples in settings read back as lists."""
    base = make_spec(shard_sequences=2)
    spec = dataclasses.replace(base, settings={"sizes": (1, 2), "seed": 0})
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, 5))
    with CacheWriter(tmp_path, spec) as writer:
        assert writer.is_done(0)


def test_second_writer_on_the_same_worker_is_refused(tmp_path):
    spec = make_spec()
    with CacheWriter(tmp_path, spec):
        with pytest.raises(CacheError, match="another process is writing worker 0 of 1"):
            CacheWriter(tmp_path, spec)
        CacheWriter(tmp_path, spec, worker=1, num_workers=2).close()  # another slot
    CacheWriter(tmp_path, spec).close()  # released on exit


@pytest.mark.parametrize(("worker", "num_workers"), [(2, 2), (-1, 2), (0, 0)])
def test_worker_index_out_of_range(tmp_path, worker, num_workers):
    with pytest.raises(CacheError, match="worker index"):
        CacheWriter(tmp_path, make_spec(), worker=worker, num_workers=num_workers)


def test_finish_refuses_a_short_shard(tmp_path):
    """Only the last shard may hold fewer than shard_sequences sequences."""
    spec = make_spec(shard_sequences=2)
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, make_records(spec, 0, 1))
        writer.write_shard(1, make_records(spec, 2, 4))
        with pytest.raises(CacheError, match=r"shards \[0\] are not written in full"):
            writer.finish(4)
        writer.write_shard(0, make_records(spec, 0, 2))  # rewriting a shard replaces it
        assert writer.finish(4).complete
    check_cache(tmp_path, spec, make_records(spec, 0, 4))


def test_write_shard_checks_its_sequences(tmp_path):
    spec = make_spec(shard_sequences=2)
    with CacheWriter(tmp_path, spec) as writer:
        before = tree_bytes(tmp_path)
        with pytest.raises(CacheError, match=r"must hold sequences 2\.\. in order"):
            writer.write_shard(1, shard_records(spec, 0, 5))
        with pytest.raises(CacheError, match="must hold sequences"):
            writer.write_shard(0, [])
        with pytest.raises(CacheError, match="3 > 2 sequences"):
            writer.write_shard(0, make_records(spec, 0, 3))
        assert tree_bytes(tmp_path) == before


# -- several workers --------------------------------------------------------------------


@pytest.mark.parametrize("container", CONTAINERS)
def test_two_workers_write_the_same_cache_as_one(tmp_path, container):
    spec = make_spec(container=container, shard_sequences=2)
    n = 7  # shards 0..3, the last one partial
    single, multi = tmp_path / "single", tmp_path / "multi"
    write_cache(single, spec, n)

    w0 = CacheWriter(multi, spec, worker=0, num_workers=2)
    w1 = CacheWriter(multi, spec, worker=1, num_workers=2)
    assert [w0.owns(j) for j in range(4)] == [True, False, True, False]
    w0.write_shard(0, shard_records(spec, 0, n))
    w1.write_shard(1, shard_records(spec, 1, n))
    with pytest.raises(CacheError, match="workers still running") as err:
        merge_parts(multi)
    assert "worker-00000-of-00002.json" in str(err.value)
    assert "worker-00001-of-00002.json" in str(err.value)
    w0.write_shard(2, shard_records(spec, 2, n))
    assert w0.finish(n) is None  # worker 1 is still running
    with pytest.raises(
        CacheError, match=r"1 shard missing \(first: \[3\], owned by worker 1 of 2\)"
    ) as err:
        merge_parts(multi)
    assert "unfinished workers: worker-00001-of-00002.json" in str(err.value)
    assert not (multi / "manifest.json").exists()

    w1.write_shard(3, shard_records(spec, 3, n))
    merged = w1.finish(n)  # the last worker merges
    w0.close()
    w1.close()
    assert merged is not None and merged.complete

    one = json.loads((single / "manifest.json").read_text())
    two = json.loads((multi / "manifest.json").read_text())
    assert [(s["index"], s["sha256"]) for s in two["shards"]] == [
        (s["index"], s["sha256"]) for s in one["shards"]
    ]
    assert two == one
    assert tree_bytes(multi / "shards") == tree_bytes(single / "shards")
    assert merge_parts(multi) == merged  # merging again is harmless
    assert [r.index for r in CacheReader(multi)] == list(range(n))


def test_merge_names_the_shards_of_a_worker_that_never_ran(tmp_path):
    spec = make_spec(shard_sequences=2)
    with pytest.raises(CacheError, match="nothing to merge"):
        merge_parts(tmp_path)
    with CacheWriter(tmp_path, spec, worker=0, num_workers=2) as w0:
        for j in (0, 2):
            w0.write_shard(j, shard_records(spec, j, 7))
        assert w0.finish(7) is None
    with pytest.raises(
        CacheError, match=r"2 shards missing \(first: \[1, 3\], owned by worker 1 of 2\)"
    ):
        merge_parts(tmp_path)


def test_merge_refuses_workers_that_disagree(tmp_path):
    spec = make_spec(shard_sequences=2)
    with CacheWriter(tmp_path, spec, worker=0, num_workers=2) as w0:
        w0.write_shard(0, shard_records(spec, 0, 3))
        w0.finish(3)
    with CacheWriter(tmp_path, spec, worker=1, num_workers=2) as w1:
        w1.write_shard(1, shard_records(spec, 1, 4))
        assert w1.finish(4) is None
    with pytest.raises(CacheError, match=r"disagree on the corpus size: \[3, 4\]"):
        merge_parts(tmp_path)


def test_merge_refuses_a_part_from_another_cache(tmp_path):
    spec = make_spec(shard_sequences=2)
    other = make_spec(shard_sequences=2, teacher="another-teacher")
    for root, s, worker in ((tmp_path / "a", spec, 0), (tmp_path / "b", other, 1)):
        with CacheWriter(root, s, worker=worker, num_workers=2) as writer:
            writer.write_shard(worker, shard_records(s, worker, 4))
            assert writer.finish(4) is None
    shutil.copy(tmp_path / "b/parts/worker-00001-of-00002.json", tmp_path / "a/parts")
    before = tree_bytes(tmp_path / "a")
    with pytest.raises(CacheError, match=r"worker-00001-of-00002\.json belongs to another cache"):
        merge_parts(tmp_path / "a")
    assert tree_bytes(tmp_path / "a") == before


# -- verify_cache -----------------------------------------------------------------------


def flip_target(root: Path, info, j: int) -> Path:
    """The file to damage: the Arrow file, or one of the zarr group's chunk files."""
    path = root / info.path
    if path.is_file():
        return path
    chunks = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
    return chunks[j % len(chunks)]


@pytest.mark.parametrize("container", CONTAINERS)
def test_verify_cache_finds_each_flipped_shard(tmp_path, container):
    spec = make_spec(container=container, shard_sequences=2)
    write_cache(tmp_path, spec, 5)
    manifest, problems = verify_cache(tmp_path)
    assert problems == [] and len(manifest.shards) == 3
    for j, info in enumerate(manifest.shards):
        target = flip_target(tmp_path, info, j)
        original = target.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x10
        target.write_bytes(bytes(damaged))
        _, problems = verify_cache(tmp_path)
        assert len(problems) == 1, problems
        assert info.path in problems[0] and "fails its check" in problems[0]
        target.write_bytes(original)
    assert verify_cache(tmp_path)[1] == []


def test_verify_cache_checks_the_manifest_counts(tmp_path):
    spec = make_spec(shard_sequences=2)
    write_cache(tmp_path, spec, 5)
    path = tmp_path / "manifest.json"
    obj = json.loads(path.read_text())
    obj["shards"][1]["n_entries"] += 1
    path.write_text(json.dumps(obj))
    _, problems = verify_cache(tmp_path)
    assert problems == [
        f"shard shards/shard-000001.arrow: n_entries is {obj['shards'][1]['n_entries'] - 1}, "
        f"manifest says {obj['shards'][1]['n_entries']}"
    ]
