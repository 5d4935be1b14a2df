"""The one-call GPU check (benchmarks/gpu_check.sh) at its CPU sizes: every row is made by
the same code as on a GPU, so the script cannot rot between GPU machines. Its numbers on a
CPU mean nothing; only that each row is there and holds a number is checked."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import gpu_check
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_cpu_at_tiny_sizes(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--json", str(tmp_path / "rows.json")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(table) == 1 + len(rows)  # the header, then one line per row
    checks = [(row["check"], row["model"]) for row in rows]
    for model in ("SmolLM2-135M", "Qwen2.5-1.5B"):
        assert ("P2: pass / bare forward (goal >= 0.97)", model) in checks
        assert ("host side of the pass", model) in checks
    assert ("train step: offline KD / CE only", "SmolLM2-135M") in checks
    assert ("FSDP on one GPU / DDP, step", "SmolLM2-135M") in checks
    for row in rows:
        assert re.match(r"^[0-9][0-9,.]*", row["value"]), row


def test_the_gpu_check_script_parses_and_refuses_a_missing_gpu(capsys):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if not gpu_check.torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2
        assert "--device cpu runs the tiny sizes" in capsys.readouterr().err
