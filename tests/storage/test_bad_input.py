"""Every bad input is refused with a CacheError that names the problem, and nothing changes.

Manifests and shards come from other people's machines: each test damages a small cache
in one way and checks the message, that no bytes of the cache changed, and (for pickles)
that nothing was executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from storage_synth import make_record, make_spec, shard_records, tree_bytes, write_cache

from logitcache.storage import (
    CacheError,
    CacheReader,
    CacheSpec,
    CacheWriter,
    ShardCorruptError,
    default_codecs,
    merge_parts,
    verify_cache,
)

N_SEQ = 5  # shards of 2: shard-000000, shard-000001 and a partial shard-000002


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """One small cache per container, written once and copied by ``cache``."""
    out = {}
    for container in ("arrow", "zarr"):
        root = tmp_path_factory.mktemp(f"pristine-{container}")
        write_cache(root, make_spec(container=container, shard_sequences=2), N_SEQ)
        out[container] = root
    return out


@pytest.fixture(params=["arrow"])
def cache(request, pristine, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(pristine[request.param], root)
    return root


both_containers = pytest.mark.parametrize("cache", ["arrow", "zarr"], indirect=True)


def edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def read_everything(root: Path, verify: bool = True) -> None:
    reader = CacheReader(root, verify=verify)
    for _ in reader:
        pass


def assert_refused(root: Path, match: str, *, verify: bool = True, exc=CacheError):
    """Reading refuses with ``exc`` matching ``match``; the cache's bytes are unchanged."""
    before = tree_bytes(root)
    with pytest.raises(exc, match=match) as err:
        read_everything(root, verify=verify)
    assert tree_bytes(root) == before
    return str(err.value)


def shard_path(root: Path, j: int) -> Path:
    (path,) = (root / "shards").glob(f"shard-{j:06d}.*")
    return path


def digest_of(path: Path) -> tuple[int, str]:
    """(bytes, sha256) as the manifest records them, for a file or a zarr group."""
    if path.is_file():
        data = path.read_bytes()
        return len(data), hashlib.sha256(data).hexdigest()
    total, outer = 0, hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        data = file.read_bytes()
        total += len(data)
        outer.update(
            f"{file.relative_to(path).as_posix()}\0{hashlib.sha256(data).hexdigest()}\n".encode()
        )
    return total, outer.hexdigest()


def vouch_for(root: Path, j: int) -> None:
    """Make the manifest's size and hash of shard j match what is on disk now, as a hostile
    or careless publisher would; the shard's own content must then be what refuses it."""
    size, digest = digest_of(shard_path(root, j))

    def edit(obj):
        obj["shards"][j].update(bytes=size, sha256=digest)
        obj["bytes"] = sum(s["bytes"] for s in obj["shards"])

    edit_manifest(root, edit)


# -- versions and manifest shape --------------------------------------------------------


def test_future_format_version_says_upgrade(cache):
    edit_manifest(cache, lambda m: m.update(format_version=3))
    msg = assert_refused(cache, "format version 3, newer")
    assert "upgrade logitcache" in msg and "versions [1, 2]" in msg


@pytest.mark.parametrize("version", [0, -1, "1", None, [1], True])
def test_unknown_format_version(cache, version):
    edit_manifest(cache, lambda m: m.update(format_version=version))
    assert_refused(cache, r"unknown format version .*; expected one of \[1, 2\]")


def test_format_version_must_match_the_spec(cache):
    """A format 2 spec (with batch_sequences) under a manifest claiming 1 is an edit."""
    edit_manifest(cache, lambda m: m.update(format_version=1))
    assert_refused(cache, "format version 1 but a format 2 spec")


def test_missing_format_version(cache):
    edit_manifest(cache, lambda m: m.pop("format_version"))
    assert_refused(cache, "unknown format version None")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a logitcache manifest"),
        ('{"format": "webdataset", "format_version": 1}', "not a logitcache manifest"),
        ("", "not valid JSON"),
    ],
)
def test_not_a_manifest(cache, text, match):
    (cache / "manifest.json").write_text(text)
    assert_refused(cache, match)


def test_no_manifest(tmp_path):
    with pytest.raises(CacheError, match=r"no manifest\.json"):
        CacheReader(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_edited_spec_no_longer_matches_its_cache_id(cache):
    edit_manifest(cache, lambda m: m["spec"]["teacher"].update(name_or_path="other"))
    assert_refused(cache, "cache_id does not match its spec")


# -- paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "/etc/passwd",
        "s3://bucket/shard-000000.arrow",
        "file:///etc/passwd",
        "a/../../b",
        "shards/../../outside.arrow",
        "shards/../manifest.json",
        "~/shard.arrow",
        "C:/shard.arrow",
        "c:shard.arrow",
        "shards\\shard-000000.arrow",
        "./shards/shard-000000.arrow",
        "shards//shard-000000.arrow",
        "shards/",
    ],
)
def test_paths_outside_the_cache_are_refused(cache, path):
    edit_manifest(cache, lambda m: m["shards"][0].update(path=path))
    assert_refused(cache, "path outside the cache")


@pytest.mark.parametrize("path", ["", None, 7])
def test_invalid_shard_paths(cache, path):
    edit_manifest(cache, lambda m: m["shards"][0].update(path=path))
    assert_refused(cache, "invalid shard path")


def test_duplicate_shard_paths(cache):
    edit_manifest(cache, lambda m: m["shards"][1].update(path=m["shards"][0]["path"]))
    assert_refused(cache, "listed twice")


def test_worker_part_with_a_path_outside_is_refused(tmp_path):
    spec = make_spec(shard_sequences=2)
    with CacheWriter(tmp_path, spec, worker=0, num_workers=2) as writer:
        writer.write_shard(0, shard_records(spec, 0, 3))
    part = tmp_path / "parts" / "worker-00000-of-00002.json"
    obj = json.loads(part.read_text())
    obj["shards"][0]["path"] = "../../elsewhere.arrow"
    part.write_text(json.dumps(obj))
    before = tree_bytes(tmp_path)
    with pytest.raises(CacheError, match="path outside the cache"):
        merge_parts(tmp_path)
    assert tree_bytes(tmp_path) == before


# -- shards that are missing, short or damaged ------------------------------------------


@both_containers
@pytest.mark.parametrize("verify", [True, False])
def test_missing_shard(cache, verify):
    path = shard_path(cache, 1)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    reader = CacheReader(cache, verify=verify)
    assert reader.read(0).index == 0  # other shards still read
    with pytest.raises(CacheError, match=r"shard shards/shard-000001\.\w+ is missing"):
        reader.read(2)
    assert_refused(cache, "shard-000001.* is missing", verify=verify)
    _, problems = verify_cache(cache)
    assert len(problems) == 1 and "shard-000001" in problems[0] and "missing" in problems[0]


def truncate(root: Path, j: int) -> str:
    path = shard_path(root, j)
    if path.is_dir():  # the zarr shard object holding the ids of every sequence
        path = path / "ids" / "c" / "0"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.relative_to(root).as_posix()


@both_containers
def test_truncated_shard_fails_its_check(cache):
    truncate(cache, 1)
    msg = assert_refused(
        cache, r"shard shards/shard-000001\.\w+ fails its check", exc=ShardCorruptError
    )
    assert "damaged or foreign" in msg


@both_containers
def test_truncated_shard_without_verify(cache):
    """Without the hash check the container or the codecs still refuse the shard."""
    truncate(cache, 1)
    assert_refused(cache, "shard-000001", verify=False)


# zarr only: with the hash check off, pyarrow 26 can abort the whole process (uncaught
# std::length_error) on some damaged IPC bytes, which no Python code can catch. That is
# why readers verify by default.
@pytest.mark.parametrize("cache", ["zarr"], indirect=True)
def test_damage_without_verify_is_a_cache_error_or_unnoticed(cache):
    """With the hash check off, a damaged byte anywhere in a chunk either decodes to
    something (unnoticed) or raises CacheError; never another exception type."""
    target = shard_path(cache, 1) / "input_ids" / "c" / "0"
    original = target.read_bytes()
    for at in np.linspace(0, len(original) - 1, 12).astype(int):
        damaged = bytearray(original)
        damaged[at] ^= 0xFF
        target.write_bytes(bytes(damaged))
        try:
            read_everything(cache, verify=False)
        except CacheError as err:
            assert "shard-000001" in str(err) or "sequence" in str(err)
    target.write_bytes(original)


def test_damaged_arrow_footer_without_verify_is_a_cache_error(cache):
    """With the hash check off, each byte of an Arrow shard's footer flipped either reads or
    raises CacheError (a flipped integer bit width raised ArrowNotImplementedError)."""
    target = shard_path(cache, 1)
    original = target.read_bytes()
    for at in range(len(original) - 80, len(original)):
        damaged = bytearray(original)
        damaged[at] ^= 0xFF
        target.write_bytes(bytes(damaged))
        try:
            read_everything(cache, verify=False)
        except CacheError as err:
            assert "shard-000001" in str(err) or "sequence" in str(err)
    target.write_bytes(original)


@both_containers
def test_bit_flip_names_the_shard_and_both_hashes(cache):
    path = shard_path(cache, 2)
    target = path if path.is_file() else path / "logprobs" / "c" / "0"
    expected = json.loads((cache / "manifest.json").read_text())["shards"][2]["sha256"]
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))
    actual = digest_of(path)[1]
    assert actual != expected
    msg = assert_refused(
        cache, r"shard shards/shard-000002\.\w+ fails its check", exc=ShardCorruptError
    )
    assert actual[:16] in msg and expected[:16] in msg
    reader = CacheReader(cache)
    assert reader.read(0).index == 0  # only the damaged shard is refused


# -- identity: shards from elsewhere, manifests edited ----------------------------------


@both_containers
def test_shard_from_another_cache_is_refused(cache, tmp_path, request):
    container = request.node.callspec.params["cache"]
    other = tmp_path / "other"
    other_spec = make_spec(container=container, shard_sequences=2, teacher="another-teacher")
    write_cache(other, other_spec, N_SEQ)
    target = shard_path(cache, 1)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    src = shard_path(other, 1)
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, target)
    vouch_for(cache, 1)  # even with a matching hash in the manifest
    assert_refused(cache, r"shard-000001\.\w+ belongs to another cache", exc=ShardCorruptError)


@both_containers
def test_swapped_shards_are_refused(cache):
    """Two shards swapped on disk, the manifest's hashes updated to match."""
    a, b = shard_path(cache, 0), shard_path(cache, 1)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    vouch_for(cache, 0)
    vouch_for(cache, 1)
    assert_refused(cache, r"shard-000000\.\w+ disagrees with the manifest", exc=ShardCorruptError)


@pytest.mark.parametrize(
    ("shard", "key", "value"),
    [(1, "n_sequences", 1), (2, "first_sequence", 5), (2, "index", 3), (0, "n_sequences", 1)],
)
def test_manifest_disagreeing_with_shard_metadata(cache, shard, key, value):
    def edit(obj):
        info = obj["shards"][shard]
        info[key] = value
        obj["n_sequences"] = sum(s["n_sequences"] for s in obj["shards"])

    edit_manifest(cache, edit)
    msg = assert_refused(cache, "disagrees with the manifest", exc=ShardCorruptError)
    assert f"shard-{shard:06d}" in msg


def test_overlapping_or_unordered_shards(cache):
    edit_manifest(cache, lambda m: m["shards"][1].update(first_sequence=1))
    assert_refused(cache, "shards 0 and 1 overlap")
    edit_manifest(cache, lambda m: m["shards"].reverse())
    assert_refused(cache, "not in increasing index order")


def test_sequence_that_is_not_where_the_manifest_says(cache):
    """Metadata can agree while the rows hold other sequences: the stored index says so."""
    import pyarrow as pa

    path = shard_path(cache, 0)
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    batches = table.to_batches(max_chunksize=1)
    shifted = [b.set_column(0, "index", pa.array([b.column(0)[0].as_py() + 1])) for b in batches]
    with pa.ipc.new_file(str(path), table.schema) as writer:
        for batch in shifted:
            writer.write_batch(batch)
    vouch_for(cache, 0)
    assert_refused(cache, "group 0: starts at sequence 1, expected 0", exc=ShardCorruptError)


# -- records being written --------------------------------------------------------------


def bad_record_cases():
    spec = make_spec(shard_sequences=2)

    def out_of_vocab_id(r):
        r.ids[3] = spec.vocab_size

    def out_of_vocab_input(r):
        r.input_ids[0] = spec.vocab_size + 5

    def too_long(r):
        length = spec.seq_len + 1
        r.input_ids = np.zeros(length, np.uint32)
        r.loss_mask = np.ones(length, bool)

    def nan_logprob(r):
        r.logprobs[0] = np.nan

    def positive_logprob(r):
        r.logprobs[1] = 0.25

    def wrong_k(r):
        r.n_entries[0] -= 1
        r.n_entries[-1] += 1

    def no_logprobs(r):
        r.logprobs = None

    def short_tail(r):
        r.tail_mass = r.tail_mass[:-1]

    return [
        (out_of_vocab_id, "ids contains id 1000 >= vocab_size 1000"),
        (out_of_vocab_input, "input_ids contains id 1005 >= vocab_size 1000"),
        (too_long, r"length 13 outside \[2, seq_len=12\]"),
        (nan_logprob, "log-probabilities must be <= 0 and not NaN"),
        (positive_logprob, "log-probabilities must be <= 0 and not NaN"),
        (wrong_k, "k=6 entries at every position"),
        (no_logprobs, r"fields \['logprobs'\] are required"),
        (short_tail, "loss_mask/tail_mass shapes disagree"),
    ]


@pytest.mark.parametrize(
    ("damage", "match"), bad_record_cases(), ids=lambda c: getattr(c, "__name__", "")
)
@pytest.mark.parametrize("logprobs", ["lossy", "float32"])
def test_bad_record_is_refused_at_write(tmp_path, damage, match, logprobs):
    spec = make_spec(shard_sequences=2, logprobs=logprobs)
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, shard_records(spec, 0, N_SEQ))
        before = tree_bytes(tmp_path)
        records = shard_records(spec, 1, N_SEQ)
        damage(records[1])
        with pytest.raises(CacheError, match=match) as err:
            writer.write_shard(1, records)
        assert "sequence 3" in str(err.value)
        assert tree_bytes(tmp_path) == before
        assert not writer.is_done(1)


def test_sampled_counts_must_add_up(tmp_path):
    spec = make_spec(mode="sampled", samples=12, shard_sequences=2)
    record = make_record(spec, 0)
    record.counts[0] += 1
    with CacheWriter(tmp_path, spec) as writer:
        with pytest.raises(CacheError, match="counts do not add up to samples=12"):
            writer.write_shard(0, [record])
        record.counts = None
        with pytest.raises(CacheError, match=r"fields \['counts'\] are required"):
            writer.write_shard(0, [record])


# -- specs ------------------------------------------------------------------------------


def spec_kwargs(**changes):
    base = dict(
        mode="topk",
        vocab_size=1000,
        seq_len=12,
        pack=True,
        container="arrow",
        codecs=default_codecs(1000),
        k=6,
    )
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"k": 0}, r"'k' = 0 is outside \[1, 1000\]"),
        ({"k": 1001}, r"'k' = 1001 is outside \[1, 1000\]"),
        ({"k": None}, "'k' must be an integer"),
        ({"mode": "sampled", "samples": 0}, r"'samples' = 0 is outside \[1, 255\]"),
        ({"mode": "sampled", "samples": 256}, r"'samples' = 256 is outside \[1, 255\]"),
        ({"mode": "sampled", "samples": -3}, "'samples' = -3"),
        ({"mode": "sampled"}, "'samples' must be an integer"),
        ({"vocab_size": 0}, "'vocab_size' = 0"),
        ({"seq_len": 1}, "'seq_len' = 1"),
        ({"shard_sequences": 0}, "'shard_sequences' = 0"),
        ({"mode": "dense"}, "unknown mode 'dense'"),
        ({"container": "parquet"}, "unknown container 'parquet'"),
        ({"k": "6"}, "'k' must be an integer, got '6'"),
        ({"k": 6.0}, "'k' must be an integer, got 6.0"),
        ({"k": True}, "'k' must be an integer, got True"),
        ({"pack": "yes"}, "'pack' must be true or false"),
        ({"sampled_logprobs": "no"}, "'sampled_logprobs' must be true or false"),
        ({"codecs": "zstd"}, "'codecs' must map"),
        ({"codecs": {"ids": "zstd"}}, "'codecs' must map"),
        ({"teacher": ["a"]}, "'teacher' must be an object"),
    ],
)
def test_bad_spec(changes, match):
    with pytest.raises(CacheError, match=match):
        CacheSpec(**spec_kwargs(**changes))


def test_spec_missing_a_field_codec(tmp_path):
    codecs = default_codecs(1000, format_version=1)
    del codecs["tail_mass"]
    spec = CacheSpec(**spec_kwargs(codecs=codecs))
    with pytest.raises(CacheError, match=r"no codec for fields \['tail_mass'\]"):
        CacheWriter(tmp_path, spec)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(k=0), "'k' = 0"),
        (lambda s: s.update(mode="sampled", samples=300), "'samples' = 300"),
        (lambda s: s.update(vocab_size=10**15), "'vocab_size' = 1000000000000000"),
        (lambda s: s.update(seq_len=10**15), "'seq_len' = 1000000000000000"),
        (lambda s: s.update(shard_sequences=10**15), "'shard_sequences' = 1000000000000000"),
        (lambda s: s.update(vocab_size="1000"), "'vocab_size' must be an integer"),
        (lambda s: s.update(pack="false"), "'pack' must be true or false"),
        (lambda s: s.update(codecs=["zstd"]), "'codecs' must map"),
        (lambda s: s.update(surprise=1), r"unknown keys: \['surprise'\]"),
        (lambda s: s.pop("vocab_size"), "malformed"),
    ],
)
def test_bad_spec_in_manifest(cache, edit, match):
    def apply(obj):
        edit(obj["spec"])
        obj.pop("cache_id")  # the spec is wrong, not merely edited

    edit_manifest(cache, apply)
    assert_refused(cache, match)


def test_spec_that_is_not_an_object(cache):
    edit_manifest(cache, lambda m: m.update(spec=[1, 2]))
    assert_refused(cache, "'spec' must be an object")


# -- declared sizes and types -----------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("n_sequences", 10**15, r"'n_sequences' = 1000000000000000 is outside \[1, 16777216\]"),
        ("n_sequences", 0, "'n_sequences' = 0"),
        ("bytes", 10**15, "'bytes' = 1000000000000000"),
        ("bytes", 0, "'bytes' = 0"),
        ("index", -1, "'index' = -1"),
        ("first_sequence", -2, "'first_sequence' = -2"),
        ("n_tokens", -5, "'n_tokens' = -5"),
        ("n_sequences", "2", "'n_sequences' must be an integer, got '2'"),
        ("index", "0", "'index' must be an integer"),
        ("n_entries", 3.5, "'n_entries' must be an integer"),
        ("bytes", True, "'bytes' must be an integer, got True"),
        ("n_positions", None, "'n_positions' must be an integer"),
        ("sha256", 5, "'sha256' must be a 64-character hex digest"),
        ("sha256", "ab" * 16, "'sha256' must be a 64-character hex digest"),
        ("covered_mass", "lots", "'covered_mass' must be a number"),
        ("entropy", None, "'entropy' must be a number"),
        ("surprise", 1, r"unknown keys: \['surprise'\]"),
    ],
)
def test_bad_shard_entry(cache, key, value, match):
    edit_manifest(cache, lambda m: m["shards"][1].update({key: value}))
    msg = assert_refused(cache, match)
    assert "shard #1" in msg


@pytest.mark.parametrize("key", ["index", "path", "first_sequence", "n_sequences"])
def test_shard_entry_missing_a_key(cache, key):
    edit_manifest(cache, lambda m: m["shards"][0].pop(key))
    assert_refused(cache, rf"shard #0 lacks \['{key}'\]")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(shards={"0": {}}), "'shards' must be a list"),
        (lambda m: m["shards"].__setitem__(0, ["not", "an", "object"]), "must be an object"),
        (lambda m: m.update(n_sequences_total="5"), "'n_sequences_total' must be an integer"),
        (lambda m: m.update(n_sequences_total=-1), "'n_sequences_total' = -1"),
        (lambda m: m.update(n_sequences=10**15), "'n_sequences' = 1000000000000000 disagrees"),
        (lambda m: m.update(n_tokens=1), "'n_tokens' = 1 disagrees"),
        (lambda m: m.update(bytes=10**15), "'bytes' = 1000000000000000 disagrees"),
        (lambda m: m.update(complete="no"), "'complete' must be true or false"),
    ],
)
def test_bad_manifest_fields(cache, edit, match):
    edit_manifest(cache, edit)
    assert_refused(cache, match)


def test_huge_declared_total_does_not_hang_a_merge(tmp_path):
    """A part claiming 10**15 sequences is answered with a message, not a 10**15 loop."""
    spec = make_spec(shard_sequences=2)
    with CacheWriter(tmp_path, spec, worker=0, num_workers=2) as writer:
        writer.write_shard(0, shard_records(spec, 0, N_SEQ))
        assert writer.finish(10**15) is None
    with pytest.raises(CacheError, match=r"499999999999999 shards missing \(first: \[1, 2, 3"):
        merge_parts(tmp_path)


# -- pickles ----------------------------------------------------------------------------


class Trap:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(root: Path, j: int, marker: Path) -> None:
    target = shard_path(root, j)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.write_bytes(pickle.dumps({"rows": [Trap(marker)]}))
    vouch_for(root, j)


@both_containers
@pytest.mark.parametrize("verify", [True, False])
def test_pickle_in_place_of_a_shard_is_not_unpickled(cache, tmp_path, verify):
    marker = tmp_path / "unpickled"
    plant_pickle(cache, 0, marker)
    assert_refused(cache, "shard-000000", verify=verify, exc=ShardCorruptError)
    _, problems = verify_cache(cache)
    assert len(problems) == 1 and "shard-000000" in problems[0]
    assert not marker.exists()


def test_pickle_in_place_of_a_zarr_chunk_is_not_unpickled(pristine, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine["zarr"], cache)
    marker = tmp_path / "unpickled"
    for name in ("ids", "index"):
        chunk = shard_path(cache, 0) / name / "c" / "0"  # (zarr omits an all-zero index chunk)
        chunk.parent.mkdir(exist_ok=True)
        chunk.write_bytes(pickle.dumps(Trap(marker)))
    vouch_for(cache, 0)
    assert_refused(cache, "shard-000000", verify=True)
    assert not marker.exists()


def test_zarr_v2_group_with_a_pickle_codec_is_not_unpickled(pristine, tmp_path):
    """A forged zarr v2 group whose arrays name numcodecs' pickle codec."""
    cache = tmp_path / "cache"
    shutil.copytree(pristine["zarr"], cache)
    marker = tmp_path / "unpickled"
    group = shard_path(cache, 0)
    meta = json.loads((group / "zarr.json").read_text())
    shutil.rmtree(group)
    group.mkdir()
    (group / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (group / ".zattrs").write_text(json.dumps(meta["attributes"]))
    for name in ("index", "input_ids", "loss_mask", "doc_starts", "ids", "tail_mass", "logprobs"):
        (group / name).mkdir()
        array = {
            "zarr_format": 2,
            "shape": [2],
            "chunks": [2],
            "dtype": "<i8",
            "compressor": {"id": "pickle"},
            "fill_value": 0,
            "order": "C",
            "filters": None,
        }
        (group / name / ".zarray").write_text(json.dumps(array))
        (group / name / "0").write_bytes(pickle.dumps(Trap(marker)))
    vouch_for(cache, 0)
    assert_refused(cache, "shard-000000", verify=True)
    assert not marker.exists()


def test_manifest_naming_the_pickle_codec_is_refused(cache, tmp_path):
    def edit(obj):
        obj["spec"]["codecs"]["logprobs"] = [{"id": "pickle"}]
        obj.pop("cache_id")

    edit_manifest(cache, edit)
    assert_refused(cache, "codec 'pickle' is not allowed in a cache")


def test_spec_dataclass_round_trips_through_the_manifest(cache):
    """Control for the edits above: an untouched copy reads fine."""
    reader = CacheReader(cache)
    assert len(reader) == N_SEQ
    assert dataclasses.asdict(reader.spec) == dataclasses.asdict(
        make_spec(container="arrow", shard_sequences=2)
    )
