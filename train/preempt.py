"""Stopping a training run cleanly on SIGTERM or SIGINT (preemption, Ctrl-C).

In: the signals a scheduler (SLURM, Kubernetes, a spot-instance reclaim) or a terminal
sends. Out: ``StopOnSignal``, a context manager whose handlers only record the first signal;
the training loop asks it at the end of each optimizer step (``requested``: every rank
agrees, so all stop after the same step), saves a checkpoint, and raises ``Interrupted``,
which the CLI prints as one line and turns into exit status 128 + signal (130 for SIGINT,
143 for SIGTERM).

A second signal restores the handler that was there before and delivers the signal again:
Ctrl-C twice raises KeyboardInterrupt at once, a second SIGTERM ends the process as it
would have without us. Handlers can only be installed from the main thread; elsewhere (a
trainer started in a thread) the context does nothing and signals behave as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from logitcache.core.errors import Interrupted, Terminated, sigterm_raises

from .checkpoint import latest_checkpoint

__all__ = ["STOP_SIGNALS", "StopOnSignal", "ignore_stop_signals", "reported_interrupts", "stopped"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Records the first SIGTERM / SIGINT received inside the ``with`` block (see the module
    docstring); ``announce`` prints a line when it arrives (the step may take a while)."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: what would have happened without us
            previous = self._previous.get(signum, signal.SIG_DFL)
            self._restore()
            if callable(previous):
                previous(signum, frame)  # SIGINT's default_int_handler: KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.announce:  # os.write: print() may be mid-write to stderr when a signal lands
            name = signal.Signals(signum).name
            os.write(
                2,
                f"\n{name}: finishing this step, then saving a checkpoint "
                f"(send it again to stop at once, without saving)\n".encode(),
            )

    def requested(self, distributed: bool, device: torch.device) -> int:
        """The signal to stop on (0: none). Under torchrun every rank calls this after each
        step and all get the same answer: a signal seen by any rank stops them all after
        the same step. Cost: one all-reduce of one integer."""
        if not distributed:
            return self.signum or 0
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stopped(signum: int, step: int, total: int, out: str) -> Interrupted:
    """What ``train`` raises after saving the checkpoint of ``step`` on signal ``signum``."""
    checkpoint = Path(out) / "checkpoints" / f"step-{step:07d}"
    return Interrupted(
        f"{signal.Signals(signum).name} after step {step} of {total}: checkpoint saved to "
        f"{checkpoint}; rerun the same command with --resume to continue",
        signum,
    )


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group,
    and some schedulers (SLURM) send SIGTERM to every process; a worker that died of either
    would fail the step the trainer is finishing. So a worker ignores SIGINT, and SIGTERM
    from anyone but the trainer (which terminates a worker that does not stop, as
    multiprocessing does at exit). Workers still exit with the trainer: DataLoader tells
    them to, and they watch for their parent's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps its default
        return
    # Blocked, SIGTERM waits for the thread below, which sees who sent it; the threads a
    # worker starts later inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()
    threading.Thread(target=_exit_when_the_parent_asks, args=(parent,), daemon=True).start()


def _exit_when_the_parent_asks(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(128 + signal.SIGTERM)


@contextlib.contextmanager
def reported_interrupts(out: str) -> Iterator[None]:
    """For ``logitcache train``: a signal that stops the run where it cannot save (during
    setup or the final save, or a second signal) becomes an ``Interrupted`` saying what is
    in ``out`` to continue from. SIGTERM raises there as Ctrl-C does (``sigterm_raises``)."""
    with sigterm_raises():
        try:
            yield
        except KeyboardInterrupt as err:
            signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
            latest = latest_checkpoint(out)
            if latest is None:
                kept = (
                    "no checkpoint was saved; rerun the same command with --overwrite to start over"
                )
            else:
                kept = (
                    f"nothing saved now; the last checkpoint, {latest}, is kept: rerun the "
                    "same command with --resume to continue from it"
                )
            raise Interrupted(f"{signum.name} before the run could save; {kept}", signum) from None
