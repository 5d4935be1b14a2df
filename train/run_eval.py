"""Held-out evaluation of a finished run, as ``logitcache evaluate RUN`` prints it.

In: a run directory (``OUT`` of ``logitcache train``: ``train_config.json`` and the final
``model/``, with its tokenizer), optionally another cache to evaluate on. Out: the dict of
``logitcache.train.evaluation.evaluate`` (``eval_ce``, ``eval_bits_per_byte``, ...) for the
run's held-out split (its ``--eval-fraction`` and ``--eval-sequences``, or its
``--eval-cache``), or for all of ``cache``; a student of another tokenizer is evaluated on
its own retokenized rows (``--cross-tokenizer`` of the run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from logitcache.core.errors import LogitcacheError
from logitcache.core.untrusted import read_local_text

from .config import RUN_RECORD_KEYS, TrainConfig
from .rundir import CONFIG_LIMIT

__all__ = ["evaluate_run"]


def evaluate_run(
    run: str | Path,
    *,
    cache: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    max_sequences: int | None = None,
) -> dict[str, Any]:
    """``evaluate`` of ``run``'s final model on its held-out sequences, or all of ``cache``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from logitcache.models import load_tokenizer

    from .cache_checks import cross_options
    from .dataset import CacheDataset
    from .evaluation import evaluate

    config = _run_config(Path(run).expanduser())
    model_dir = Path(run).expanduser() / "model"
    if not (model_dir / "config.json").is_file():
        raise LogitcacheError(f"{run} holds no final model (model/config.json): did it finish?")
    tokenizer = load_tokenizer(str(model_dir))
    hf_logging.disable_progress_bar()  # no "Loading weights" bar: evaluate prints one line
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    url, split, fraction = config.cache, "eval", config.eval_fraction
    if cache is not None or config.eval_cache:
        url, split, fraction = cache or config.eval_cache, "all", 0.0
    limit = max_sequences if max_sequences is not None else config.eval_sequences
    data = CacheDataset(
        url,
        split=split,
        eval_fraction=fraction,
        vocab_limit=model.get_output_embeddings().weight.shape[0],
        max_sequences=limit,
        reader_options=config.reader_options(),
        **cross_options(config, tokenizer),
    )
    result = evaluate(model, data, batch_size=batch_size, device=device, tokenizer=tokenizer)
    return {"cache": url, "sequences": len(data), **result}


def _run_config(run: Path) -> TrainConfig:
    """The run's ``train_config.json``, read bounded, as a ``TrainConfig``."""
    path = run / "train_config.json"
    if not path.is_file():
        raise LogitcacheError(f"{run} is not a training run (no train_config.json)")
    text = read_local_text(path, CONFIG_LIMIT, "run config")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise LogitcacheError(f"{path} is not a JSON object")
    try:
        return TrainConfig.from_dict({k: v for k, v in data.items() if k not in RUN_RECORD_KEYS})
    except (TypeError, ValueError) as err:
        raise LogitcacheError(f"{path}: {str(err).splitlines()[0][:200]}") from None
