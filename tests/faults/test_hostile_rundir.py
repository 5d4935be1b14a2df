"""Hostile run directories, handed over by a teammate who controls every byte: ``train
--resume`` refuses each file with one line naming it, executes nothing (a marker file is not
created), reads nothing outside ``--out``, allocates nothing unreasonable and never hangs.

Each command runs in a forked child (``crashlab``) with a 60 s limit; its peak resident
memory above its memory at fork must stay under ``MAX_GROWTH_MB``. Each base run holds one
checkpoint (``--keep-checkpoints 1``), so there is no earlier one to fall back to.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from crashlab import refused, succeeded
from test_hostile import Trap

MAX_GROWTH_MB = 256
STEP = "step-0000002"
BASE = {"steps": 2, "save_every": 2, "keep_checkpoints": 1}


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory, lab, reference_caches, train_args) -> dict[str, Path]:
    """Two finished runs of 2 steps: one of the whole format, one of the ``dcp`` (--fsdp)."""
    root = tmp_path_factory.mktemp("rundir-base")
    cache = reference_caches["topk"]
    for kind, extra in (("whole", {}), ("dcp", {"fsdp": True})):
        succeeded(lab.run(train_args(cache, root / kind, **BASE, **extra)))
    return {kind: root / kind for kind in ("whole", "dcp")}


def global_pickle(module: str, name: str, marker: Path) -> bytes:
    """A protocol-4 pickle calling ``module``'s ``name`` (dots resolved by pickle) with a
    shell command that creates ``marker``."""

    def text(s: str) -> bytes:
        data = s.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE

    command = text(f"touch {marker}")
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + command + b"\x85R."


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def edit_state(run: Path, edit) -> None:
    file = run / "checkpoints" / STEP / "state.json"
    state = json.loads(file.read_text())
    edit(state)
    file.write_text(json.dumps(state))


def set_progress(key, value):
    return lambda run, marker: edit_state(run, lambda s: s["progress"].update({key: value}))


def nested(depth: int) -> list:
    """A list ``depth`` levels deep: [[[...]]]."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def write(rel: str, data: bytes):
    return lambda run, marker: (run / rel).write_bytes(data)


def replace_with(rel: str, how):
    return lambda run, marker: how(run / rel)


def storage_bomb(numel: int) -> bytes:
    """A torch.save zip whose one tensor claims ``numel`` float32 elements of a 16-byte
    record: a loader that trusted the count would allocate 4 bytes each."""

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            args = (Storage(), 0, (numel,), (1,), False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            is_storage = isinstance(obj, Storage)
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if is_storage else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"optimizer": {"state": {0: {"exp_avg": Tensor()}}}})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", b"\0" * 16)
        archive.writestr("archive/version", "3\n")
    return out.getvalue()


def link_outside(rel: str):
    """``rel`` moved out of the run and a link to it left in its place."""

    def damage(run: Path, marker: Path) -> None:
        outside = run.parent / "elsewhere"
        shutil.move(run / rel, outside)
        (run / rel).symlink_to(outside)

    return damage


CKPT = f"checkpoints/{STEP}"
_HEADER = {"w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 1 << 62]}}
HUGE_TENSOR = len(json.dumps(_HEADER)).to_bytes(8, "little") + json.dumps(_HEADER).encode()
META = "torch.distributed.checkpoint.metadata"
# (name, base run, damage(run, marker), what the one error line must contain)
CASES = [
    (
        "state-truncated",
        "whole",
        write(f"{CKPT}/state.json", b'{"progress": {"st'),
        "state.json is not valid JSON: Unterminated string",
    ),
    ("state-empty", "whole", write(f"{CKPT}/state.json", b""), "state.json is not valid JSON"),
    ("state-list", "whole", write(f"{CKPT}/state.json", b"[1, 2]"), "no 'progress' object"),
    (
        "state-deep",
        "whole",
        write(f"{CKPT}/state.json", b"[" * 100_000),
        "state.json is not valid JSON: nested too deeply",
    ),
    (
        "state-nested-40",
        "whole",
        lambda run, m: edit_state(run, lambda s: s["config"].update(x=nested(40))),
        "state.json: JSON nested over 32 levels deep; refusing it",
    ),
    ("state-1mb", "whole", write(f"{CKPT}/state.json", b" " * (1 << 20) + b"{}"), "1,048,576"),
    ("step-negative", "whole", set_progress("step", -3), "'progress.step' = -3 must be an integer"),
    ("step-string", "whole", set_progress("step", "2"), "'progress.step' = '2' must be"),
    ("step-huge", "whole", set_progress("step", 10**12), "'step' = 1000000000000 in a dir"),
    ("tokens-float", "whole", set_progress("tokens", 1.5), "'progress.tokens' = 1.5"),
    (
        "dcp-format-without-fsdp",
        "whole",
        lambda run, m: edit_state(run, lambda s: s.update(format="dcp")),
        "it says an --fsdp (dcp) checkpoint and this run is without --fsdp",
    ),
    (
        "latest-dotdot",
        "whole",
        write("checkpoints/latest", b"../../../etc"),
        "not a checkpoint name",
    ),
    ("latest-absolute", "whole", write("checkpoints/latest", b"/etc"), "not a checkpoint name"),
    ("latest-1mb", "whole", write("checkpoints/latest", b"s" * (1 << 20)), "more than the 64"),
    (
        "optimizer-pickle",
        "whole",
        lambda run, m: (run / CKPT / "optimizer.pt").write_bytes(pickle.dumps({"state": Trap(m)})),
        "refused unread (weights_only)",
    ),
    (
        "optimizer-storage-4gb",
        "whole",
        write(f"{CKPT}/optimizer.pt", storage_bomb(1 << 30)),
        "does not match expected size",
    ),
    ("step-dir-link-outside", "whole", link_outside(CKPT), f"{STEP} is a link to outside"),
    (
        "checkpoints-link-outside",
        "whole",
        link_outside("checkpoints"),
        "checkpoints is a link to outside",
    ),
    (
        "optimizer-garbage",
        "whole",
        write(f"{CKPT}/optimizer.pt", os.urandom(1 << 20)),
        "optimizer.pt",
    ),
    (
        "safetensors-header-2tb",
        "whole",
        write(f"{CKPT}/model.safetensors", (1 << 41).to_bytes(8, "little") + b"{}"),
        "model.safetensors",
    ),
    (
        "safetensors-huge-shape",
        "whole",
        write(f"{CKPT}/model.safetensors", HUGE_TENSOR),
        "model.safetensors",
    ),
    (
        "metrics-1mb-line",
        "whole",
        write("metrics.jsonl", b"x" * (1 << 20) + b"\n"),
        "line 1 (1,048,576 bytes) is not a row",
    ),
    (
        "metrics-not-rows",
        "whole",
        write("metrics.jsonl", b'[1]\n{"step": "a"}\n'),
        "line 1 (3 bytes) is not a row",
    ),
    (
        "metrics-sparse-1tb",
        "whole",
        lambda run, m: os.truncate(run / "metrics.jsonl", 1 << 40),
        "1,099,511,627,776 bytes",
    ),
    ("config-list", "whole", write("train_config.json", b"[]"), "is not a JSON object"),
    ("config-1mb", "whole", write("train_config.json", b" " * (1 << 20) + b"{}"), "1,048,576"),
    (
        "config-deep",
        "whole",
        write("train_config.json", b"[" * 100_000),
        "train_config.json is not valid JSON: nested too deeply",
    ),
    (
        "config-nested-40",
        "whole",
        write("train_config.json", json.dumps({"x": nested(40)}).encode()),
        "train_config.json: JSON nested over 32 levels deep; refusing it",
    ),
    (
        "config-python-dict",
        "whole",
        write("train_config.json", b"{'lr': 1}"),
        "train_config.json is not valid JSON: Expecting property name",
    ),
    (
        "metadata-os-system",
        "dcp",
        lambda run, m: (run / CKPT / ".metadata").write_bytes(pickle.dumps(Trap(m))),
        "posix.system is not a checkpoint metadata record",
    ),
    (
        "metadata-dotted-allowed-module",
        "dcp",
        lambda run, m: (run / CKPT / ".metadata").write_bytes(global_pickle(META, "os.system", m)),
        f"{META}.os.system is not",
    ),
    (
        "metadata-dotted-torch",
        "dcp",
        lambda run, m: (run / CKPT / ".metadata").write_bytes(
            global_pickle("torch", "os.system", m)
        ),
        "torch.os.system is not",
    ),
    (
        "metadata-dotted-dtype",
        "dcp",
        lambda run, m: (run / CKPT / ".metadata").write_bytes(
            global_pickle("torch", "float32.__class__", m)
        ),
        "torch.float32.__class__ is not",
    ),
    ("metadata-garbage", "dcp", write(f"{CKPT}/.metadata", os.urandom(1 << 20)), ".metadata"),
    (
        "metadata-outside-file",
        "dcp",
        lambda run, m: redirect_storage(run, "../outside"),
        ".metadata names a data file outside its checkpoint",
    ),
    (
        "metadata-past-end",
        "dcp",
        lambda run, m: redirect_storage(run, None),
        ".metadata names bytes past the end",
    ),
]
FILES = {
    "state.json": f"{CKPT}/state.json",
    "latest": "checkpoints/latest",
    "optimizer.pt": f"{CKPT}/optimizer.pt",
    "model.safetensors": f"{CKPT}/model.safetensors",
    "metrics.jsonl": "metrics.jsonl",
    "train_config.json": "train_config.json",
}
for _name, _rel in FILES.items():
    CASES.append((f"{_name}-fifo", "whole", replace_with(_rel, fifo), _name))
    CASES.append((f"{_name}-dev-zero", "whole", replace_with(_rel, dev_zero), _name))
for _name in (".metadata", "__0_0.distcp", "rng.pt"):
    CASES.append((f"{_name}-fifo", "dcp", replace_with(f"{CKPT}/{_name}", fifo), _name))
    CASES.append((f"{_name}-dev-zero", "dcp", replace_with(f"{CKPT}/{_name}", dev_zero), _name))

FAST = {
    "state-truncated",
    "step-huge",
    "latest-dotdot",
    "optimizer-pickle",
    "metrics-1mb-line",
    "metadata-dotted-allowed-module",
    "metadata-dotted-torch",
    "metadata-os-system",
    "state.json-fifo",
    ".metadata-dev-zero",
}


def redirect_storage(run: Path, path: str | None) -> None:
    """The real .metadata re-pickled with its file index pointing at ``path`` (None: each
    entry's length past the end of its file)."""
    from logitcache.train.checkpoint import _MetadataUnpickler

    file = run / CKPT / ".metadata"
    with open(file, "rb") as fh:
        metadata = _MetadataUnpickler(fh).load()
    for info in metadata.storage_data.values():
        if path is None:
            info.length = 1 << 40
        else:
            info.relative_path = path
    file.write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize(
    "case",
    [c if c[0] in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=lambda c: c[0],
)
def test_a_hostile_run_directory_is_refused_on_resume(
    case, lab, base_runs, reference_caches, train_args, tmp_path
):
    _, kind, damage, needle = case
    run = tmp_path / "run"
    shutil.copytree(base_runs[kind], run, symlinks=True)
    marker = tmp_path / "executed"
    damage(run, marker)

    extra = {"fsdp": True} if kind == "dcp" else {}
    args = train_args(reference_caches["topk"], run, **BASE, **extra, resume=True)
    outcome = lab.run(args, timeout=60)
    line = refused(outcome, needle)
    assert str(run) in line, line  # the file is named with its path
    assert not marker.exists(), "something in the run directory was executed"
    assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb
