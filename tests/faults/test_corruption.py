"""Damaged caches: every injected fault is found by ``logitcache verify`` and by
``logitcache train``, with a message naming the damaged shard, and no student is saved.

Five kinds, five seeded injections each (one of each in the fast suite): a flipped byte, a
truncation, a deleted shard (in two of five also deleted from the manifest's list), a shard
swapped in from elsewhere (another teacher's cache,
another mode's cache, or the same cache's neighbour; with the manifest's hash left alone or
updated to vouch for the stranger), and a manifest edited to disagree with a shard.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from crashlab import refused, run_here, succeeded
from safetensors.torch import load_file

KINDS = ("flipped-byte", "truncated", "deleted", "foreign-shard", "manifest-edit")
PER_KIND = 5
SEED = 88
N_SHARDS = 7
FOREIGN = [  # (where the stranger comes from, whether the manifest vouches for it)
    ("other-teacher", False),
    ("other-teacher", True),
    ("other-mode", True),
    ("neighbour", True),
    ("other-mode", False),
]
EDITS = ("sha256", "bytes", "n_sequences", "path", "index")


def damage_plan(seed: int = SEED) -> list[tuple[str, int, dict]]:
    """(kind, shard, parameters) of each injection."""
    rng = np.random.default_rng(seed)
    plan = []
    for kind in KINDS:
        shards = rng.permutation(N_SHARDS)[:PER_KIND]
        for i, shard in enumerate(shards.tolist()):
            params = {
                "at": float(rng.uniform()),
                "mask": int(rng.integers(1, 256)),
                "foreign": FOREIGN[i],
                "edit": EDITS[i],
                "unlisted": i >= 3,  # deleted: the manifest's entry goes too
            }
            plan.append((kind, shard, params))
    return plan


PLAN = damage_plan()
CASES = [  # the first of each kind in the fast suite
    pytest.param(i, id=f"{kind}-{i % PER_KIND}", marks=[pytest.mark.slow] if i % PER_KIND else [])
    for i, (kind, _, _) in enumerate(PLAN)
]


@pytest.fixture(scope="module")
def other_teacher_cache(tmp_path_factory, lab, precompute_args, tiny_teacher_dir):
    """Top-k, same corpus and settings, another teacher: same shard names, other identity."""
    out = tmp_path_factory.mktemp("other") / "cache"
    args = precompute_args(out, "topk")
    args[args.index("--teacher") + 1] = str(tiny_teacher_dir)
    succeeded(lab.run(args))
    return out


def shard_file(cache, j: int):
    return cache / "shards" / f"shard-{j:06d}.arrow"


def edit_manifest(cache, edit) -> None:
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    for key in ("n_sequences", "n_tokens", "bytes"):  # keep the derived totals consistent
        manifest[key] = sum(s[key] for s in manifest["shards"])
    path.write_text(json.dumps(manifest, indent=1))


def vouch_for(cache, j: int) -> None:
    """The manifest's size and hash of shard j made to match the file, as a careless or
    hostile publisher would: then only the shard's own metadata can refuse it."""
    data = shard_file(cache, j).read_bytes()

    def edit(manifest):
        manifest["shards"][j].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    edit_manifest(cache, edit)


def inject(cache, kind: str, j: int, params: dict, strangers: dict) -> list[str]:
    """Damage ``cache``; returns what a message about it must contain (one of them)."""
    target = shard_file(cache, j)
    name = f"shards/shard-{j:06d}.arrow"
    if kind == "flipped-byte":
        data = bytearray(target.read_bytes())
        data[int(params["at"] * len(data))] ^= params["mask"]
        target.write_bytes(bytes(data))
        return [f"shard {name} fails its check"]
    if kind == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: int(params["at"] * len(data))])
        return [f"shard {name} fails its check"]
    if kind == "deleted":
        target.unlink()
        if not params["unlisted"]:
            return [f"shard {name} is missing"]
        edit_manifest(cache, lambda manifest: manifest["shards"].pop(j))
        return [f"lists {N_SHARDS - 1} shards; shards missing from the list"]
    if kind == "foreign-shard":
        source, vouched = params["foreign"]
        k = (j + 1) % N_SHARDS
        if source == "neighbour":  # shards j and k trade places, both vouched for
            other = shard_file(cache, k)
            swap = target.read_bytes()
            target.write_bytes(other.read_bytes())
            other.write_bytes(swap)
        else:
            shutil.copyfile(shard_file(strangers[source], j), target)
        if not vouched:
            return [f"shard {name} fails its check"]
        vouch_for(cache, j)
        if source == "neighbour":
            vouch_for(cache, k)
            return [f"shard shards/shard-{i:06d}.arrow disagrees with the manifest" for i in (j, k)]
        return [f"shard {name} belongs to another cache"]
    edit = params["edit"]  # manifest-edit: the manifest disagrees with shard j

    def change(manifest):
        info = manifest["shards"][j]
        if edit == "sha256":
            info["sha256"] = ("0" if info["sha256"][0] != "0" else "1") + info["sha256"][1:]
        elif edit == "bytes":
            info["bytes"] += 1
        elif edit == "n_sequences":
            info["n_sequences"] -= 1
        elif edit == "path":  # names the neighbour's file
            info["path"] = f"shards/shard-{(j + 1) % N_SHARDS:06d}.arrow"
        else:  # the last shard listed as a later one
            last = manifest["shards"][-1]
            last["index"] += 1
            last["first_sequence"] += 8

    edit_manifest(cache, change)
    if edit == "path":
        return [f"shard path 'shards/shard-{(j + 1) % N_SHARDS:06d}.arrow' is listed twice"]
    if edit == "index":
        return [f"shard shards/shard-{N_SHARDS - 1:06d}.arrow disagrees with the manifest"]
    if edit == "n_sequences":
        return [f"shard {name} disagrees with the manifest"]
    return [f"shard {name} fails its check"]


@pytest.mark.parametrize("case", CASES)
def test_damage_is_found_by_verify_and_by_the_trainer(
    case, copy_cache, reference_caches, other_teacher_cache, train_args, tmp_path
):
    kind, j, params = PLAN[case]
    cache = copy_cache("topk")
    strangers = {"other-teacher": other_teacher_cache, "other-mode": reference_caches["sampled"]}
    messages = inject(cache, kind, j, params, strangers)

    checked = run_here(["verify", cache])
    assert checked.code == 1 and "Traceback" not in checked.output, checked.output
    # a bad shard is one BAD line each; a manifest that contradicts itself, one error line
    bad = [ln for ln in checked.output.splitlines() if ln.startswith(("BAD  ", "error: "))]
    assert sorted(m for m in messages for line in bad if m in line) == messages, checked.output
    if bad[0].startswith("BAD  "):
        assert f"{len(messages)} of {N_SHARDS} shards failed verification" in checked.output

    out = tmp_path / "student"
    # one epoch (no --steps) reads every training sequence, then the held-out ones
    line = refused(run_here(train_args(cache, out, steps=None, loader_workers=case % 2)))
    assert any(m in line for m in messages), line
    assert not (out / "model").exists()  # no student came out of it


def test_every_kind_is_injected_per_kind_times():
    assert [kind for kind, _, _ in PLAN] == [k for k in KINDS for _ in range(PER_KIND)]
    assert {name for name, _ in FOREIGN} == {"other-teacher", "other-mode", "neighbour"}


@pytest.mark.slow
@pytest.mark.parametrize("field", ["n_tokens", "n_positions", "n_entries"])
def test_edited_statistics_are_found_by_verify_and_do_not_change_training(
    field, copy_cache, reference_caches, train_args, tmp_path
):
    """The manifest's per-shard counts are statistics: verify recounts them; the trainer
    never reads them (the shard's bytes are hash-checked), so it trains exactly as on the
    untouched cache."""
    cache = copy_cache("topk")

    def edit(manifest):
        manifest["shards"][2][field] += 1
        if field in manifest:  # a derived total, kept consistent
            manifest[field] += 1

    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))
    checked = run_here(["verify", cache])
    assert checked.code == 1, checked.output
    assert f"BAD  shard shards/shard-000002.arrow: {field} is" in checked.output

    runs = {}
    for name, source in (("edited", cache), ("untouched", reference_caches["topk"])):
        succeeded(run_here(train_args(source, tmp_path / name, steps=4)))
        runs[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    assert all((runs["edited"][k] == runs["untouched"][k]).all() for k in runs["untouched"])
