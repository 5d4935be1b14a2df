"""The teacher pass on several processes: torchrun ranks (2 gloo processes on CPU) write the
single-process cache byte for byte; each rank's device and GPU share; ``--device-map``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torchrun_launch import run_cli

from logitcache.cli import main
from logitcache.core.errors import LogitcacheError
from logitcache.precompute import ranks
from logitcache.storage import CacheReader, Location, read_manifest

SEQ_LEN = 64
SHARD_SEQUENCES = 4
N_SHARDS = 7  # the fixture text corpus at SEQ_LEN: 28 sequences


def precompute_args(teacher: Path, data: Path, out: Path, *extra: object) -> list[str]:
    args = [
        "precompute",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--seq-len",
        SEQ_LEN,
        "--shard-sequences",
        SHARD_SEQUENCES,
        "--samples",
        16,
        *extra,
    ]
    return [str(a) for a in args]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def torchrun(nproc: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m logitcache.cli ARGS`` (a free port)."""
    return run_cli(args, nproc=nproc, timeout=timeout)


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "shards").iterdir())}


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_single_process_cache(tmp_path, tiny_teacher_dir, text_corpus):
    single = tmp_path / "single"
    result = invoke(*precompute_args(tiny_teacher_dir, text_corpus, single, "--device", "cpu"))
    assert result.exit_code == 0, result.stderr

    ranked = tmp_path / "torchrun"
    proc = torchrun(2, precompute_args(tiny_teacher_dir, text_corpus, ranked))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 merged after the barrier: the command returned with the cache complete.
    manifest = read_manifest(Location(str(ranked)))
    assert manifest.complete and len(manifest.shards) == N_SHARDS
    assert sorted(p.name for p in (ranked / "parts").iterdir()) == [
        "worker-00000-of-00002.json",
        "worker-00001-of-00002.json",
    ]
    assert proc.stderr.count("cache       ") == 1  # the summary, from rank 0 only
    assert not (ranked / "tokens").exists()  # rank 0 removed the shared token blocks

    assert shard_bytes(ranked) == shard_bytes(single)
    want = read_manifest(Location(str(single)))
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in want.shards]
    assert manifest.n_sequences_total == want.n_sequences_total
    for a, b in zip(CacheReader(single), CacheReader(ranked), strict=True):
        assert a.index == b.index
        for field in ("input_ids", "loss_mask", "ids", "counts", "n_entries"):
            assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), (a.index, field)
        assert a.tail_mass is b.tail_mass is None  # format 2, sampled: not stored
    verified = invoke("verify", ranked)
    assert verified.exit_code == 0, verified.stderr
    assert f"ok: {N_SHARDS} shards" in verified.stdout


@pytest.mark.slow
def test_torchrun_finishes_a_cache_begun_by_another_worker_count(
    tmp_path, tiny_teacher_dir, text_corpus
):
    """Workers 0 and 2 of 4 ran as job-array tasks (shards 0, 4 and 2, 6); 2 torchrun ranks
    finish the rest, all of it rank 1's (1, 3, 5): rank 0 is done first and gets the complete
    manifest only by waiting for rank 1 at the barrier."""
    single = tmp_path / "single"
    assert (
        invoke(*precompute_args(tiny_teacher_dir, text_corpus, single, "--device", "cpu")).exit_code
        == 0
    )
    out = tmp_path / "mixed"
    for index in (0, 2):
        task = invoke(
            *precompute_args(
                tiny_teacher_dir,
                text_corpus,
                out,
                "--device",
                "cpu",
                "--num-workers",
                4,
                "--worker-index",
                index,
            )
        )
        assert task.exit_code == 0, task.stderr
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert sorted(done) == [f"shard-{j:06d}.arrow" for j in (0, 2, 4, 6)]

    proc = torchrun(2, precompute_args(tiny_teacher_dir, text_corpus, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(Location(str(out))).complete
    assert proc.stderr.count("cache       ") == 1  # rank 0's summary of the complete cache
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in done} == done  # not redone
    assert shard_bytes(out) == shard_bytes(single)
    verified = invoke("verify", out)
    assert verified.exit_code == 0, verified.output


# ---------------------------------------------------------------------------------------
# Which worker this process is


def test_under_torchrun_flags_that_contradict_the_ranks_are_refused(
    monkeypatch, tmp_path, tiny_teacher_dir, text_corpus
):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks.resolve_worker(None, None) == (1, 2)
    assert ranks.resolve_worker(2, 1) == (1, 2)
    result = invoke(
        *precompute_args(tiny_teacher_dir, text_corpus, tmp_path / "c", "--num-workers", 4)
    )
    assert result.exit_code == 1
    assert "under torchrun the 2 ranks are the workers (this is rank 1)" in result.stderr
    assert not (tmp_path / "c").exists()


def test_a_job_array_task_names_its_index(monkeypatch, tmp_path, tiny_teacher_dir, text_corpus):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks.resolve_worker(None, None) == (0, 1)
    assert ranks.resolve_worker(8, 3) == (3, 8)
    result = invoke(
        *precompute_args(tiny_teacher_dir, text_corpus, tmp_path / "c", "--num-workers", 4)
    )
    assert result.exit_code == 1
    assert "--num-workers 4 needs --worker-index I (0..3)" in result.stderr


# ---------------------------------------------------------------------------------------
# Each rank's device (no GPU needed: CUDA's answers are stood in for)


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as local rank ``local`` of ``per_node`` torchrun processes on a node
    with ``gpus`` GPUs of 80 GB free each."""

    def make(local: int, per_node: int, gpus: int) -> None:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda g: (80 << 30, 96 << 30))

    return make


def test_each_rank_takes_its_own_gpu(torchrun_env):
    torchrun_env(local=3, per_node=8, gpus=8)
    assert ranks.rank_device("auto") == "cuda:3"
    assert ranks.rank_device("cuda") == "cuda:3"
    assert ranks.rank_device("cuda:5") == "cuda:5"  # an explicit device is kept
    assert ranks.rank_device("cpu") == "cpu"
    torchrun_env(local=2, per_node=4, gpus=2)
    with pytest.raises(LogitcacheError, match="local rank 2 has no GPU of its own"):
        ranks.rank_device("auto")


def test_without_torchrun_the_device_is_left_alone(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ranks.rank_device("auto") == "auto"
    assert ranks.device_map_memory("auto") is None


def test_device_map_spreads_each_rank_over_its_share_of_the_gpus(torchrun_env):
    torchrun_env(local=1, per_node=2, gpus=8)
    assert ranks.device_map_memory("auto") == {g: 80 << 30 for g in (4, 5, 6, 7)}
    torchrun_env(local=2, per_node=3, gpus=8)  # 8 // 3 = 2 GPUs each; GPUs 6-7 stay idle
    assert list(ranks.device_map_memory("sequential")) == [4, 5]
    torchrun_env(local=0, per_node=1, gpus=8)
    assert ranks.device_map_memory("auto") is None  # one process: all GPUs, as usual
    torchrun_env(local=0, per_node=2, gpus=0)
    assert ranks.device_map_memory("auto") is None  # CPU only: each rank loads its copy
    torchrun_env(local=0, per_node=4, gpus=2)
    with pytest.raises(LogitcacheError, match="4 processes per node needs at least 4 GPUs"):
        ranks.device_map_memory("auto")


# ---------------------------------------------------------------------------------------
# --device-map


def test_device_map_reaches_from_pretrained_and_inputs_go_to_the_embeddings(
    monkeypatch, tmp_path, tiny_teacher_dir, text_corpus, torchrun_env
):
    """The flag and this rank's GPU share reach ``from_pretrained``; the model is not moved
    afterwards, and the input ids go to the device of its input embeddings."""
    from transformers import AutoModelForCausalLM

    from logitcache import models

    torchrun_env(local=1, per_node=2, gpus=4)
    monkeypatch.setattr(models, "_require_accelerate", lambda device_map: None)
    real = AutoModelForCausalLM.from_pretrained
    calls, moved, fed = [], [], []

    def placed(name, **kw):
        calls.append(dict(kw))
        placement = {k: kw.pop(k) for k in ("device_map", "max_memory") if k in kw}
        model = real(name, **kw)  # on the CPU, standing in for the placed model
        model.to = lambda *a, **k: moved.append(a)
        forward = model.forward

        def spy(input_ids=None, **k):
            fed.append(input_ids.device)
            return forward(input_ids=input_ids, **k)

        model.forward = spy
        assert placement
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", placed)
    result = invoke(
        *precompute_args(
            tiny_teacher_dir, text_corpus, tmp_path / "c", "--device-map", "auto", "--quiet"
        )
    )
    assert result.exit_code == 0, result.stderr
    (kw,) = calls
    assert kw["device_map"] == "auto" and kw["max_memory"] == {2: 80 << 30, 3: 80 << 30}
    assert moved == [] and fed and set(fed) == {torch.device("cpu")}


def test_device_map_with_an_explicit_device_is_refused(tmp_path, tiny_teacher_dir, text_corpus):
    result = invoke(
        *precompute_args(
            tiny_teacher_dir,
            text_corpus,
            tmp_path / "c",
            "--device-map",
            "auto",
            "--device",
            "cuda:0",
        )
    )
    assert result.exit_code == 1
    assert "--device-map auto places the teacher itself: drop --device cuda:0" in result.stderr


def test_device_map_without_accelerate_says_what_to_install(
    monkeypatch, tmp_path, tiny_teacher_dir, text_corpus
):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    result = invoke(
        *precompute_args(tiny_teacher_dir, text_corpus, tmp_path / "c", "--device-map", "auto")
    )
    assert result.exit_code == 1
    assert "needs the accelerate package: pip install accelerate" in result.stderr


def test_device_map_auto_on_a_cpu_machine_writes_the_cpu_cache(
    tmp_path, tiny_teacher_dir, text_corpus
):
    """With accelerate installed and no GPU, ``--device-map auto`` loads onto the CPU and
    writes the same bytes as ``--device cpu``."""
    pytest.importorskip("accelerate")
    if torch.cuda.is_available():
        pytest.skip("compares with a CPU run: on a GPU machine auto places on the GPU")
    cpu, mapped = tmp_path / "cpu", tmp_path / "mapped"
    assert (
        invoke(*precompute_args(tiny_teacher_dir, text_corpus, cpu, "--device", "cpu")).exit_code
        == 0
    )
    result = invoke(*precompute_args(tiny_teacher_dir, text_corpus, mapped, "--device-map", "auto"))
    assert result.exit_code == 0, result.stderr
    assert shard_bytes(mapped) == shard_bytes(cpu)
