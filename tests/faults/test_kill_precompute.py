"""``logitcache precompute`` SIGKILLed at 20 seeded points, then rerun: every run ends
byte-identical to an uninterrupted run, and every state a kill leaves behind reads clean.

The points are spread evenly over four phases (5 each): during the teacher's compute (after
forward pass n), inside a shard write (k bytes of shard j on disk under its temporary name),
between a shard's publication and the manifest update that lists it, and inside the manifest
update (k bytes of the new manifest under its temporary name). Runs alternate top-k and
sampled caches. Two runs are in the fast suite; all 20 run with ``-m slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from crashlab import Fault, succeeded, tree_bytes

from logitcache.cli import main
from logitcache.storage import verify_cache

N_KILLS = 20
SEED = 13
PHASES = ("teacher", "shard-write", "shard-published", "manifest-write")
FAST = (3, 13)  # the final manifest torn (top-k), a shard torn (sampled)
N_SHARDS, N_FORWARDS = 7, 14  # see conftest.py


def kill_plan(seed: int = SEED) -> list[tuple[str, str, Fault]]:
    """(phase, mode, fault) for each of the N_KILLS runs."""
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(N_KILLS):
        phase, mode = PHASES[i % len(PHASES)], ("topk", "sampled")[(i // len(PHASES)) % 2]
        shard = int(rng.integers(1, N_SHARDS + 1))  # the shard-th publish, counted from 1
        fraction = float(rng.uniform(0, 1))
        if phase == "teacher":
            fault = Fault("forward", at=int(rng.integers(1, N_FORWARDS + 1)))
        elif phase == "shard-write":
            fault = Fault("publish:shards/", at=shard, when="torn", keep=fraction)
        elif phase == "shard-published":
            fault = Fault("publish:shards/", at=shard, when="after")
        else:  # the manifest is published once per shard, then once more as complete
            fault = Fault(
                "publish:manifest.json",
                at=int(rng.integers(1, N_SHARDS + 2)),
                when="torn",
                keep=fraction,
            )
        plan.append((phase, mode, fault))
    return plan


PLAN = kill_plan()


def test_the_plan_covers_every_phase_both_modes_and_the_edges():
    by_phase = {p: [f.at for ph, _, f in PLAN if ph == p] for p in PHASES}
    assert all(len(ats) == N_KILLS // len(PHASES) for ats in by_phase.values())
    assert {mode for _, mode, _ in PLAN} == {"topk", "sampled"}
    assert {1, N_FORWARDS} <= set(by_phase["teacher"])
    assert {1, N_SHARDS} <= set(by_phase["shard-write"])  # the last shard is the short one
    assert N_SHARDS in by_phase["shard-published"]
    assert {1, N_SHARDS + 1} <= set(by_phase["manifest-write"])  # the first and the complete


def check_left_state(out, reference, phase: str, fault: Fault) -> None:
    """What the kill left shows it landed in its phase, and every listed shard reads clean."""
    manifest = out / "manifest.json"
    listed = json.loads(manifest.read_text())["shards"] if manifest.exists() else []
    temporaries = [p for p in out.rglob(".tmp-*")]
    if phase == "teacher":  # 2 forwards per shard: the shard of forward n is not listed
        assert len(listed) <= (fault.at - 1) // 2
    elif phase == "shard-write":
        (tmp,) = temporaries
        size = json.loads((reference / "manifest.json").read_text())["shards"][fault.at - 1]
        assert tmp.name.startswith(".tmp-shard-")
        assert tmp.stat().st_size == int(fault.keep * size["bytes"])
        assert len(listed) == fault.at - 1
    elif phase == "shard-published":
        on_disk = sorted(p.name for p in (out / "shards").iterdir())
        assert len(on_disk) == fault.at and len(listed) == fault.at - 1 and not temporaries
    else:
        (tmp,) = temporaries  # a prefix of a manifest listing fault.at - 1 shards
        assert tmp.name.startswith(".tmp-manifest.json.") and tmp.read_bytes()[:1] in (b"", b"{")
        assert tmp.stat().st_size < len((reference / "manifest.json").read_bytes())
        assert len(listed) == min(fault.at - 1, N_SHARDS)
    if manifest.exists():
        state, problems = verify_cache(out)
        assert problems == [] and not state.complete


@pytest.mark.parametrize(
    "run", [i if i in FAST else pytest.param(i, marks=pytest.mark.slow) for i in range(N_KILLS)]
)
def test_killed_precompute_resumes_to_the_same_bytes(
    run, lab, precompute_args, reference_caches, tmp_path
):
    phase, mode, fault = PLAN[run]
    reference = reference_caches[mode]
    out = tmp_path / "cache"
    killed = lab.run(precompute_args(out, mode), fault)
    assert killed.killed, f"the fault {fault} was never reached:\n{killed.output[-2000:]}"
    check_left_state(out, reference, phase, fault)

    succeeded(lab.run(precompute_args(out, mode)))
    assert tree_bytes(out) == tree_bytes(reference)
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0 and result.output.startswith("ok: 7 shards"), result.output
