"""``logitcache train`` sent SIGTERM / SIGINT mid-run: it finishes the step, saves a
checkpoint, prints one line saying how to resume and exits 143 / 130; ``--resume`` then ends
with the uninterrupted run's exact weights and losses. A second signal stops at once and
says what is kept. ``precompute`` on SIGTERM says its shards are kept. Under torchrun a
SIGTERM to one rank stops both after the same step (slow: two fresh interpreters).

The commands run as forks of crashlab's warm forkserver (tests/faults/crashlab.py: a fresh
interpreter costs ~10 s here); the signals are real ones sent to that process. A ``pause``
fault holds the trainer after step n is logged, so the signal lands at a known step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).parents[1] / "faults"))
from crashlab import Fault, Lab, succeeded
from torchrun_launch import torchrun_command, torchrun_env

from logitcache.train.checkpoint import latest_checkpoint

FLAGS = {"steps": 8, "eval_every": 4}  # --save-every 0: before, nothing was kept on a signal


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module")
def args(topk_cache, train_args, student_config):
    return lambda out, **flags: train_args(
        topk_cache, out, student_config=student_config, **{**FLAGS, **flags}
    )


@pytest.fixture(scope="module")
def reference(lab, args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "reference"
    succeeded(lab.run(args(out)))
    return out


def rows(out: Path) -> list[dict]:
    lines = (
        (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    )
    return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in lines]


def paused_at(lab, command, step: int, go: Path, timeout: float = 60.0):
    """Start ``command`` held after its step ``step`` is logged (until ``go`` exists)."""
    out = Path(command[command.index("--out") + 1])
    running = lab.start(command, Fault("step", at=step, action="pause", arg=str(go)))
    deadline = time.monotonic() + timeout
    while not any(r.get("step") == step and "loss" in r for r in rows(out)):
        assert not running.poll(), running.log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.05)
    return running


def interrupted_line(output: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.startswith("interrupted")]
    assert "Traceback" not in output, output[-3000:]
    return line


def test_sigterm_saves_the_step_and_resume_ends_like_an_uninterrupted_run(
    lab, args, reference, tmp_path
):
    out, go = tmp_path / "run", tmp_path / "go"
    running = paused_at(lab, args(out), step=5, go=go)
    os.kill(running.proc.pid, signal.SIGTERM)
    go.touch()
    outcome = running.wait()

    assert outcome.code == 143, outcome.output[-3000:]
    line = interrupted_line(outcome.output)
    checkpoint = out / "checkpoints" / "step-0000005"
    assert line == (
        f"interrupted: SIGTERM after step 5 of 8: checkpoint saved to {checkpoint}; "
        "rerun the same command with --resume to continue"
    )
    assert latest_checkpoint(str(out)) == checkpoint
    assert not (out / "model").exists()

    succeeded(lab.run([*args(out), "--resume"]))
    model = "model/model.safetensors"
    assert (out / model).read_bytes() == (reference / model).read_bytes()
    assert rows(out) == rows(reference)


def test_ctrl_c_to_the_process_group_saves_too(lab, args, reference, tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader worker as well; the step still finishes."""
    out, go = tmp_path / "run", tmp_path / "go"
    running = paused_at(lab, args(out, loader_workers=1), step=2, go=go)
    os.killpg(running.proc.pid, signal.SIGINT)
    go.touch()
    outcome = running.wait()

    assert outcome.code == 130, outcome.output[-3000:]
    assert interrupted_line(outcome.output).startswith("interrupted: SIGINT after step 2 of 8: ")
    assert latest_checkpoint(str(out)).name == "step-0000002"
    succeeded(lab.run([*args(out), "--resume"]))
    assert rows(out) == rows(reference)


def test_a_second_signal_stops_at_once_and_says_nothing_was_saved(lab, args, tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    running = paused_at(lab, args(out), step=1, go=go)
    os.kill(running.proc.pid, signal.SIGINT)
    time.sleep(0.2)  # the first one recorded; the second arrives while the step is unfinished
    os.kill(running.proc.pid, signal.SIGINT)
    outcome = running.wait()

    assert outcome.code == 130, outcome.output[-3000:]
    assert interrupted_line(outcome.output) == (
        "interrupted: SIGINT before the run could save; no checkpoint was saved; rerun the "
        "same command with --overwrite to start over"
    )
    assert latest_checkpoint(str(out)) is None


def test_precompute_on_sigterm_says_its_shards_are_kept(
    lab, sharp_teacher_dir, text_corpus, tmp_path
):
    out, go = tmp_path / "cache", tmp_path / "go"
    command = [
        "precompute",
        "--teacher",
        sharp_teacher_dir,
        "--data",
        text_corpus,
        "--out",
        out,
        "--seq-len",
        "32",
        "--shard-sequences",
        "8",
        "--batch-tokens",
        "128",
        "--top-k",
        "8",
        "--device",
        "cpu",
        "--quiet",
    ]
    running = lab.start(command, Fault("forward", at=6, action="pause", arg=str(go)))
    deadline = time.monotonic() + 60
    while not list((out / "shards").glob("shard-*")):  # 4 sequences a forward, 8 a shard
        assert not running.poll() and time.monotonic() < deadline, running.log.read_text()
        time.sleep(0.05)
    os.kill(running.proc.pid, signal.SIGTERM)
    outcome = running.wait()

    assert outcome.code == 143, outcome.output[-3000:]
    assert interrupted_line(outcome.output) == (
        "interrupted: SIGTERM; completed shards are kept; rerun the same command to continue"
    )
    assert list((out / "shards").glob("shard-*"))


class _WaitingStream(IterableDataset):
    """Yields 0, 1, 2, each once the file ``go-<i>`` exists: a worker slow to decode. It
    touches ``waiting-<i>`` when it starts waiting for ``go-<i>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __iter__(self):
        for i in range(3):
            (self.root / f"waiting-{i}").touch()
            while not (self.root / f"go-{i}").exists():
                time.sleep(0.01)
            yield i


def test_a_dataloader_worker_outlives_ctrl_c_and_a_foreign_sigterm(tmp_path, monkeypatch):
    """Ctrl-C reaches the trainer's DataLoader worker too, and SLURM sends SIGTERM to every
    process; while the trainer finishes its step the worker must go on decoding (the next
    batch would fail). The trainer's own SIGTERM (DataLoader's or multiprocessing's
    ``terminate``) still ends it, or exiting would wait for it forever."""
    from torch.utils.data import DataLoader

    from logitcache.train.preempt import ignore_stop_signals

    (tmp_path / "go-0").touch()
    loader = DataLoader(
        _WaitingStream(tmp_path),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="fork",
        worker_init_fn=ignore_stop_signals,
    )
    batches = iter(loader)
    assert next(batches) == 0
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGINT)  # while the worker waits for go-1
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
    time.sleep(0.2)
    (tmp_path / "go-1").touch()
    assert next(batches) == 1
    assert worker.is_alive()
    # Only once the worker is stuck before go-2 (not between two requests, where the shutdown
    # below would end it cleanly: a race the full suite on 2 busy cores lost once)
    deadline = time.monotonic() + 10
    while not (tmp_path / "waiting-2").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The DataLoader's own shutdown, as at exit: it stops watching the worker (its SIGCHLD
    # handler would call this death a failure), waits, then terminates it (SIGTERM from the
    # parent); the worker, stuck before go-2, must die of it or exiting would hang.
    monkeypatch.setattr("torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL", 0.2)
    batches._shutdown_workers()
    worker.join(10)
    assert worker.exitcode == 128 + signal.SIGTERM


# Under torchrun: every rank holds at step 3 until ``go`` exists; the test signals one rank.
HELD = """
import os, sys, time
from pathlib import Path
from logitcache.train import loop

rank, go, at = os.environ["RANK"], Path(sys.argv[1]), int(sys.argv[2])
write = loop._MetricsLog.write

def held(self, row):
    write(self, row)
    if row.get("step") == at and "loss" in row:
        Path(f"{go}.{rank}").write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.02)

loop._MetricsLog.write = held
from logitcache.cli import main
main(sys.argv[3:], prog_name="logitcache")
"""


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(lab, args, reference, tmp_path):
    """2 gloo ranks; rank 1 alone gets SIGTERM after step 3: both save step 3 and exit 143
    (the stop flag is all-reduced), and one process resumes to the uninterrupted curve."""
    script, out, go = tmp_path / "held.py", tmp_path / "run", tmp_path / "go"
    script.write_text(HELD)
    proc = subprocess.Popen(
        torchrun_command(script, go, 3, *args(out, batch_size=2)),
        env=torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (Path(f"{go}.0").exists() and Path(f"{go}.1").exists()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(int(Path(f"{go}.1").read_text()), signal.SIGTERM)
    go.touch()
    output = proc.communicate(timeout=120)[0]

    assert proc.returncode != 0, output[-3000:]
    # Each rank prints the line, unless torchrun ends it first: the agent stops the other rank
    # as soon as one exits non-zero (both have saved by then: the save ends in a barrier).
    lines = [ln for ln in output.splitlines() if "interrupted:" in ln]
    assert 1 <= len(lines) <= 2, output[-3000:]
    assert all("interrupted: SIGTERM after step 3 of 8: " in ln for ln in lines), lines
    assert latest_checkpoint(str(out)).name == "step-0000003"

    resumed = [*args(out, batch_size=2, grad_accum=2), "--resume"]  # the same global batch
    succeeded(lab.run(resumed))
    one, two = rows(reference), rows(out)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for x, y in zip(one, two, strict=True):
        assert {k: pytest.approx(v, rel=1e-4) for k, v in x.items()} == y
