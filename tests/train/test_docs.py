"""Every Python block of docs/api.md and of the README's "Bring your own trainer" runs.

The blocks read ``CACHE``, ``STUDENT``, ``OTHER_TOKENIZER`` and ``OUT`` from the environment;
here they are the session's top-k cache, a saved 1-layer student, a SentencePiece-style
tokenizer and a temporary directory. The Accelerate
block runs as written under torchrun with two gloo processes and as one process, and must
print the same losses and see every training sequence once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torchrun_launch import run_torchrun

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = "Accelerate (or any DDP launcher)"


def blocks(path: Path, only_section: str | None = None) -> dict[str, str]:
    """``{"heading #n": code}`` of the ```python blocks, by the heading above each."""
    out: dict[str, str] = {}
    heading = ""
    pattern = re.compile(r"(^#+ [^\n]*$|^```python\n.*?^```$)", flags=re.M | re.S)
    for part in pattern.split(path.read_text()):
        if part.startswith("#"):
            heading = part.lstrip("#").strip()
        elif part.startswith("```python") and only_section in (None, heading):
            out[f"{heading} #{len(out)}"] = part.removeprefix("```python\n").removesuffix("```")
    return out


API = blocks(ROOT / "docs" / "api.md")
README = blocks(ROOT / "README.md", only_section="Bring your own trainer")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, student_config, teacher_dir) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = json.loads(student_config.read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    path = tmp_path_factory.mktemp("doc-student")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """A SentencePiece-style tokenizer (another family than the cache's byte-level BPE)."""
    from crosstok_tokenizers import build_sentencepiece_tokenizer

    path = tmp_path_factory.mktemp("other-tokenizer")
    build_sentencepiece_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def doc_env(monkeypatch, topk_cache, student_dir, other_tokenizer, tmp_path) -> dict[str, str]:
    env = {
        "CACHE": str(topk_cache),
        "STUDENT": str(student_dir),
        "OUT": str(tmp_path / "out"),
        "OTHER_TOKENIZER": str(other_tokenizer),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def run_block(code: str, name: str) -> None:
    exec(compile(code, f"<{name}>", "exec"), {"__name__": "__main__"})


def test_the_docs_have_their_blocks():
    assert len(API) >= 6 and len(README) == 1
    assert len(API["A plain PyTorch loop #1"].splitlines()) < 40


@pytest.mark.parametrize("name", [n for n in API if not n.startswith(ACCELERATE)])
def test_api_block_runs(name, doc_env, capsys):
    if name.startswith("TRL"):
        pytest.importorskip("trl")
    if "peft" in API[name]:
        pytest.importorskip("peft")
    run_block(API[name], name)
    if name.startswith("A plain PyTorch loop"):
        # One epoch of 54 training sequences in micro-batches of 8; run again, the saved
        # stream position says the epoch is done: no step repeats.
        assert capsys.readouterr().out.count("step ") == 7
        run_block(API[name], name)
        assert capsys.readouterr().out.count("step ") == 0


@pytest.mark.parametrize("name", list(README))
def test_readme_block_runs(name, doc_env):
    run_block(README[name], name)


SPY = """
import atexit, json, os, runpy, sys
from logitcache.train.distill_loss import DistillationLoss

seen, forward = [], DistillationLoss.forward

def spy(self, batch, **kw):
    seen.extend(i for i in batch["index"].tolist() if i >= 0)
    return forward(self, batch, **kw)

DistillationLoss.forward = spy
rank = os.environ.get("RANK", "0")
out = os.path.join(os.environ["OUT"], f"seen-{os.environ.get('WORLD_SIZE', '1')}-{rank}.json")
atexit.register(lambda: json.dump(seen, open(out, "w")))
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.slow
def test_accelerate_block_two_processes_equal_one(
    doc_env, tmp_path, topk_cache, monkeypatch, capsys
):
    from logitcache.train import CacheDataset, DistillationLoss

    (name,) = [n for n in API if n.startswith(ACCELERATE)]
    script, spy = tmp_path / "train.py", tmp_path / "spy.py"
    script.write_text(API[name])
    spy.write_text(SPY)
    os.makedirs(doc_env["OUT"], exist_ok=True)
    proc = run_torchrun(spy, script, timeout=300, **doc_env, ACCELERATE_USE_CPU="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = lambda text: [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", text)]  # noqa: E731
    two_losses = losses(proc.stdout)

    seen, forward = [], DistillationLoss.forward  # one process, accumulating 2, in here

    def spied(self, batch, **kw):
        seen.extend(i for i in batch["index"].tolist() if i >= 0)
        return forward(self, batch, **kw)

    monkeypatch.setattr(DistillationLoss, "forward", spied)
    run_block(API[name], name)
    one_losses = losses(capsys.readouterr().out)
    assert len(one_losses) == 7  # 54 training sequences, 8 per step
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    out = Path(doc_env["OUT"])
    by_rank = [json.loads((out / f"seen-2-{r}.json").read_text()) for r in (0, 1)]
    training = CacheDataset(str(topk_cache))
    everything = sorted(int(training[i]["index"]) for i in range(len(training)))
    assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == everything
    assert sorted(seen) == everything
