"""The resume fingerprint is made from each ``TrainConfig`` field's declaration: what a
resumed run may change is left out, caches enter by id, the batch as one global size, paths
by what they name and the student config by its content."""

from __future__ import annotations

import hashlib

from logitcache.train.config import TrainConfig
from logitcache.train.resume_rules import PATH_SETTINGS, resume_fingerprint, settings_differ


def test_each_field_enters_as_its_declaration_says(tmp_path):
    student_config = tmp_path / "student.json"
    student_config.write_text("{}")
    config = TrainConfig(
        cache="c",
        out=str(tmp_path / "run"),
        mix_caches=("m",),
        student_config=str(student_config),
        tokenizer=str(tmp_path),
        batch_size=2,
        grad_accum=3,
        eval_every=5,
    )
    fp = resume_fingerprint(config, ["id-c", "id-m"], 2, loss_module="Custom()")
    assert PATH_SETTINGS == ("student", "student_config", "tokenizer", "eval_cache")
    assert not {"cache", "mix_caches", "batch_size", "grad_accum", "out", "eval_every"} & set(fp)
    assert list(fp)[-4:] == ["loss_module", "cache_id", "mix_cache_ids", "global_batch"]
    assert (fp["cache_id"], fp["mix_cache_ids"], fp["global_batch"]) == ("id-c", ["id-m"], 12)
    digest = hashlib.sha256(b"{}").hexdigest()
    assert (fp["student_config"], fp["tokenizer"]) == (f"sha256:{digest}", str(tmp_path))
    assert "lora_r" not in fp  # added_with: left out at its default
    one = resume_fingerprint(config, ["id-c"], 1)
    assert "mix_cache_ids" not in one and one["global_batch"] == 6

    student_config.write_text('{"x": 1}')
    changed = resume_fingerprint(config, ["id-c", "id-m"], 2, loss_module="Custom()")
    assert settings_differ(fp, changed, config) == [
        f"student_config ({student_config} is not the file the run started with: its content "
        "differs)"
    ]
