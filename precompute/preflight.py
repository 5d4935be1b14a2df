"""``logitcache precompute --dry-run``: the checks a teacher pass makes before its first
forward, without loading or hashing the teacher's weights.

In: a ``PrecomputeConfig``. Out: one line saying what the pass would do, or the one-line
``LogitcacheError`` of the run itself: the corpus's local files are missing or of an
unsupported type, the teacher's tokenizer or config does not load, --top-k or --seq-len
do not fit the teacher, --tensor-parallel cannot split it, --out is a file. A hub teacher
or dataset is named, not opened past its config and tokenizer (as the run does, they are
downloaded from the hub).
"""

from __future__ import annotations

from pathlib import Path

from logitcache.core.errors import LogitcacheError
from logitcache.models import check_tensor_parallel, load_teacher_config, load_tokenizer

from .config import PrecomputeConfig, check_teacher_fits
from .corpus import resolve_files

__all__ = ["dry_run"]


def dry_run(config: PrecomputeConfig) -> str:
    """Every check of the pass's setup but the weights' hash; returns one line."""
    tokenizer = load_tokenizer(
        config.teacher, revision=config.teacher_revision, trust_remote_code=config.trust_remote_code
    )
    model_config = load_teacher_config(
        config.teacher, revision=config.teacher_revision, trust_remote_code=config.trust_remote_code
    )
    check_teacher_fits(config, model_config)
    if config.tensor_parallel > 1:
        check_tensor_parallel(model_config, config.tensor_parallel, config.teacher)
    files = resolve_files(config.corpus)
    out = Path(config.out).expanduser()
    if "://" not in config.out and out.exists() and not out.is_dir():
        raise LogitcacheError(f"--out {config.out} is a file: give a directory (new or empty)")
    corpus = "a hub dataset" if files is None else f"{len(files)} local file(s)"
    there = "a cache to resume or check" if (out / "manifest.json").exists() else "new"
    return (
        f"dry run: all checks passed. Teacher {config.teacher} ({len(tokenizer):,} tokens, "
        f"vocabulary {int(model_config.vocab_size):,}) over {corpus}; --out {config.out}: "
        f"{there}"
    )
