"""What the torchrun tests share: a 2-process launcher and the "same run" comparison.

The global batch is the same everywhere (2 processes x batch 2 = 1 process x batch 2 x
grad-accum 2); the fixtures ``flags`` and ``reference`` (tests/train/conftest.py) build the
arguments and the uninterrupted 16-step, one-process run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torchrun_launch import run_cli

STEPS, FIRST = 16, 8  # the uninterrupted run; where the interrupted one stops


def torchrun(args: list[str], timeout: float = 180) -> None:
    """``torchrun --standalone --nproc-per-node 2 -m logitcache.cli ARGS`` (a free port)."""
    proc = run_cli(args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def same_run(a: Path, b: Path, metrics, *, close) -> None:
    """The same steps, evaluations and token counts, losses ``close(x, y)`` at every step,
    and final weights (``save_pretrained``) allclose."""
    one, two = metrics(a), metrics(b)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for x, y in zip(one, two, strict=True):
        for key in ("loss", "eval_kl", "eval_ce"):
            if key in x:
                assert close(x[key], y[key]), (x["step"], key, x[key], y[key])
        for key in ("tokens", "epoch", "eval_positions"):
            assert x.get(key) == y.get(key), (x["step"], key)
    wa = load_file(a / "model" / "model.safetensors")
    wb = load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-5), key
