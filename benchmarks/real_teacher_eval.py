"""Measurements of the real-teacher study: the teacher's reference, students, cache bytes.

In: a held-out cache (for its token sequences), a teacher, a trained student directory, a
cache directory. Out: the teacher's full-vocabulary log-probs at every held-out position
(``teacher_logprobs.npy``, float32 [positions, vocab]) with its own held-out CE; a
student's held-out CE and KL(teacher || student) over the whole vocabulary against them;
and a cache's bytes per token split by component (the fields of each record, and the
container's framing around them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_components", "evaluate_student", "write_reference"]

_ROWS = 256  # positions per chunk of the full-vocabulary math (256 x 49,152 float32 = 50 MB)


def write_reference(teacher: str, held_cache: Path, dest: Path) -> dict[str, Any]:
    """The teacher's log-probs over the whole vocabulary at each held-out position."""
    import torch

    from logitcache.models import load_teacher
    from logitcache.storage import CacheReader

    done = dest / "reference.json"
    if done.is_file():
        return json.loads(done.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(held_cache)
    model, _, _ = load_teacher(teacher, dtype="float32", device="cpu")
    vocab = int(model.config.vocab_size)
    records = list(reader)
    n_positions = sum(len(r.input_ids) - 1 for r in records)
    tmp = dest / ".teacher_logprobs.npy.tmp"
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_positions, vocab))
    ce, n, offset, layout = 0.0, 0, 0, []
    with torch.inference_mode():
        for record in records:
            ids = torch.from_numpy(record.input_ids.astype(np.int64))[None]  # [1, T]
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [T-1, V]
            table[offset : offset + lp.shape[0]] = lp.numpy()
            mask = torch.from_numpy(record.loss_mask[1:].astype(bool))
            ce -= float(lp.gather(1, ids[0, 1:, None])[:, 0][mask].sum())
            n += int(mask.sum())
            layout.append([record.index, offset, lp.shape[0]])
            offset += lp.shape[0]
    table.flush()
    del table
    os.replace(tmp, dest / "teacher_logprobs.npy")
    info = {
        "teacher": teacher,
        "teacher_ce": ce / max(n, 1),
        "positions": n,
        "vocab": vocab,
        "layout": layout,
    }
    done.write_text(json.dumps(info))
    return info


def evaluate_student(model_dir: Path, held_cache: Path, reference: Path) -> dict[str, float]:
    """Held-out CE and KL(teacher || student) summed over the full vocabulary, per position."""
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.storage import CacheReader

    info = json.loads((reference / "reference.json").read_text())
    table = np.load(reference / "teacher_logprobs.npy", mmap_mode="r")  # [P, V] float32
    where = {index: (offset, length) for index, offset, length in info["layout"]}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ce = kl = 0.0
    n = 0
    with torch.inference_mode():
        for record in CacheReader(held_cache):
            offset, length = where[record.index]
            ids = torch.from_numpy(record.input_ids.astype(np.int64))[None]  # [1, T]
            logits = model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
            mask = torch.from_numpy(record.loss_mask[1:].astype(bool))
            for s in range(0, length, _ROWS):
                e = min(s + _ROWS, length)
                rows = mask[s:e]
                student = torch.log_softmax(logits[s:e], -1)[rows]  # [n, V]
                teacher = torch.from_numpy(np.array(table[offset + s : offset + e]))[rows]
                labels = ids[0, 1 + s : 1 + e][rows]
                ce -= float(student.gather(1, labels[:, None]).sum())
                kl += float((teacher.exp() * (teacher - student)).sum())
                n += int(rows.sum())
    return {
        "eval_ce": ce / max(n, 1),
        "eval_kl": kl / max(n, 1),
        "eval_positions": n,
        "teacher_ce": info["teacher_ce"],
    }


def cache_components(cache: Path) -> dict[str, Any]:
    """Bytes per token of a local Arrow cache, by record field and container framing
    (``bench.format_bytes.components``), with the manifest's statistics."""
    from format_bytes import components

    from logitcache.storage import Location, read_manifest

    manifest = read_manifest(Location(str(cache)))
    stats = manifest.stats()
    return {
        "mode": manifest.spec.mode,
        "k": manifest.spec.k,
        "samples": manifest.spec.samples,
        "n_tokens": manifest.n_tokens,
        "bytes_per_token": stats["bytes_per_token"],
        "bytes_per_entry": stats["bytes_per_entry"],
        "entries_per_position": stats["entries_per_position"],
        "mean_covered_mass": stats["mean_covered_mass"],
        "components_per_token": components(cache)["per_token"],
    }
