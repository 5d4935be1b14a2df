"""``convert_cache`` and ``logitcache convert``: a cache rewritten in another format version or
shard size holds exactly the same records (every decoded value bit for bit), teacher, corpus
and tokenizer files; refusals; resuming a killed conversion; URLs; the CLI end to end."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from storage_synth import assert_records_match, by_id, make_records, make_spec, write_cache

from logitcache.cli import main
from logitcache.storage import (
    CacheError,
    CacheReader,
    CacheWriter,
    convert_cache,
    copy_cache,
    verify_cache,
)
from logitcache.storage.format import diff_specs
from logitcache.storage.location import Location
from logitcache.storage.tokenizer_files import check_tokenizer_files

STORES = [
    pytest.param({"mode": "topk"}, id="topk-lossy"),
    pytest.param({"mode": "topk", "logprobs": "float16"}, id="topk-float16"),
    pytest.param({"mode": "sampled", "sampled_logprobs": True}, id="sampled-logprobs"),
]


def assert_same_records(a: CacheReader, b: CacheReader) -> None:
    """Every field of every record decodes to the same values (no tolerance), a sampled
    position's entries compared as a set (format 2 orders them by rank)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.index == rb.index
        if a.spec.mode == "sampled":
            ra, rb = by_id(ra), by_id(rb)
        for name in (
            "input_ids",
            "loss_mask",
            "doc_starts",
            "ids",
            "n_entries",
            "counts",
            "logprobs",
            "tail_mass",
        ):
            x, y = getattr(ra, name), getattr(rb, name)
            if x is None or y is None:  # absent from both, or the tail of a format 2
                assert (x is None and y is None) or (name, b.spec.format_version) == (
                    "tail_mass",
                    2,
                ), name
                continue
            np.testing.assert_array_equal(x, y, err_msg=name)


def assert_only_layout_differs(a: CacheReader, b: CacheReader) -> None:
    changed = {d.split(" ")[0].split(".")[0] for d in diff_specs(a.spec, b.spec)}
    assert changed <= {"codecs", "batch_sequences", "shard_sequences"}, changed
    assert b.manifest.complete and b.manifest.n_sequences_total == a.manifest.n_sequences_total
    for key in ("n_tokens", "n_positions", "n_entries"):
        assert getattr(b.manifest, key) == getattr(a.manifest, key), key
    for key in ("mean_covered_mass", "mean_entropy"):  # the source's, not recomputed
        assert b.manifest.stats()[key] == pytest.approx(a.manifest.stats()[key], rel=1e-12)


@pytest.mark.parametrize("store", STORES)
def test_format_1_to_2_and_back_keeps_every_value(tmp_path, store):
    spec = make_spec(format_version=1, shard_sequences=3, **store)
    records = write_cache(tmp_path / "v1", spec, 7)
    convert_cache(tmp_path / "v1", tmp_path / "v2", format_version=2)
    convert_cache(tmp_path / "v2", tmp_path / "back", format_version=1)
    v1, v2, back = (CacheReader(tmp_path / n) for n in ("v1", "v2", "back"))
    assert (v2.manifest.version_label, back.manifest.version_label) == ("2", "1.0")
    assert v2.spec.cache_id != v1.spec.cache_id
    assert back.spec.to_dict() == v1.spec.to_dict()  # the same cache, to its cache_id
    for copy in (v2, back):
        assert_only_layout_differs(v1, copy)
        assert_same_records(v1, copy)
    for got, want in zip(back, records, strict=True):
        assert_records_match(back.spec, got, want)
    assert v2.manifest.bytes < v1.manifest.bytes
    assert not verify_cache(tmp_path / "back")[1]


def test_a_counts_only_cache_goes_to_format_2_but_not_back(tmp_path):
    spec = make_spec(mode="sampled", format_version=1, shard_sequences=3)
    write_cache(tmp_path / "v1", spec, 7)
    convert_cache(tmp_path / "v1", tmp_path / "v2")
    assert_same_records(CacheReader(tmp_path / "v1"), CacheReader(tmp_path / "v2"))
    assert_only_layout_differs(CacheReader(tmp_path / "v1"), CacheReader(tmp_path / "v2"))
    with pytest.raises(CacheError, match="format 1 stores each position's tail mass"):
        convert_cache(tmp_path / "v2", tmp_path / "back", format_version=1)
    assert not (tmp_path / "back").exists()


def test_resharding_keeps_records_and_apportions_the_statistics(tmp_path):
    spec = make_spec(mode="sampled", sampled_logprobs=True, format_version=2, shard_sequences=3)
    write_cache(tmp_path / "src", spec, 10)
    result = convert_cache(tmp_path / "src", tmp_path / "big", shard_sequences=4)
    src, big = CacheReader(tmp_path / "src"), CacheReader(tmp_path / "big")
    assert [s.n_sequences for s in big.shards] == [4, 4, 2]
    assert big.spec.batch_sequences == 3  # the source's batches fit the new shards
    assert (result.written, result.skipped) == (3, 0)
    assert_only_layout_differs(src, big)
    assert_same_records(src, big)
    small = convert_cache(tmp_path / "big", tmp_path / "small", format_version=1, shard_sequences=1)
    assert len(small.manifest.shards) == 10 and small.manifest.format_version == 1
    assert_same_records(src, CacheReader(tmp_path / "small"))


class SavedText:
    """A tokenizer stand-in: ``save_pretrained`` writes two files."""

    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / "tokenizer.json").write_text('{"vocab": "tiny"}')
        (Path(directory) / "tokenizer_config.json").write_text("{}")


def test_tokenizer_files_are_carried_byte_for_byte(tmp_path):
    spec = make_spec(format_version=1, shard_sequences=3)
    with CacheWriter(tmp_path / "v1", spec) as writer:
        writer.attach_tokenizer(SavedText())
        writer.write_shard(0, make_records(spec, 0, 3))
        writer.finish(3)
    result = convert_cache(tmp_path / "v1", tmp_path / "v2")
    source = CacheReader(tmp_path / "v1").manifest
    assert source.version_label == "1.1"
    assert result.manifest.tokenizer_files == source.tokenizer_files
    for entry in source.tokenizer_files:
        assert (tmp_path / "v2" / entry.path).read_bytes() == (
            tmp_path / "v1" / entry.path
        ).read_bytes()
    # the stand-in's files are no tokenizer: verify's check of them is the hashes' part
    assert not check_tokenizer_files(Location(tmp_path / "v2"), result.manifest)


def test_refusals_leave_the_destination_as_it_was(tmp_path):
    spec = make_spec(format_version=1, shard_sequences=3)
    write_cache(tmp_path / "src", spec, 7)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="exists and is not empty"):
        convert_cache(tmp_path / "src", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    write_cache(tmp_path / "other", make_spec(format_version=2, teacher="another"), 4)
    with pytest.raises(CacheError, match=r"already holds another cache .*teacher\.name_or_path"):
        convert_cache(tmp_path / "src", tmp_path / "other")
    with pytest.raises(CacheError, match="SRC and DEST are the same place"):
        convert_cache(tmp_path / "src", f"{tmp_path}/./src/", format_version=2)
    with CacheWriter(tmp_path / "unfinished", spec) as writer:  # a teacher pass still running
        writer.write_shard(0, make_records(spec, 0, 3))
    with pytest.raises(CacheError, match="is not a finished cache"):
        convert_cache(tmp_path / "unfinished", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    write_cache(tmp_path / "whole", spec, 7)
    copy_cache(tmp_path / "whole", tmp_path / "pulled", shards="0")  # a partial pull
    with pytest.raises(CacheError, match=r"partial pull .*incomplete here. Finish the pull"):
        convert_cache(tmp_path / "pulled", tmp_path / "new")  # not "finish its teacher pass"
    assert not (tmp_path / "new").exists()


def test_a_killed_conversion_resumes_where_it_stopped(tmp_path):
    spec = make_spec(mode="topk", format_version=1, shard_sequences=2)
    write_cache(tmp_path / "v1", spec, 9)
    calls = []

    def killed_after_two_shards(done: int, total: int, message: str | None) -> None:
        calls.append(done)
        if len(calls) == 3:  # the call before any shard, then one per shard
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_cache(tmp_path / "v1", tmp_path / "v2", progress=killed_after_two_shards)
    assert len(CacheReader(tmp_path / "v2").shards) == 2
    shard0 = (tmp_path / "v2" / "shards" / "shard-000000.arrow").read_bytes()
    seen: list[tuple[int, int, str | None]] = []
    result = convert_cache(tmp_path / "v1", tmp_path / "v2", progress=lambda *a: seen.append(a))
    assert (result.written, result.skipped) == (3, 2)
    assert seen[0][2] == f"2 of 5 shards already at {tmp_path / 'v2'}"
    assert seen[-1][:2] == (result.bytes_before, result.bytes_before)
    assert (tmp_path / "v2" / "shards" / "shard-000000.arrow").read_bytes() == shard0
    assert_same_records(CacheReader(tmp_path / "v1"), CacheReader(tmp_path / "v2"))
    again = convert_cache(tmp_path / "v1", tmp_path / "v2")  # done: nothing rewritten
    assert (again.written, again.skipped) == (0, 5)


def test_from_an_http_server_to_s3_and_back(served, s3, tmp_path):
    dest = f"{s3}/converted"
    convert_cache(served.url, dest, format_version=1, shard_sequences=5)
    assert not verify_cache(dest)[1]
    assert [s.n_sequences for s in CacheReader(dest).shards] == [5, 5]
    convert_cache(dest, tmp_path / "local", format_version=2)
    assert_same_records(CacheReader(served.url), CacheReader(tmp_path / "local"))


# -- the command line ---------------------------------------------------------------------
def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def first_loss(cache: Path, student) -> float:
    from logitcache.train import CacheDataset, DistillationLoss, DistillCollator

    ds = CacheDataset(str(cache), split="all")
    batch = DistillCollator()([ds[i] for i in range(len(ds))])
    return DistillationLoss()(batch, model=student).item()


def test_cli_converts_a_precomputed_cache_that_verifies_and_trains_the_same(
    tmp_path, tiny_teacher_dir, text_corpus
):
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute

    src, dest = tmp_path / "v1", tmp_path / "v2"
    run_precompute(
        PrecomputeConfig(
            teacher=str(tiny_teacher_dir),
            out=str(src),
            device="cpu",
            corpus=CorpusSpec(data=(str(text_corpus),), seq_len=64),
            shard_sequences=4,
            top_k=8,
            format_version=1,
        )
    )
    result = invoke("convert", src, dest, "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    before, after = (CacheReader(p).manifest for p in (src, dest))
    line = result.stdout.strip()
    assert line.startswith("converted: ") and f"({after.bytes / before.bytes:.2f}x)" in line
    assert f"in format 2.1, {len(after.shards)} shards ({len(after.shards)} written) at" in line
    checked = invoke("verify", dest)
    assert checked.exit_code == 0 and "ok: " in checked.stdout, checked.output
    assert "format 2.1, id" in invoke("inspect", dest).stdout
    assert after.tokenizer_files == before.tokenizer_files
    digest = hashlib.sha256((dest / after.tokenizer_files[0].path).read_bytes()).hexdigest()
    assert digest == after.tokenizer_files[0].sha256
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    assert first_loss(dest, student) == first_loss(src, student)
    again = invoke(
        "convert",
        src,
        tmp_path / "v1-small",
        "--format-version",
        "1",
        "--shard-sequences",
        "2",
        "--quiet",
    )
    assert again.exit_code == 0 and "in format 1.2," in again.stdout, again.output
    refused = invoke("convert", src, dest, "--shard-sequences", "3")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    err = refused.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "another cache" in err, err
