"""What every ``bench train`` variant shares: its result record and how it builds the student.

In: a student config (a dict with ``model_type``) and a seed. Out: a randomly initialised
``AutoModelForCausalLM``; and ``VariantResult``, the timed outcome of one variant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.core.errors import LogitcacheError

__all__ = ["VariantResult", "build_model", "read_student_config"]


@dataclass
class VariantResult:
    variant: str
    step_s: float
    """Median step time after warm-up."""
    step_s_all: list[float]
    step_cpu_s: float
    """Median CPU seconds of this process per step: on a shared machine it swings less than
    wall time (which counts time preempted by other processes)."""
    tokens_per_step: int
    tokens_per_s: float
    peak_bytes: int | None
    """See the module docstring for what is counted; None where not measurable."""
    final_loss: float


def build_model(config: dict[str, Any], seed: int):
    """The student of ``config``, its weights drawn from ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bar for saving shards
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **kwargs))


def read_student_config(path: str) -> dict[str, Any]:
    """A transformers config file (JSON or YAML, with ``model_type``) as a dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LogitcacheError(f"--student-config {path!r} does not exist")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(file.read_text())
        else:
            data = json.loads(file.read_text())
    except Exception as err:
        raise LogitcacheError(f"cannot parse --student-config {path}: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise LogitcacheError(f"--student-config {path} must be a mapping with a 'model_type'")
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        if not isinstance(data.get(key), int):
            raise LogitcacheError(f"--student-config {path} needs an integer {key!r}")
    return data
