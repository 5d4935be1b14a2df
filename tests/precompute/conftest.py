"""Fixtures of the teacher-pass tests: one intra-op thread, a sharp teacher, a runner.

The text corpus (24 documents, 1,737 tokens) packs into 28 sequences of 64 tokens: 7
shards of 4, enough for resume and worker splits, small enough for ~1 s per pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# A random-init head gives logits of std ~0.1 (32 hidden x 0.02 init): a near-uniform
# teacher (top-8 of 300 covers ~3% of the mass). x30 gives std ~3: peaked distributions,
# so a sampling test can tell the teacher's distribution from a tempered one.
HEAD_SCALE = 30.0


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models are tiny; a second intra-op thread on 2 shared cores only slows them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sharp_teacher_dir(tmp_path_factory, tiny_teacher_dir) -> Path:
    """``tiny_teacher_dir`` with its LM head scaled by HEAD_SCALE (peaked distributions)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharp-teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(path)
    for file in Path(tiny_teacher_dir).iterdir():  # the tokenizer's files, unchanged
        if not (path / file.name).exists():
            shutil.copy(file, path / file.name)
    return path
