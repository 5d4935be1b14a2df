"""Run ``logitcache`` commands in child processes that fail on purpose at a named point.

In: command-line arguments and an optional ``Fault``. Out: an ``Outcome`` (exit status,
whether the child died by SIGKILL, its stdout+stderr, its peak memory growth).

Importing torch and transformers costs ~10 s on a 2-core machine, so a campaign of forty
runs cannot start forty interpreters. A forkserver imports them once; each run is a fork
of it that installs its fault (a wrapper around one library function), runs
``logitcache.cli.main`` with the arguments, and exits with the command's status. A child
that SIGKILLs itself is a really dead process: no ``finally``, no atexit, no flushed buffers.

Fault points (``Fault.point``), each counted from 1 in one process:
- ``forward``: the teacher's n-th forward pass has returned (precompute).
- ``publish:<prefix>``: the n-th object whose cache-relative name starts with ``<prefix>`` is
  being published (``shards/``, ``manifest.json``, ``checkpoints/latest``). ``when``:
  ``before`` nothing written yet; ``torn`` the first ``keep`` (a fraction) of its bytes
  written and fsynced under the writer's temporary name, not renamed; ``after`` renamed
  into place, nothing after it run.
- ``step``: the n-th optimizer step this process takes is logged to metrics.jsonl (train).
- ``checkpoint-weights``: the n-th checkpoint's model.safetensors is written in its staging
  directory; its optimizer state is not (train).
- ``final-model``: the final model is written under its temporary name, not renamed (train).

Actions (``Fault.action``): ``kill`` (SIGKILL itself), ``limit`` (from then on files may not
grow past ``arg`` bytes: RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail with EFBIG like a full
disk), ``pause`` (wait until the file ``arg`` exists, then go on).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fault", "Lab", "Outcome", "refused", "run_here", "succeeded", "tree_bytes"]

# Imported once by the forkserver; everything a command touches, so a fork starts warm.
_PRELOAD = [
    "crashlab",
    "logitcache.cli",
    "logitcache.precompute.run",
    "logitcache.train.loop",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "safetensors.torch",
    "zarr",
]


@dataclass(frozen=True)
class Fault:
    point: str
    """``forward``, ``publish:<prefix>``, ``step``, ``checkpoint-weights`` or ``final-model``."""
    at: int = 1
    """Act the at-th time the point is reached (counted in this process)."""
    when: str = "before"
    """publish points only: ``before``, ``torn`` or ``after`` (see the module docstring)."""
    keep: float = 0.0
    """``torn``: the fraction of the object's bytes on disk when the process dies."""
    action: str = "kill"
    """``kill``, ``limit`` or ``pause``."""
    arg: str | int | None = None
    """``limit``: the file-size limit in bytes; ``pause``: the file to wait for."""

    @property
    def phase(self) -> str:
        """A short name of where the fault lands, for tallies."""
        return self.point if not self.point.startswith("publish:") else f"{self.point}/{self.when}"


@dataclass
class Outcome:
    code: int
    """Exit status; -9 when the child was SIGKILLed."""
    output: str
    """What the command printed (stdout and stderr interleaved)."""
    rss_growth_mb: float
    """Peak resident memory above the child's memory at fork (MB); nan when killed."""

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.output.splitlines() if ln.startswith(("error:", "Error:"))]


class Lab:
    """Starts commands as forks of one warm forkserver; ``workdir`` keeps their logs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._n = 0

    def start(self, args: list[str], fault: Fault | None = None, env: dict | None = None):
        """Start ``logitcache ARGS`` in a child; returns a handle for ``wait``."""
        self._n += 1
        log = self.workdir / f"run-{self._n:04d}.log"
        argv = [str(a) for a in args]
        proc = self._ctx.Process(target=_child, args=(argv, fault, str(log), env or {}))
        proc.start()
        return _Running(proc, log)

    def run(
        self,
        args: list[str],
        fault: Fault | None = None,
        timeout: float = 120,
        env: dict | None = None,
    ) -> Outcome:
        return self.start(args, fault, env).wait(timeout)


class _Running:
    def __init__(self, proc: multiprocessing.Process, log: Path) -> None:
        self.proc, self.log = proc, log

    def poll(self) -> bool:
        return not self.proc.is_alive()

    def wait(self, timeout: float = 120) -> Outcome:
        self.proc.join(timeout)
        hung = self.proc.is_alive()
        # a killed trainer's DataLoader workers would exit on their own within ~5 s
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        if hung:
            raise TimeoutError(f"command did not finish in {timeout} s; log: {self.log}")
        output = self.log.read_text(errors="replace") if self.log.exists() else ""
        stats = self.log.with_suffix(".rss")
        growth = json.loads(stats.read_text())["growth_mb"] if stats.exists() else float("nan")
        return Outcome(self.proc.exitcode, output, growth)


def run_here(args: list) -> Outcome:
    """``logitcache ARGS`` in this process (no fault, no fork): for commands that cannot
    crash the process, when a fork's ~0.5 s start is not worth it."""
    from click.testing import CliRunner

    from logitcache.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.stdout + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "".join(traceback.format_exception(result.exception))
    return Outcome(result.exit_code, output, float("nan"))


def tree_bytes(root: Path, skip: tuple[str, ...] = (".locks",)) -> dict[str, bytes]:
    """Every file under root (relative POSIX name -> bytes), except the top-level ``skip``."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


def succeeded(outcome: Outcome) -> Outcome:
    assert outcome.code == 0, outcome.output[-3000:]
    return outcome


def refused(outcome: Outcome, *needles: str) -> str:
    """The command failed the expected way: exit 1, one ``error:`` line, no traceback."""
    assert outcome.code == 1, (outcome.code, outcome.output[-3000:])
    assert "Traceback" not in outcome.output, outcome.output[-3000:]
    (line,) = outcome.error_lines
    for needle in needles:
        assert needle in line, line
    return line


# -- inside the child ---------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(argv: list[str], fault: Fault | None, log: str, env: dict) -> None:
    os.setpgrp()  # its own group: whatever it starts is cleaned up with it (see _Running)
    # A command started from a shell forks its DataLoader workers; inherited from the
    # forkserver, the default would start a forkserver of its own per command.
    multiprocessing.set_start_method("fork", force=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update({"OMP_NUM_THREADS": "1", **env})
    # Past a file-size limit a write fails with EFBIG, as on a full disk, instead of
    # killing the process (the limit also caps this log: keep commands --quiet).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    # tqdm's default lock is a named semaphore; a killed child would leak it (and the
    # resource tracker warn about it at exit). Threads are all a child needs.
    tqdm.set_lock(threading.RLock())
    start_mb = _rss_mb()
    if fault is not None:
        _install(fault)
    from logitcache.cli import main

    code = 0
    try:
        main(argv, prog_name="logitcache", standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()  # what a user would see: the bug's traceback
        code = 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(log).with_suffix(".rss").write_text(json.dumps({"growth_mb": peak - start_mb}))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _act(fault: Fault) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "limit":  # process-wide, from any thread (SIGXFSZ is ignored)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fault.arg), resource.RLIM_INFINITY))
    elif fault.action == "pause":
        deadline = time.monotonic() + 60
        while not os.path.exists(str(fault.arg)) and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        raise ValueError(f"unknown fault action {fault.action!r}")


def _install(fault: Fault) -> None:
    """Wrap the one library function where ``fault`` lands."""
    count = [0]

    def reached() -> bool:
        count[0] += 1
        return count[0] == fault.at

    if fault.point == "forward":
        from logitcache.precompute import run

        forward = run.Pipeline._forward

        def counted_forward(self, batch):
            for item in forward(self, batch):
                if reached():
                    _act(fault)
                yield item

        run.Pipeline._forward = counted_forward
    elif fault.point.startswith("publish:"):
        from logitcache.storage import Location

        prefix = fault.point.split(":", 1)[1]
        publish = Location.publish_bytes

        def faulty_publish(self, rel: str, data: bytes) -> None:
            if not (rel.startswith(prefix) and reached()):
                return publish(self, rel, data)
            if fault.when == "before":
                _act(fault)
            elif fault.when == "torn":
                with self.staged(rel) as tmp, open(tmp, "wb") as fh:
                    fh.write(data[: int(fault.keep * len(data))])
                    fh.flush()
                    os.fsync(fh.fileno())
                    _act(fault)
            publish(self, rel, data)
            if fault.when == "after":
                _act(fault)

        Location.publish_bytes = faulty_publish
    elif fault.point == "step":
        from logitcache.train import loop

        write = loop._MetricsLog.write

        def counted_write(self, row):
            write(self, row)
            if "loss" in row and reached():
                _act(fault)

        loop._MetricsLog.write = counted_write
    elif fault.point == "checkpoint-weights":
        from logitcache.train import checkpoint

        save_model = checkpoint.save_model

        def counted_save(model, path, *args, **kwargs):
            save_model(model, path, *args, **kwargs)
            if reached():
                _act(fault)

        checkpoint.save_model = counted_save
    elif fault.point == "final-model":
        from transformers import PreTrainedModel

        save_pretrained = PreTrainedModel.save_pretrained

        def counted_save_pretrained(self, *args, **kwargs):
            save_pretrained(self, *args, **kwargs)
            if reached():
                _act(fault)

        PreTrainedModel.save_pretrained = counted_save_pretrained
    else:
        raise ValueError(f"unknown fault point {fault.point!r}")
