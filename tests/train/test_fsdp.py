"""``--fsdp``, ``--gradient-checkpointing`` and ``--optimizer``: the same numbers as DDP and
gradient accumulation, sharded checkpoints that resume on another world size, and the
memory arithmetic.

The runs follow tests/train/test_distributed_train.py: global batch 4 everywhere (2 processes
x batch 2, or 1 process x batch 2 x grad-accum 2), 16 steps at a constant learning rate,
epoch 0 ending at step 13 on one sequence (rank 1's micro-batch there is empty, which FSDP
must still run through every layer). The first run stops at step 8, the resumed one goes on
to 16; both are compared with one uninterrupted process without FSDP, step by step.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from elastic import FIRST, STEPS, same_run, torchrun
from torchrun_launch import run_torchrun

from logitcache.core.errors import LogitcacheError


@pytest.mark.slow
def test_fsdp_on_two_processes_resumes_on_one(cli, flags, metrics, reference, tmp_path):
    out = tmp_path / "run"
    torchrun([*flags(out, nproc=2, steps=FIRST), "--fsdp"])
    checkpoint = out / "checkpoints" / "step-0000008"
    names = {p.name for p in checkpoint.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt", "state.json"} <= names
    assert "model.safetensors" not in names  # each rank wrote only its shards
    assert json.loads((checkpoint / "state.json").read_text())["format"] == "dcp"
    # Every weight and AdamW moment was saved as 2 chunks, one per rank's file: the halves
    # of dim 0 (the embedding's 300 rows: 150 each) that the ranks held.
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # our own test's file
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
    embedding = tensors["model.model.embed_tokens.weight"]
    assert sorted((c.offsets[0], c.sizes[0]) for c in embedding.chunks) == [(0, 150), (150, 150)]
    for key in ("model.model.embed_tokens.weight", "optimizer.state.lm_head.weight.exp_avg"):
        files = {
            metadata.storage_data[i].relative_path for i in metadata.storage_data if i.fqn == key
        }
        assert files == {"__0_0.distcp", "__1_0.distcp"}, (key, files)

    result = cli([*flags(out, nproc=1, steps=STEPS), "--fsdp", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 1
    same_run(reference, out, metrics, close=lambda x, y: abs(x - y) <= 1e-5)


@pytest.mark.slow
def test_fsdp_on_one_process_resumes_on_two(cli, flags, metrics, reference, tmp_path):
    """Steps 9-16 on 2 ranks, across the epoch boundary and its empty micro-batch."""
    out = tmp_path / "run"
    result = cli([*flags(out, nproc=1, steps=FIRST), "--fsdp"])
    assert result.exit_code == 0, result.output
    torchrun([*flags(out, nproc=2, steps=STEPS), "--fsdp", "--resume"])
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    same_run(reference, out, metrics, close=lambda x, y: abs(x - y) <= 1e-5)


SPY = """
import json, os, sys
import logitcache.train.preflight as loop  # where the run loads its student
from logitcache.cli import main

load_student = loop.load_student

def spy(*args, **kwargs):  # what each rank's student is built as, before sharding
    model, tokenizer, name = load_student(*args, **kwargs)
    params = list(model.parameters())
    held = sum(p.numel() * p.element_size() for p in params if not p.is_meta)
    record = {"devices": sorted({p.device.type for p in params}), "bytes": held}
    with open(os.path.join(sys.argv[1], "rank-" + os.environ["RANK"] + ".json"), "w") as fh:
        json.dump(record, fh)
    return model, tokenizer, name

loop.load_student = spy
main(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("student", ["tied", "pretrained"])
def test_fsdp_builds_the_student_whole_on_rank_0_only(
    cli, train_args, topk_cache, metrics, student_config, teacher_dir, tmp_path, student
):
    """Rank 1 builds its student on the meta device (no weights in memory) and gets its
    shards, buffers (rotary inv_freq) and RNG state from rank 0: the run equals one
    process without FSDP, tied weights saved once. A from-scratch student with tied
    embeddings and gradient checkpointing, and a pretrained one (from_pretrained)."""
    if student == "tied":
        config = {**json.loads(student_config.read_text()), "tie_word_embeddings": True}
        (tmp_path / "tied.json").write_text(json.dumps(config))
        extra = {
            "student_config": tmp_path / "tied.json",
            "gradient_checkpointing": True,
            "tokenizer": teacher_dir,
        }
    else:
        extra = {"student": teacher_dir}

    def flags(out, nproc, steps, **extra):  # as the fixture's, but any student
        return train_args(
            topk_cache,
            out,
            steps=steps,
            batch_size=2,
            grad_accum=2 // nproc,
            eval_fraction=0.1,
            schedule="constant",
            eval_every=2,
            save_every=2,
            **extra,
        )

    one, two, spy = tmp_path / "one", tmp_path / "two", tmp_path / "spy"
    result = cli(flags(one, nproc=1, steps=4, **extra))
    assert result.exit_code == 0, result.output
    spy.mkdir()
    (tmp_path / "spy.py").write_text(SPY)
    two_args = [*flags(two, nproc=2, steps=4, **extra), "--fsdp"]
    proc = run_torchrun(tmp_path / "spy.py", spy, *two_args, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((spy / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["devices"] == ["cpu"] and ranks[0]["bytes"] > 50_000, ranks
    assert ranks[1] == {"devices": ["meta"], "bytes": 0}, ranks
    same_run(one, two, metrics, close=lambda x, y: abs(x - y) <= 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_meta_student_has_rank_0s_architecture_and_dtype(
    student_config, teacher_dir, topk_cache, tmp_path, dtype
):
    """The ranks that build on meta build what rank 0 builds: the same parameter names,
    shapes and dtypes (a config's own dtype included), from a config or a pretrained model."""
    from logitcache.storage import CacheReader
    from logitcache.train.student import load_student

    config = {**json.loads(student_config.read_text()), "dtype": dtype}
    (tmp_path / "student.json").write_text(json.dumps(config))
    spec = CacheReader(str(topk_cache)).spec
    for given in (
        {"student_config": str(tmp_path / "student.json")},
        {"student": str(teacher_dir)},
    ):
        args = (given.get("student"), given.get("student_config"), str(teacher_dir))
        built = [load_student(*args, spec=spec, seed=0, meta=meta)[0] for meta in (False, True)]
        whole, meta = ({n: (p.shape, p.dtype) for n, p in m.named_parameters()} for m in built)
        assert whole == meta and all(p.is_meta for p in built[1].parameters())


def test_switching_between_ddp_and_fsdp_on_resume_is_refused(cli, flags, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = cli([*flags(out, nproc=1, steps=STEPS + 1), "--fsdp", "--resume"])
    assert result.exit_code == 1
    assert "settings differ from the run that wrote it: fsdp (None -> True)" in result.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_sharded_checkpoint_with_foreign_metadata_is_refused_unread(tmp_path, monkeypatch):
    """DCP pickles its .metadata; ours is read by an unpickler that knows only DCP's
    records, so a checkpoint whose metadata would run code is refused and runs nothing."""
    from logitcache.train.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "step-0000001"
    path.mkdir()
    state = {
        "format": "dcp",
        "progress": {"step": 1, "epoch": 0, "consumed": 4, "tokens": 8},
        "config": {},
    }
    (path / "state.json").write_text(json.dumps(state))
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    model = torch.nn.Linear(4, 4)
    with pytest.raises(LogitcacheError, match=r"\.metadata: UnpicklingError: .* refused unread"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "PWNED").exists()


GC_SCRIPT = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from logitcache.bench.peak import PeakRSS
from logitcache.train.sharding import enable_gradient_checkpointing

torch.set_num_threads(1)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
ids = torch.randint(0, 256, (8, 256), generator=torch.Generator().manual_seed(0))
out = {}
for gc in (False, True, False):  # the first run warms up the allocator and kernels
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if gc:
        enable_gradient_checkpointing(model)
    rss = PeakRSS()
    rss.start()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    out[str(gc)] = {"loss": loss.item(), "peak": rss.added(), "grad": grads[:4096].tolist()}
    del model, loss, grads
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux RSS peaks")
def test_gradient_checkpointing_keeps_the_loss_and_lowers_peak_memory(tmp_path):
    """4 layers of width 64 on 8 x 256 tokens: activations (~6 KB per token and layer)
    dwarf the 0.2M parameters. Peaks are the process's RSS high-water mark over a forward
    and backward, freed blocks returned to the system (MALLOC_MMAP_THRESHOLD_)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", GC_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, checkpointed = runs["False"], runs["True"]
    assert abs(plain["loss"] - checkpointed["loss"]) <= 1e-6
    assert torch.allclose(
        torch.tensor(plain["grad"]), torch.tensor(checkpointed["grad"]), rtol=1e-5, atol=1e-7
    )
    assert checkpointed["peak"] < 0.6 * plain["peak"], runs


def test_adamw8bit_without_torchao_says_how_to_get_it(monkeypatch):
    from logitcache.train.optim import make_optimizer

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(LogitcacheError, match="--optimizer adamw8bit needs torchao"):
        make_optimizer(torch.nn.Linear(4, 4), "adamw8bit", 1e-3, 0.1)


@pytest.mark.slow
def test_adamw8bit_state_survives_a_checkpoint(tmp_path):
    """torchao's 8-bit moments (a tensor subclass) go through optimizer.pt and come back
    through ``weights_only`` loading, equal."""
    pytest.importorskip("torchao.optim")
    from logitcache.train.checkpoint import TrainingProgress, load_checkpoint, save_checkpoint
    from logitcache.train.optim import make_optimizer, optimizer_state_classes, set_lr

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 64))
        return model, make_optimizer(model, "adamw8bit", 1e-3, 0.1)

    model, optimizer = make()
    model(torch.randn(8, 128)).square().sum().backward()
    set_lr(optimizer, 5e-4)  # as the loop's schedule does each step (torchao: a tensor lr)
    optimizer.step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(5e-4)
    moment = optimizer.state[model[0].weight]["exp_avg"]
    assert type(moment).__name__ == "OptimState8bit"  # 32,768 values: quantized
    save_checkpoint(str(tmp_path), model, optimizer, TrainingProgress(step=1), {}, keep=1)

    fresh, fresh_optimizer = make()
    load_checkpoint(
        tmp_path / "checkpoints" / "step-0000001",
        fresh,
        fresh_optimizer,
        state_classes=optimizer_state_classes("adamw8bit"),
    )
    loaded = fresh_optimizer.state[fresh[0].weight]["exp_avg"]
    assert type(loaded).__name__ == "OptimState8bit"
    assert torch.equal(loaded.dequantize(), moment.dequantize())
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_the_arithmetic_of_a_1_5b_student_on_24_gb():
    """Qwen2.5-1.5B's shape (built on the meta device): 16 B per parameter with DDP is more
    than a 24 GB GPU; FSDP over 2 ranks with checkpointing fits, activations included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from logitcache.train.memory import Setup, StudentShape, check_fits, footprint

    qwen = AutoConfig.for_model(
        "qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        shape = StudentShape.of(AutoModelForCausalLM.from_config(qwen))
    assert shape.params == 1_543_714_304 and shape.layers == 28
    gpu = 24 * 10**9
    ddp = footprint(shape, Setup(tokens=2 * 2048))
    assert ddp.states == 16 * shape.params and ddp.total > gpu
    fsdp = Setup(world_size=2, fsdp=True, gradient_checkpointing=True, tokens=2 * 2048)
    assert footprint(shape, fsdp).total < gpu
    assert check_fits(shape, fsdp, gpu, "cuda:0") is None
    with pytest.raises(LogitcacheError) as refused:  # 24.7 GB of states alone
        check_fits(shape, Setup(tokens=2 * 2048), gpu, "cuda:0")
    assert "it needs at least 24.7 GB per GPU before activations" in str(refused.value)
    assert (
        "it fits with `torchrun --nproc-per-node 2 -m logitcache.cli train ... --fsdp "
        "--gradient-checkpointing`" in str(refused.value)
    )
