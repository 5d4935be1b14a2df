"""``TrainConfig``'s settings are grouped by concern (``TrainArgs``, ``EvalArgs``, ...) and
stay flat everywhere else: the constructor, the flags, the recipe keys and ``train_config.json``
(old files included) see one level; the groups are read-only views."""

from __future__ import annotations

import dataclasses
import json

import pytest

from logitcache.core.options import settings
from logitcache.train import config as config_module
from logitcache.train.config import EvalArgs, LossOptions, TrainArgs, TrainConfig

GROUPS = [
    "student_args",
    "loss_options",
    "train_args",
    "eval_args",
    "compute_args",
    "run_args",
    "lora_args",
    "memory_args",
]
# The flat keys before the grouping (train_config.json of runs made then holds these).
FLAT_KEYS = {
    "cache",
    "out",
    "mix_caches",
    "cache_weights",
    "student",
    "student_config",
    "tokenizer",
    "extended_vocab",
    "cross_tokenizer",
    "student_seq_len",
    "trust_remote_code",
    "loss",
    "tail",
    "target",
    "temperature",
    "alpha",
    "beta",
    "steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "schedule",
    "decay_fraction",
    "weight_decay",
    "grad_clip",
    "seed",
    "eval_every",
    "eval_fraction",
    "eval_sequences",
    "eval_cache",
    "save_every",
    "keep_checkpoints",
    "block_shards",
    "chunk_size",
    "loader_workers",
    "device",
    "precision",
    "resume",
    "verify",
    "local_cache",
    "local_cache_gb",
    "quiet",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "merge_lora",
    "fsdp",
    "gradient_checkpointing",
    "optimizer",
    "overwrite",
}


def test_every_setting_is_in_one_group_or_the_config_and_stays_flat():
    config = TrainConfig("c", "o", lr=1e-3, eval_every=5, loss="jsd")  # flat, positional too
    views = [getattr(config, name) for name in GROUPS]
    grouped = [f.name for view in views for f in dataclasses.fields(view)]
    own = ["cache", "out", "mix_caches", "cache_weights"]
    assert sorted(own + grouped) == sorted(FLAT_KEYS)  # each once
    assert {s.key for s in settings(TrainConfig)} == FLAT_KEYS  # flags and recipe keys
    assert config.train_args.lr == 1e-3 and isinstance(config.train_args, TrainArgs)
    assert config.eval_args == EvalArgs(eval_every=5) and config.loss_options.loss == "jsd"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train_args.lr = 1.0  # a view, not a handle on the config


def test_an_old_flat_train_config_json_reads_back(tmp_path):
    saved = {key: getattr(TrainConfig("c", "o"), key) for key in FLAT_KEYS - {"loader_workers"}}
    saved |= {"lr": 1e-3, "num_workers": 3, "world_size": 1, "fingerprint": {}}
    text = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()})
    config = TrainConfig.from_dict(json.loads(text))
    assert (config.lr, config.loader_workers) == (1e-3, 3)
    assert set(config.to_dict()) == FLAT_KEYS


def test_the_groups_are_the_config_modules_dataclasses():
    groups = {type(getattr(TrainConfig("c", "o"), name)) for name in GROUPS}
    assert LossOptions in groups
    assert all(getattr(config_module, g.__name__) is g for g in groups)
