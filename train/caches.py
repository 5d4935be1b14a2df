"""The caches of a training run: opened, checked against the settings and each other.

In: a ``TrainConfig``. Out: the main cache's reader, the readers of the caches mixed into
it and the evaluation dataset, or a one-line ``LogitcacheError`` saying what is wrong
(incomplete, empty, all held out, another tokenizer, a target the cache cannot give).
"""

from __future__ import annotations

from logitcache.errors import LogitcacheError
from logitcache.storage import CacheReader

from .config import TrainConfig
from .data import count_split
from .dataset import CacheDataset, tokenizer_mismatch

__all__ = ["check_cache", "cross_options", "eval_dataset", "mixed_readers"]


def check_cache(reader: CacheReader, config: TrainConfig) -> None:
    manifest, url = reader.manifest, reader.loc.shown
    # A partial pull (`pull --shards/--max-tokens`) of a finished cache knows its total and
    # trains on the shards it holds; a teacher pass still running does not, and is refused.
    if not manifest.complete and manifest.n_sequences_total is None:
        raise LogitcacheError(
            f"cache {url} is incomplete (its teacher pass has not finished); "
            "rerun precompute (or `logitcache merge`) first"
        )
    if manifest.n_sequences == 0:
        raise LogitcacheError(f"cache {url} holds no sequences")
    n_train, _ = count_split(reader, config.eval_fraction)
    if n_train == 0:
        raise LogitcacheError(
            f"--eval-fraction {config.eval_fraction} leaves no training sequences in "
            f"{url} ({manifest.n_sequences} sequences)"
        )
    if config.target == "counts" and reader.spec.mode != "sampled":
        raise LogitcacheError("--target counts needs a sampled cache (precompute --samples)")
    if (
        config.target == "probs"
        and reader.spec.mode == "sampled"
        and not (reader.spec.sampled_logprobs)
    ):
        raise LogitcacheError("--target probs needs a cache written with --sampled-logprobs")


def mixed_readers(reader: CacheReader, config: TrainConfig) -> list[CacheReader]:
    """The caches mixed in with the main one; each must share its tokenizer."""
    readers = [CacheReader(url, **config.reader_options()) for url in config.mix_caches]
    for other in readers:
        check_cache(other, config)
        mismatch = tokenizer_mismatch([reader, other])
        if mismatch is not None:
            _, mine, theirs = mismatch
            raise LogitcacheError(
                f"--cache {other.loc.shown} was made with another tokenizer than --cache "
                f"{config.cache} (fingerprint {theirs[:16]} vs {mine[:16]}); "
                "mixed caches must share one tokenizer"
            )
    return readers


def eval_dataset(reader: CacheReader, config: TrainConfig, vocab_rows: int, tokenizer=None):
    """The training cache's held-out split, or all of a separate evaluation cache
    (``tokenizer``: the student's, retokenizing it with --cross-tokenizer)."""
    url, fraction = config.cache, config.eval_fraction
    if config.eval_cache:
        other = CacheReader(config.eval_cache, **config.reader_options())
        mismatch = tokenizer_mismatch([reader, other])
        if mismatch is not None:
            _, mine, theirs = mismatch
            raise LogitcacheError(
                f"--eval-cache {config.eval_cache} was made with another tokenizer "
                f"({theirs[:16]} vs {mine[:16]})"
            )
        url, fraction = config.eval_cache, 1.0
    if fraction == 0:
        return None
    return CacheDataset(
        url,
        split="eval",
        eval_fraction=fraction,
        vocab_limit=vocab_rows,
        max_sequences=config.eval_sequences,
        reader_options=config.reader_options(),
        **cross_options(config, tokenizer),
    )


def cross_options(config: TrainConfig, tokenizer) -> dict:
    """``CacheDataset`` keywords of a student with another tokenizer (none without one)."""
    if config.cross_tokenizer is None:
        return {}
    return {
        "cross_tokenizer": config.cross_tokenizer,
        "student_tokenizer": tokenizer,
        "student_seq_len": config.student_seq_len,
    }
