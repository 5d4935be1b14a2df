"""Starting test processes under torchrun: ``python -m torch.distributed.run --standalone
--nproc-per-node N TARGET...`` (a free port each time; gloo on CPU), one command line and
one environment for every test that launches ranks."""

from __future__ import annotations

import os
import subprocess
import sys

TORCHRUN_ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Set for every launch: one thread per rank (2 ranks on 2 cores), no network."""


def torchrun_command(*target: object, nproc: int = 2) -> list[str]:
    """The command line: ``target`` is a script and its arguments, or ``-m MODULE ...``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", str(nproc), *map(str, target)]


def torchrun_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``TORCHRUN_ENV`` and ``extra`` on top."""
    return {**os.environ, **TORCHRUN_ENV, **extra}


def run_torchrun(
    *target: object, nproc: int = 2, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    """Run ``torchrun_command(*target)`` to the end, output captured as text."""
    return subprocess.run(
        torchrun_command(*target, nproc=nproc),
        env=torchrun_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(args: list[object], *, nproc: int = 2, timeout: float = 120):
    """``logitcache ARGS`` on ``nproc`` ranks (``-m logitcache.cli``)."""
    return run_torchrun("-m", "logitcache.cli", *args, nproc=nproc, timeout=timeout)
