"""The loss settings are declared once (``LossOptions``) and every user takes them from there:
``TrainConfig``'s flags and recipe keys, ``DistillationLoss`` and ``distill_loss``."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import pytest

from logitcache.core.errors import LogitcacheError
from logitcache.core.options import include, settings
from logitcache.train import DistillationLoss
from logitcache.train.config import TrainConfig
from logitcache.train.loss_options import LOSS_OPTIONS, LossOptions


def test_train_config_includes_the_loss_options_as_its_own_flat_fields():
    by_key = {s.key: s for s in settings(TrainConfig)}
    for s in settings(LossOptions):
        flag = by_key[s.key]
        assert (flag.default, flag.help, flag.choices) == (s.default, s.help, s.choices)
    names = [f.name for f in fields(TrainConfig)]
    at = names.index("loss")
    assert names[at : at + len(LOSS_OPTIONS)] == list(LOSS_OPTIONS)
    config = TrainConfig(cache="c", out="o", loss="jsd", beta=0.3, alpha=0.2)
    expected = LossOptions("jsd", alpha=0.2, beta=0.3)
    assert config.loss_options == expected
    assert DistillationLoss.from_config(config).loss_options == expected
    assert config.to_dict()["beta"] == 0.3  # train_config.json stays flat


def test_one_range_check_names_the_flag_or_the_argument():
    message = "--temperature must be > 0, got 0.0"
    with pytest.raises(LogitcacheError, match=re.escape(message)):
        TrainConfig(cache="c", out="o", temperature=0.0)
    with pytest.raises(ValueError, match=re.escape(message[2:])):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"^beta must be in \(0, 1\), got 1.0$"):
        LossOptions(beta=1.0)


def test_include_refuses_a_field_declared_twice():
    @dataclass(frozen=True)
    class Group:
        x: int = 1
        """An x."""

    with pytest.raises(TypeError, match="already has 'x'"):

        @include(Group)
        class B:
            x: int = 2
