"""``logitcache train`` SIGKILLed at seeded points and rerun with ``--resume`` until done: the
final model is bit-identical to an uninterrupted run's, and so is every logged loss and eval.

Kill points are spread over five phases: between checkpoints (after step n), inside a
checkpoint write (weights written, optimizer state not), between a checkpoint's publication
and the ``latest`` pointer update, inside the pointer update (torn), and inside the final
model save. Some runs are killed again while resuming. One run is in the fast suite.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from crashlab import Fault, succeeded

from logitcache.train.checkpoint import latest_checkpoint

STEPS, SAVE_EVERY = 12, 2
N_CHECKPOINTS = STEPS // SAVE_EVERY
PHASES = ("step", "checkpoint-write", "checkpoint-published", "pointer-write", "final-model")
N_RUNS = 8
SEED = 3
FAST = (0,)


def fault_for(phase: str, rng: np.random.Generator, resumed: bool) -> Fault:
    """A kill in ``phase``; a resumed run is killed at its first checkpoint or first steps,
    which it always reaches (it resumes at step 10 at the latest)."""
    checkpoint = 1 if resumed else int(rng.integers(1, N_CHECKPOINTS + 1))
    if phase == "step":  # steps are counted in the process: the n-th step it takes
        return Fault("step", at=int(rng.integers(1, 3 if resumed else STEPS + 1)))
    if phase == "checkpoint-write":
        return Fault("checkpoint-weights", at=checkpoint)
    if phase == "checkpoint-published":
        return Fault("publish:checkpoints/latest", at=checkpoint, when="before")
    if phase == "pointer-write":
        return Fault("publish:checkpoints/latest", at=checkpoint, when="torn", keep=0.5)
    return Fault("final-model")


def kill_plan(seed: int = SEED) -> list[list[tuple[str, Fault]]]:
    """Per run, its kills in order: the first run's, then the resumed run's (killed again).
    Phases are dealt in turn; a run killed in its final save has nothing left to kill."""
    rng = np.random.default_rng(seed)
    plan, dealt = [], 0
    for _ in range(N_RUNS):
        phases = [PHASES[(dealt + i) % len(PHASES)] for i in range(1 + int(rng.integers(0, 2)))]
        dealt += len(phases)
        phases.sort(key=lambda name: name == "final-model")
        plan.append([(name, fault_for(name, rng, resumed=i > 0)) for i, name in enumerate(phases)])
    return plan


PLAN = kill_plan()


def test_the_plan_covers_every_phase():
    phases = [name for kills in PLAN for name, _ in kills]
    assert set(phases) == set(PHASES)
    assert any(len(kills) > 1 for kills in PLAN)  # some resumed runs are killed again


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, lab, reference_caches, train_args):
    out = tmp_path_factory.mktemp("train-reference") / "run"
    succeeded(lab.run(train_args(reference_caches["topk"], out, **FLAGS)))
    return out


FLAGS = {"save_every": SAVE_EVERY, "eval_every": 4, "steps": STEPS}


def losses_and_evals(out) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def check_left_state(out, phase: str, fault: Fault) -> None:
    """What the kill left shows where it landed; the latest checkpoint is always whole."""
    checkpoints = out / "checkpoints"
    latest = latest_checkpoint(str(out))
    temporaries = sorted(p.name for p in checkpoints.glob(".tmp-*")) if checkpoints.exists() else []
    if phase == "checkpoint-write":
        assert any(name.startswith(".tmp-step-") for name in temporaries), temporaries
    elif phase == "checkpoint-published":
        newest = max(p.name for p in checkpoints.glob("step-*"))
        assert latest is None or latest.name < newest
    elif phase == "pointer-write":
        assert any(name.startswith(".tmp-latest.") for name in temporaries), temporaries
    elif phase == "final-model":
        assert (out / ".tmp-model").is_dir() and not (out / "model").exists()
    if latest is not None:
        assert {p.name for p in latest.iterdir()} == {
            "model.safetensors",
            "optimizer.pt",
            "state.json",
        }


@pytest.mark.parametrize(
    "run", [i if i in FAST else pytest.param(i, marks=pytest.mark.slow) for i in range(N_RUNS)]
)
def test_killed_training_resumes_to_the_same_model(
    run, lab, reference_caches, train_args, reference_run, tmp_path
):
    out = tmp_path / "run"
    cache = reference_caches["topk"]
    for attempt, (phase, fault) in enumerate(PLAN[run]):
        # alternate in-process decoding and a DataLoader worker: either may be killed
        flags = {**FLAGS, "resume": attempt > 0, "loader_workers": (run + attempt) % 2}
        outcome = lab.run(train_args(cache, out, **flags), fault)
        assert outcome.killed, f"{fault} was never reached:\n{outcome.output[-2000:]}"
        check_left_state(out, phase, fault)
    succeeded(lab.run(train_args(cache, out, **FLAGS, resume=True)))

    assert (out / "model" / "model.safetensors").read_bytes() == (
        reference_run / "model" / "model.safetensors"
    ).read_bytes()
    assert losses_and_evals(out) == losses_and_evals(reference_run)
    assert not list(out.rglob(".tmp-*")), "a crashed write was left behind"


def delete_step(path) -> str:
    import shutil

    shutil.rmtree(path)
    return "named by checkpoints/latest: missing"


def truncate_state(path) -> str:
    (path / "state.json").write_bytes((path / "state.json").read_bytes()[:20])
    return f"{path / 'state.json'} is not valid JSON"


def garbage_optimizer(path) -> str:
    (path / "optimizer.pt").write_bytes(b"\0" * 1000)
    return f"cannot resume from {path / 'optimizer.pt'}: "


DAMAGES = (delete_step, truncate_state, garbage_optimizer)


@pytest.mark.parametrize(
    "damage",
    [d if d is delete_step else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGES],
    ids=lambda d: d.__name__,
)
def test_resume_skips_a_damaged_newest_checkpoint(
    damage, lab, reference_caches, train_args, reference_run, tmp_path
):
    """Killed after step 9 (checkpoints 6 and 8), step 8 deleted or damaged: --resume says
    in one line what it skipped and why, continues from step 6, and ends as the
    uninterrupted run."""
    out = tmp_path / "run"
    cache = reference_caches["topk"]
    assert lab.run(train_args(cache, out, **FLAGS), Fault("step", at=9)).killed
    newest = out / "checkpoints" / "step-0000008"
    reason = damage(newest)

    outcome = succeeded(lab.run(train_args(cache, out, **FLAGS, resume=True)))
    (line,) = [ln for ln in outcome.output.splitlines() if "--resume: skipped" in ln]
    assert line.startswith(f"warning: --resume: skipped step-0000008 ({reason}")
    assert line.endswith("; resuming from step-0000006")
    assert (out / "model" / "model.safetensors").read_bytes() == (
        reference_run / "model" / "model.safetensors"
    ).read_bytes()
    assert losses_and_evals(out) == losses_and_evals(reference_run)
