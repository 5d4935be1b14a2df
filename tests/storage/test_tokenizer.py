"""A cache carries its tokenizer (format 1.1): stored, listed with hashes, verified, copied,
used by ``train`` by default, exported by ``logitcache tokenizer``; older caches still read."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.core.identity import tokenizer_fingerprint, tokenizer_fingerprint_v1
from logitcache.storage import (
    CacheError,
    Manifest,
    ShardCorruptError,
    copy_cache,
    fetch_tokenizer,
    read_manifest,
    verify_cache,
)
from logitcache.storage.location import Location
from logitcache.storage.tokenizer_files import check_tokenizer_files


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_teacher_dir, text_corpus) -> Path:
    """A cache made from a teacher at ./teachercopy, which is then deleted."""
    root = tmp_path_factory.mktemp("made")
    teacher = root / "teachercopy"
    shutil.copytree(tiny_teacher_dir, teacher)
    result = invoke(
        "precompute",
        "--teacher",
        teacher,
        "--data",
        text_corpus,
        "--out",
        root / "cache",
        "--seq-len",
        "32",
        "--shard-sequences",
        "32",
        "--top-k",
        "4",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    shutil.rmtree(teacher)
    return root / "cache"


@pytest.fixture
def cache(made, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "home"))
    copy = tmp_path / "cache"
    shutil.copytree(made, copy, ignore=shutil.ignore_patterns(".locks"))
    return copy


def strip_tokenizer(cache: Path) -> None:
    """Make ``cache`` store no tokenizer files, as logitcache 0.1 wrote caches."""
    manifest = read_manifest(Location(cache))
    (cache / "manifest.json").write_text(replace(manifest, tokenizer_files=()).to_json())
    shutil.rmtree(cache / "tokenizer")


def test_precompute_stores_the_tokenizer(cache, tiny_tokenizer):
    raw = json.loads((cache / "manifest.json").read_text())
    assert (raw["format_version"], raw["format_minor"]) == (2, 1)  # 2.1: fingerprint_full
    names = sorted(f["path"] for f in raw["tokenizer_files"])
    assert "tokenizer/tokenizer.json" in names and "tokenizer/tokenizer_config.json" in names
    for entry in raw["tokenizer_files"]:
        assert (cache / entry["path"]).stat().st_size == entry["bytes"]
    assert raw["spec"]["tokenizer"]["name_or_path"].endswith("teachercopy")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(fetch_tokenizer(cache))
    assert tokenizer_fingerprint(loaded) == raw["spec"]["tokenizer"]["fingerprint_full"]
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tiny_tokenizer)
    assert tokenizer_fingerprint_v1(loaded) == raw["spec"]["tokenizer"]["fingerprint"]


def test_a_pulled_cache_trains_without_the_teacher(cache, student_config, tmp_path):
    """The issue's case: pull into another directory, teacher's directory gone, train."""
    pulled = tmp_path / "elsewhere" / "pulled"
    result = copy_cache(cache, pulled)
    assert result.manifest.tokenizer_files and not result.failed
    shutil.rmtree(cache)
    assert verify_cache(pulled)[1] == []
    run = invoke(
        "train",
        "--cache",
        pulled,
        "--student-config",
        student_config,
        "--out",
        tmp_path / "run",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--loader-workers",
        "0",
        "--quiet",
    )
    assert run.exit_code == 0, run.output
    done = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert max(m.get("step", 0) for m in done) == 2
    assert (tmp_path / "run" / "model" / "tokenizer.json").exists()
    out = invoke("tokenizer", pulled, tmp_path / "tok")
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(
        Path(f.path).name for f in result.manifest.tokenizer_files
    )
    assert "stored in the cache" in invoke("inspect", pulled).stdout


def test_an_old_cache_reads_and_says_how_to_add_its_tokenizer(
    cache, student_config, tiny_teacher_dir, tmp_path
):
    strip_tokenizer(cache)
    raw = json.loads((cache / "manifest.json").read_text())
    assert "tokenizer_files" not in raw  # as 0.1 wrote it
    assert verify_cache(cache)[1] == []
    shown = invoke("inspect", cache).stdout
    assert "not stored" in shown and f"logitcache tokenizer {cache} --add" in shown
    train = [
        "train",
        "--cache",
        cache,
        "--student-config",
        student_config,
        "--out",
        tmp_path / "r",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--loader-workers",
        "0",
        "--quiet",
    ]
    err = one_line_error(invoke(*train))  # the recorded ./teachercopy is gone
    assert "teachercopy" in err and "--tokenizer" in err and "--add" in err
    missing = one_line_error(invoke(*train, "--tokenizer", tmp_path / "nope"))
    assert "--tokenizer path" in missing and "nope" in missing
    added = invoke("tokenizer", cache, "--add", tiny_teacher_dir)
    assert added.exit_code == 0, added.output
    assert verify_cache(cache)[1] == []
    assert invoke(*train).exit_code == 0


def test_add_refuses_another_tokenizer(cache, tiny_tokenizer, text_corpus, tmp_path):
    strip_tokenizer(cache)
    other = tiny_tokenizer.train_new_from_iterator([text_corpus.read_text()], vocab_size=280)
    other.save_pretrained(tmp_path / "other")
    err = one_line_error(invoke("tokenizer", cache, "--add", tmp_path / "other"))
    assert "is not the one the cache was made with" in err
    assert not (cache / "tokenizer").exists()
    assert "tokenizer_files" not in (cache / "manifest.json").read_text()


def test_a_damaged_tokenizer_file_is_named(cache, tmp_path):
    target = cache / "tokenizer" / "tokenizer.json"
    target.write_bytes(target.read_bytes().replace(b"<|eos|>", b"<|EOS|>"))
    problems = verify_cache(cache)[1]
    assert len(problems) == 1 and "tokenizer/tokenizer.json" in problems[0]
    with pytest.raises(ShardCorruptError, match=r"tokenizer/tokenizer\.json fails its check"):
        fetch_tokenizer(cache, tmp_path / "out")
    result = invoke("verify", cache)
    assert result.exit_code == 1 and "tokenizer/tokenizer.json" in result.stderr


def test_only_listed_files_reach_the_loader(cache):
    """A file slipped into tokenizer/ (one naming remote code, say) is never copied out."""
    (cache / "tokenizer" / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")
    fetched = fetch_tokenizer(cache)
    assert "tokenization_evil.py" not in {p.name for p in fetched.iterdir()}
    assert fetch_tokenizer(cache) == fetched  # content-addressed: reused once verified


@pytest.mark.parametrize(
    "path",
    [
        "../tokenizer.json",
        "tokenizer/../../etc/passwd",
        "/etc/passwd",
        "shards/shard-000000.arrow",
        "tokenizer/sub/x.json",
        "tokenizer\\x.json",
        "s3://bucket/tokenizer.json",
    ],
)
def test_a_tokenizer_path_outside_the_cache_is_refused(cache, path):
    raw = json.loads((cache / "manifest.json").read_text())
    raw["tokenizer_files"][0]["path"] = path
    with pytest.raises(CacheError, match=r"tokenizer file #0|outside the cache"):
        Manifest.from_json(json.dumps(raw))
    (cache / "manifest.json").write_text(json.dumps(raw))
    assert one_line_error(invoke("inspect", cache))


def test_newer_minor_and_unknown_optional_keys_read(cache):
    """Same major version: a minor this reader does not know adds keys it ignores."""
    raw = json.loads((cache / "manifest.json").read_text())
    raw["format_minor"], raw["something_new"] = 7, {"x": 1}
    manifest = Manifest.from_json(json.dumps(raw))
    assert manifest.tokenizer_files and len(manifest.shards) == len(raw["shards"])


class SavedText:
    """A tokenizer stand-in whose saved file says ``text``: save_pretrained output can differ
    between processes and library versions (a byte of tokenizer_config.json did, in tests)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer.json").write_text(self.text)


def test_a_resumed_writer_keeps_the_stored_tokenizer(tmp_path):
    from storage_synth import make_records, make_spec

    from logitcache.storage import CacheWriter

    spec, path = make_spec(shard_sequences=3), tmp_path / "c"
    records = make_records(spec, 0, 6)
    with CacheWriter(path, spec) as writer:
        writer.attach_tokenizer(SavedText("first"))
        writer.write_shard(0, records[:3])
    with CacheWriter(path, spec) as writer:  # resumed by a process that saves other bytes
        writer.attach_tokenizer(SavedText("second"))
        writer.write_shard(1, records[3:])
        writer.finish(6)
    assert (path / "tokenizer" / "tokenizer.json").read_text() == "first"
    assert check_tokenizer_files(Location(path), read_manifest(Location(path))) == []


def test_parallel_workers_that_save_different_bytes_merge_into_a_verified_cache(tmp_path):
    from storage_synth import make_records, make_spec

    from logitcache.storage import CacheWriter

    spec, path = make_spec(shard_sequences=3), tmp_path / "c"
    records = make_records(spec, 0, 6)
    writers = [CacheWriter(path, spec, worker=w, num_workers=2) for w in (0, 1)]  # at once
    for worker in (1, 0):  # worker 1 saves first; worker 0's files replace its copies
        writers[worker].attach_tokenizer(SavedText(f"worker {worker}"))
        writers[worker].write_shard(worker, records[3 * worker : 3 * worker + 3])
    # shard 0 is listed, so worker 1 merges; the last part read (its own) lists other bytes
    merged = writers[1].finish(6)
    for writer in writers:
        writer.close()
    assert merged is not None and merged.complete
    assert (path / "tokenizer" / "tokenizer.json").read_text() == "worker 0"
    assert check_tokenizer_files(Location(path), read_manifest(Location(path))) == []


def test_a_stored_tokenizer_with_another_fingerprint_is_refused_on_load(
    cache, tiny_tokenizer, text_corpus, student_config, tmp_path
):
    """Files whose hashes the manifest vouches for, but of another tokenizer (an edited cache)."""
    from logitcache.storage.tokenizer_files import write_tokenizer_files

    other = tiny_tokenizer.train_new_from_iterator([text_corpus.read_text()], vocab_size=280)
    manifest = read_manifest(Location(cache))
    shutil.rmtree(cache / "tokenizer")
    files = write_tokenizer_files(Location(cache), other)
    (cache / "manifest.json").write_text(replace(manifest, tokenizer_files=files).to_json())
    # the hashes agree; the fingerprint does not: verify, tokenizer and train all refuse
    assert "is not the one the cache was made with" in " ".join(verify_cache(cache)[1])
    err = one_line_error(invoke("tokenizer", cache, tmp_path / "tok"))
    assert "is not the one the cache was made with" in err and not (tmp_path / "tok").exists()
    run = invoke(
        "train",
        "--cache",
        cache,
        "--student-config",
        student_config,
        "--out",
        tmp_path / "r",
        "--steps",
        "1",
        "--loader-workers",
        "0",
        "--quiet",
    )
    assert "is not the one the cache was made with" in one_line_error(run)


# -- the fingerprint rules -------------------------------------------------------------------
MAIN_FINGERPRINT = "6c2144ab8bdfc8e41a4de1d4c067939470a34fdcc4df25a2441d98017f4bc3b4"
"""What logitcache 0.2 (rule 1) gave conftest's tokenizer; caches it made record this."""


def test_rule_1_is_what_older_caches_recorded(tiny_tokenizer):
    assert tokenizer_fingerprint_v1(tiny_tokenizer) == MAIN_FINGERPRINT
    assert tokenizer_fingerprint(tiny_tokenizer) != MAIN_FINGERPRINT


@pytest.mark.parametrize(
    "part",
    [
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "byte_fallback",
        "dropout",
        "added_flag",
        "chat_template",
        "cleanup",
    ],
)
def test_rule_2_sees_what_rule_1_did_not(tiny_tokenizer, part):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    if part == "normalizer":
        backend.normalizer = normalizers.Lowercase()
    elif part == "pre_tokenizer":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
        )
    elif part == "post_processor":
        backend.post_processor = processors.TemplateProcessing(
            single="<|eos|> $A", special_tokens=[("<|eos|>", 0)]
        )
    elif part == "decoder":
        backend.decoder = decoders.Replace("e", "3")
    elif part in ("byte_fallback", "dropout", "added_flag"):
        data = json.loads(backend.to_str())
        if part == "added_flag":
            data["added_tokens"][2]["lstrip"] = True
        else:
            data["model"][part] = True if part == "byte_fallback" else 0.5
        backend = Tokenizer.from_str(json.dumps(data))
    forged = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|eos|>", pad_token="<|pad|>"
    )
    forged.chat_template = tiny_tokenizer.chat_template
    forged.clean_up_tokenization_spaces = tiny_tokenizer.clean_up_tokenization_spaces
    if part == "chat_template":
        forged.chat_template = "{{ messages[0]['content'] }}"
    elif part == "cleanup":
        forged.clean_up_tokenization_spaces = not tiny_tokenizer.clean_up_tokenization_spaces
    if part not in ("chat_template", "cleanup", "dropout"):  # dropout: encode is random
        assert tokenizer_fingerprint_v1(forged) == tokenizer_fingerprint_v1(tiny_tokenizer)
    assert tokenizer_fingerprint(forged) != tokenizer_fingerprint(tiny_tokenizer)


@pytest.fixture(scope="module")
def old_cache(tmp_path_factory, tiny_teacher_dir, text_corpus) -> Path:
    """A cache whose tokenizer record is what logitcache 0.2 wrote: rule 1 only."""
    import logitcache.precompute.config as precompute_config

    def rule_1_identity(tokenizer, name):
        return {
            "fingerprint": tokenizer_fingerprint_v1(tokenizer),
            "name_or_path": name,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
        }

    root = tmp_path_factory.mktemp("old")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precompute_config, "tokenizer_identity", rule_1_identity)
        result = invoke(
            "precompute",
            "--teacher",
            tiny_teacher_dir,
            "--data",
            text_corpus,
            "--out",
            root / "cache",
            "--seq-len",
            "32",
            "--shard-sequences",
            "32",
            "--top-k",
            "4",
            "--device",
            "cpu",
            "--quiet",
        )
    assert result.exit_code == 0, result.output
    return root / "cache"


def test_an_old_fingerprint_cache_still_reads_verifies_and_trains(
    old_cache, student_config, tmp_path, monkeypatch
):
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "home"))
    raw = json.loads((old_cache / "manifest.json").read_text())
    assert raw["spec"]["tokenizer"]["fingerprint"] == MAIN_FINGERPRINT
    assert "format_minor" not in raw and "fingerprint_full" not in raw["spec"]["tokenizer"]
    assert verify_cache(old_cache)[1] == []
    run = invoke(
        "train",
        "--cache",
        old_cache,
        "--student-config",
        student_config,
        "--out",
        tmp_path / "run",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--loader-workers",
        "0",
        "--quiet",
    )
    assert run.exit_code == 0, run.output
    assert invoke("tokenizer", old_cache, tmp_path / "tok").exit_code == 0


def test_an_old_fingerprint_cache_with_another_vocabulary_is_refused(old_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(old_cache, cache)
    path = cache / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))
    raw = json.loads((cache / "manifest.json").read_text())
    entry = next(f for f in raw["tokenizer_files"] if f["path"] == "tokenizer/tokenizer.json")
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (cache / "manifest.json").write_text(json.dumps(raw))
    (problem,) = verify_cache(cache)[1]
    assert "is not the one the cache was made with" in problem and "fingerprint " in problem


# -- a pretrained student without a tokenizer; a student with too few rows ------------------
def save_student(directory: Path, student_config: Path, vocab_size: int | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(student_config.read_text())
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    model_type = config.pop("model_type")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).save_pretrained(
        directory
    )
    return directory


def test_a_pretrained_student_without_tokenizer_files_gets_the_caches(
    cache, student_config, tmp_path
):
    student = save_student(tmp_path / "student", student_config)
    run = invoke(
        "train",
        "--cache",
        cache,
        "--student",
        student,
        "--out",
        tmp_path / "run",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--loader-workers",
        "0",
    )
    assert run.exit_code == 0, run.output
    assert "has no tokenizer files: it gets the cache's" in run.output
    assert (tmp_path / "run" / "model" / "tokenizer.json").exists()
    # or put the cache's tokenizer beside the model, once: a model directory is fine
    assert invoke("tokenizer", cache, student).exit_code == 0
    assert invoke("tokenizer", cache, student).exit_code == 0  # the same files again
    (student / "tokenizer_config.json").write_text("{}")
    err = one_line_error(invoke("tokenizer", cache, student))
    assert "already holds other tokenizer_config.json" in err


def test_a_student_with_fewer_rows_than_the_tokenizer_is_refused_before_training(
    cache, student_config, tmp_path
):
    student = save_student(tmp_path / "student", student_config, vocab_size=200)
    run = invoke(
        "train",
        "--cache",
        cache,
        "--student",
        student,
        "--out",
        tmp_path / "run",
        "--steps",
        "1",
        "--loader-workers",
        "0",
        "--quiet",
    )
    err = one_line_error(run)
    assert "200 vocabulary rows" in err and "300 tokens" in err and "vocab_size" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_loss_names_the_sizes_when_ids_are_beyond_the_students_rows(tiny_teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache import DistillationLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    model.resize_token_embeddings(200)
    ids = torch.tensor([[5, 250, 7, 9]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "teacher_ids": torch.zeros(1, 4, 2, dtype=torch.long),
        "teacher_probs": torch.full((1, 4, 2), 0.5),
        "teacher_valid": torch.ones(1, 4, 2, dtype=torch.bool),
        "teacher_tail": torch.zeros(1, 4),
    }
    with pytest.raises(ValueError, match="token id 250 but the student has 200 vocabulary rows"):
        DistillationLoss()(batch, model=model)


def test_a_student_whose_tokenizer_files_do_not_load_is_told_what_to_do(
    cache, student_config, tmp_path
):
    student = save_student(tmp_path / "student", student_config)
    (student / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    args = ["--student", student, "--out", tmp_path / "run", "--steps", "1", "--quiet"]
    err = one_line_error(invoke("train", "--cache", cache, "--loader-workers", "0", *args))
    assert "cannot load tokenizer" in err and "give --tokenizer" in err
    assert "`logitcache tokenizer CACHE DIR`" in err


def test_stored_tokenizer_bytes_do_not_depend_on_how_it_was_loaded(tmp_path, tiny_tokenizer):
    """transformers saves load-time options (``local_files_only``, which follows
    $HF_HUB_OFFLINE) into tokenizer_config.json: the cache stores none of them, so the same
    teacher writes the same cache online and offline."""
    from transformers import AutoTokenizer

    from logitcache.storage.location import Location
    from logitcache.storage.tokenizer_files import write_tokenizer_files

    source = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(source)
    stored = {}
    for offline in (False, True):
        tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        out = tmp_path / f"cache-{offline}"
        write_tokenizer_files(Location(out), tok)
        stored[offline] = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
    assert stored[False] == stored[True]
    config = json.loads(stored[True]["tokenizer_config.json"])
    assert "local_files_only" not in config and "is_local" not in config


def test_a_deeply_nested_tokenizer_config_is_refused_in_one_line():
    """A stored tokenizer_config.json of 100k ``[``: json.loads recurses once per level; the
    RecursionError was a traceback, it is a TokenizerError naming the file."""
    from logitcache.storage.errors import TokenizerError
    from logitcache.storage.tokenizer_files import refuse_code

    with pytest.raises(TokenizerError, match=r"tokenizer/tokenizer_config\.json is not valid JSON"):
        refuse_code("tokenizer/tokenizer_config.json", b"[" * 100_000, "the tokenizer stored")
