"""``logitcache train --cross-tokenizer``: a student of another tokenizer trains from a
cache end to end, resumes exactly, and reports bits per byte; without the flag the same
student is refused as before."""

from __future__ import annotations

import json
import math

import pytest
import torch
from crosstok_tokenizers import build_sentencepiece_tokenizer


@pytest.fixture(scope="module")
def sp_student(tmp_path_factory, student_config):
    """A from-scratch student config sized to the SentencePiece-style tokenizer, and that
    tokenizer saved to a directory."""
    tokenizer = build_sentencepiece_tokenizer()
    root = tmp_path_factory.mktemp("sp-student")
    tokenizer.save_pretrained(root / "tokenizer")
    config = {**json.loads(student_config.read_text()), "vocab_size": len(tokenizer)}
    config["max_position_embeddings"] = 128
    (root / "student.json").write_text(json.dumps(config))
    return root


def cross_args(train_args, cache, out, student, **flags):
    flags = {"cross_tokenizer": "exact", "steps": 4, **flags}
    return train_args(
        cache,
        out,
        student_config=student / "student.json",
        tokenizer=student / "tokenizer",
        **flags,
    )


@pytest.mark.parametrize("method", ["exact", "prefix", "chain"])
def test_trains_and_reports_bits_per_byte(
    cli, train_args, metrics, topk_cache, sp_student, tmp_path, method
):
    out = tmp_path / "run"
    result = cli(
        cross_args(
            train_args, topk_cache, out, sp_student, cross_tokenizer=method, student_seq_len=48
        )
    )
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    evals = [r for r in rows if "eval_ce" in r]
    assert evals and evals[-1]["eval_bits_per_byte"] > 0 and evals[-1]["eval_bytes"] > 0
    assert "eval_kl" in evals[-1]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["cross_tokenizer"] == method and saved["fingerprint"]["cross_tokenizer"] == method
    # `logitcache evaluate RUN` measures the final model as the run's last evaluation did
    result = cli(["evaluate", out, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    for key in ("eval_ce", "eval_kl", "eval_bits_per_byte", "eval_bytes", "eval_aligned_share"):
        assert again[key] == pytest.approx(evals[-1][key], rel=1e-5), key
    whole = cli(["evaluate", out, "--cache", topk_cache, "--max-sequences", "20"])
    assert whole.exit_code == 0 and "20 sequences" in whole.stdout and "bits/byte" in whole.stdout


def test_another_tokenizer_without_the_flag_is_refused(
    cli, train_args, topk_cache, sp_student, tmp_path
):
    """By accident (no --cross-tokenizer) a student of another tokenizer fails as before,
    and the message names the flag that makes it work."""
    from test_cli_train import refused

    args = cross_args(train_args, topk_cache, tmp_path / "run", sp_student, cross_tokenizer=None)
    refused(cli(args), "the student's tokenizer", "--extended-vocab", "--cross-tokenizer chain")
    args = cross_args(
        train_args,
        topk_cache,
        tmp_path / "run",
        sp_student,
        cross_tokenizer=None,
        student_seq_len=40,
    )
    refused(cli(args), "--student-seq-len needs --cross-tokenizer")


def test_resume_is_exact(
    monkeypatch, cli, train_args, metrics, sampled_cache, sp_student, tmp_path
):
    """Killed after step 3 (checkpoint at 2), --resume ends with the weights, losses and
    evaluations of an uninterrupted run (a DataLoader worker converts the records)."""
    from test_loop import Crash, crash_after, in_process, same_run

    from logitcache.train import train

    def flags(out):
        return cross_args(
            train_args,
            sampled_cache,
            out,
            sp_student,
            cross_tokenizer="chain",
            steps=5,
            save_every=2,
            eval_every=2,
            loader_workers=1,
            batch_size=3,
        )

    ref, out = tmp_path / "reference", tmp_path / "run"
    assert cli(flags(ref)).exit_code == 0
    crash_after(monkeypatch, 3)
    with pytest.raises(Crash):
        train(in_process(flags(out)))
    monkeypatch.undo()
    result = cli([*flags(out), "--resume"])
    assert result.exit_code == 0, result.output
    same_run(ref, out, metrics)
    assert all("eval_bits_per_byte" in r for r in metrics(out) if "eval_ce" in r)
    refused_change = cli([*flags(out), "--resume", "--steps", "6", "--cross-tokenizer", "exact"])
    assert refused_change.exit_code == 1 and "cross_tokenizer" in refused_change.stderr


def test_hf_trainer_and_evaluate_with_another_tokenizer(topk_cache, sp_student, tmp_path, metrics):
    """DistillationTrainer on a CacheDataset with cross_tokenizer: its first loss is
    `logitcache train`'s; evaluate() of the trained student gives bits per byte."""
    from test_hf import Recorder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from logitcache.train import CacheDataset, DistillationLoss, TrainConfig, evaluate, train

    config = json.loads((sp_student / "student.json").read_text())
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    student = tmp_path / "student"
    model.save_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(sp_student / "tokenizer")
    tokenizer.save_pretrained(student)
    out = tmp_path / "cli"
    train(
        TrainConfig(
            cache=str(topk_cache),
            out=str(out),
            student=str(student),
            steps=1,
            batch_size=4,
            eval_fraction=0.2,
            loader_workers=0,
            quiet=True,
            cross_tokenizer="exact",
        )
    )
    (first,) = [r["loss"] for r in metrics(out) if "loss" in r]
    data = CacheDataset(
        str(topk_cache), eval_fraction=0.2, cross_tokenizer="exact", student_tokenizer=tokenizer
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    hf = Recorder(
        model=AutoModelForCausalLM.from_pretrained(student),
        args=args,
        train_dataset=data,
        distillation_loss=DistillationLoss(),
    )
    hf.train()
    assert hf.losses[0] == pytest.approx(first, rel=1e-6)
    held = CacheDataset(
        str(topk_cache),
        split="eval",
        eval_fraction=0.2,
        cross_tokenizer="exact",
        student_tokenizer=tokenizer,
    )
    ev = evaluate(hf.model, held)
    assert ev["eval_bits_per_byte"] == pytest.approx(
        ev["eval_ce"] * ev["eval_positions"] / math.log(2) / ev["eval_bytes"]
    )
    assert 0.5 < ev["eval_aligned_share"] <= 1 and 0 < ev["eval_exact_mass_share"] <= 1
    stats = data.cross.stats.as_dict()
    assert 0.5 < stats["aligned_share"] <= 1 and 0 < stats["exact_support_share"] <= 1


def test_cross_mode_with_the_caches_own_tokenizer_is_plain_distillation(
    cli, train_args, metrics, topk_cache, teacher_dir, student_config, tiny_tokenizer, tmp_path
):
    """Every position aligned and every id exact: the same losses and evaluations as the
    same-tokenizer path; its bits per byte count the bytes of the predicted tokens."""
    runs = {}
    for mode in ("off", "exact"):
        out = tmp_path / mode
        args = train_args(
            topk_cache,
            out,
            student_config=student_config,
            tokenizer=teacher_dir,
            steps=3,
            eval_every=3,
            cross_tokenizer=mode,
        )
        assert cli(args).exit_code == 0
        runs[mode] = metrics(out)
    for a, b in zip(runs["off"], runs["exact"]):
        for key in ("loss", "eval_ce", "eval_kl", "eval_bits_per_byte"):
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    result = cli(["evaluate", tmp_path / "off", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["eval_bits_per_byte"] == pytest.approx(runs["off"][-1]["eval_bits_per_byte"])
    assert "eval_aligned_share" not in again
    from logitcache.train import CacheDataset

    held = CacheDataset(str(topk_cache), split="eval", eval_fraction=0.2)
    labels = [int(t) for i in range(len(held)) for t in held[i]["labels"] if t != -100]
    special = set(tiny_tokenizer.all_special_ids)
    spelled = [
        tiny_tokenizer.convert_tokens_to_string([tiny_tokenizer.convert_ids_to_tokens(t)])
        for t in labels
        if t not in special
    ]
    assert runs["off"][-1]["eval_bytes"] == sum(len(s.encode()) for s in spelled)


def test_evaluate_refuses_what_is_no_finished_run(cli, tmp_path):
    from test_cli_train import refused

    refused(cli(["evaluate", tmp_path]), "is not a training run")
    (tmp_path / "train_config.json").write_text("[1, 2]")
    refused(cli(["evaluate", tmp_path]), "is not a JSON object")
    (tmp_path / "train_config.json").write_text('{"cache": "c", "out": "o", "lr": -1}')
    refused(cli(["evaluate", tmp_path]), "--lr must be > 0")
    (tmp_path / "train_config.json").write_text('{"cache": "c", "out": "o"}')
    refused(cli(["evaluate", tmp_path]), "holds no final model")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_as_one(
    cli, train_args, metrics, topk_cache, sp_student, tmp_path, fsdp
):
    """DDP or FSDP (torchrun, 2 gloo processes, a DataLoader worker each) trains a student
    of another tokenizer as one process with the same global batch does: the same losses,
    evaluations (bits per byte included) and weights."""
    from elastic import same_run, torchrun

    def flags(out, nproc):
        return cross_args(
            train_args,
            topk_cache,
            out,
            sp_student,
            cross_tokenizer="chain",
            student_seq_len=48,
            steps=6,
            batch_size=2,
            grad_accum=2 // nproc,
            schedule="constant",
            eval_every=3,
            eval_fraction=0.1,
            loader_workers=1,
        )

    one, two = tmp_path / "one", tmp_path / "two"
    result = cli(flags(one, 1))
    assert result.exit_code == 0, result.output
    torchrun([*flags(two, 2), *(["--fsdp"] if fsdp else [])])
    saved = json.loads((two / "train_config.json").read_text())
    assert saved["world_size"] == 2 and bool(saved["fsdp"]) == fsdp
    same_run(one, two, metrics, close=lambda x, y: y == pytest.approx(x, rel=1e-4))
    bpb = [
        (r["eval_bits_per_byte"], s["eval_bits_per_byte"])
        for r, s in zip(metrics(one), metrics(two))
        if "eval_ce" in r
    ]
    assert bpb and all(y == pytest.approx(x, rel=1e-4) for x, y in bpb)


def test_an_eval_cache_is_retokenized_too(
    cli, train_args, metrics, topk_cache, sampled_cache, sp_student, tmp_path
):
    """--eval-cache (another cache of the same teacher tokenizer) is read as the student's
    records too: its evaluation reports bits per byte and the share of positions aligned,
    the numbers `logitcache evaluate RUN --cache` gives for the same rows."""
    out = tmp_path / "run"
    args = cross_args(
        train_args,
        sampled_cache,
        out,
        sp_student,
        cross_tokenizer="chain",
        student_seq_len=48,
        steps=2,
        eval_cache=topk_cache,
    )
    result = cli(args)
    assert result.exit_code == 0, result.output
    final = [r for r in metrics(out) if "eval_ce" in r][-1]
    assert final["eval_bits_per_byte"] > 0 and 0 < final["eval_aligned_share"] <= 1
    again = cli(["evaluate", out, "--json", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["eval_bits_per_byte"] == pytest.approx(
        final["eval_bits_per_byte"], rel=1e-5
    )
    whole = cli(["evaluate", out, "--cache", topk_cache, "--json", "--device", "cpu"])
    assert json.loads(whole.stdout)["eval_positions"] == final["eval_positions"]  # all of it


def test_mixed_caches_train_a_student_of_another_tokenizer(
    cli, train_args, metrics, topk_cache, sampled_cache, sp_student, tmp_path
):
    """Two caches of one teacher tokenizer (top-k and sampled) mixed into one stream: both
    are retokenized for the student, and a checkpoint resumes."""
    out = tmp_path / "run"
    args = cross_args(
        train_args, topk_cache, out, sp_student, cross_tokenizer="chain", student_seq_len=48
    )
    args += ["--cache", str(sampled_cache), "--cache-weights", "1,1", "--save-every", "2"]
    result = cli(args)
    assert result.exit_code == 0, result.output
    assert len([r for r in metrics(out) if "loss" in r]) == 4
    result = cli(
        [
            *args[: args.index("--steps")],
            "--steps",
            "5",
            *args[args.index("--steps") + 2 :],
            "--resume",
        ]
    )
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]
