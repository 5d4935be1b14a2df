"""The teacher pass's settings, typed and checked: ``PrecomputeConfig``.

In: values from the library, a recipe file or flags (``logitcache precompute``'s options are
made from these fields and their docstrings; see ``logitcache.core.options``). Out: a frozen,
validated config, and the cache spec it writes with a given teacher (``make_spec``). A cache's
manifest records every setting that shapes its bytes; read back (``read_recipe``: ``--config
CACHE``) they make the same cache again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from logitcache.core.errors import LogitcacheError
from logitcache.core.identity import config_fingerprint, tokenizer_identity, weights_fingerprint
from logitcache.core.options import check_choices, option, to_argv
from logitcache.core.untrusted import redact
from logitcache.storage import FORMAT_VERSION, CacheSpec, default_codecs
from logitcache.storage.formats import check_format_version, format_class

from .corpus import CorpusSpec, corpus_identity
from .defaults import DEFAULT_SAMPLES

__all__ = [
    "PrecomputeConfig",
    "check_teacher_fits",
    "make_spec",
    "read_recipe",
    "settings_from_spec",
]


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything ``logitcache precompute`` needs; what shapes the bytes is in the manifest."""

    teacher: str
    """Hub id or local directory of any AutoModelForCausalLM, or a local .gguf file (or a
    directory holding one); its tokenizer is used."""
    out: str
    """Cache directory or URL."""
    corpus: CorpusSpec
    top_k: int | None = None
    """Store the k most probable ids per position (topk mode)."""
    samples: int | None = option(
        None,
        help=f"Store the distinct ids of N draws per position with counts (sampled mode, 1..255) "
        f"[default: {DEFAULT_SAMPLES} when neither --top-k nor --bytes-per-token is given; see "
        "docs/benchmarks.md].",
    )
    """Store the distinct ids of N draws per position, with counts (sampled mode, 1..255)."""
    bytes_per_token: float | None = None
    """Sampled mode with the largest N (1..255) whose cache fits this many bytes per token, as
    measured by writing ~8k tokens of sequences spread over the corpus's first 1,024 (instead
    of --top-k / --samples)."""
    sampled_logprobs: bool = False
    """Sampled mode: also store the exact log-probs of the drawn ids."""
    seed: int = 0
    """Seeds the draws of sampled mode, per sequence."""
    container: Literal["arrow", "zarr"] = "arrow"
    """Shard container: Arrow IPC files or Zarr v3 arrays."""
    logprob_codec: Literal["lossy", "float16", "float32"] = "lossy"
    """How log-probs are stored: lossy (quantized gaps), float16 or float32."""
    logprob_step: float = 1 / 32
    """Quantization step of the lossy codec, in nats (error <= step/2 per log-prob)."""
    shard_sequences: int = 256
    """Sequences per shard (the unit of resume, verification and parallel work)."""
    format_version: int = FORMAT_VERSION
    """Cache format to write: 2 (smaller, faster to decode) or 1 (also readable by logitcache
    releases from before format 2). Readers read both."""
    dtype: Literal["bfloat16", "float16", "float32"] | None = option(None, none="auto")
    """Teacher dtype: bfloat16, float16, float32; None (auto) = the model's own."""
    device: str = "auto"
    """auto, cuda, cuda:N, cpu or mps."""
    teacher_revision: str | None = None
    """Hub revision (commit, tag or branch) of the teacher and its tokenizer to pin."""
    trust_remote_code: bool = False
    """Run the Python code a hub teacher ships with (only for teachers you trust)."""
    device_map: str | None = None
    """``auto`` spreads a teacher larger than one GPU over the visible GPUs (under torchrun,
    over this rank's share of the node's GPUs); needs ``accelerate``."""
    tensor_parallel: int = option(1, resume="may-change")
    """Ranks per teacher copy: under torchrun, each group of N consecutive ranks loads one copy
    of the teacher split over its N GPUs (transformers' tensor parallelism, ``tp_plan="auto"``)
    and runs the same batches; WORLD_SIZE / N groups are the workers. For a teacher larger
    than one GPU at every GPU's speed (docs/distributed.md)."""
    batch_tokens: int = 16384
    """Tokens per teacher forward (padding included); halved on out-of-memory. Memory beyond
    the weights grows with it by the forward's activations alone, ~40 KB per token at --seq-len
    2048 for SmolLM2-135M (hidden 576, float32, CPU: peak RSS 1.5-1.6 GB at the default, 2.2 GB
    at 32,768, weights included): the logits are made a chunk of positions at a time, ~64 MB
    of float32 on CPU (~512 MB on a GPU), whatever the batch (docs/benchmarks.md,
    "Teacher-pass memory")."""
    num_workers: int = option(
        1,
        flag_default=None,
        help="Split the work over N workers (default: torchrun's WORLD_SIZE, else 1).",
    )
    """Split the work over this many workers (shard j belongs to worker j % num_workers)."""
    worker_index: int = option(0, flag_default=None)
    """This worker's index (0..num_workers-1)."""

    def __post_init__(self) -> None:
        check_choices(self)
        chosen = [self.top_k, self.samples, self.bytes_per_token]
        if sum(value is not None for value in chosen) != 1:
            raise LogitcacheError(
                "choose exactly one of --top-k K, --samples N or --bytes-per-token B"
            )
        if self.top_k is not None and self.top_k < 1:
            raise LogitcacheError(f"--top-k must be >= 1, got {self.top_k}")
        if self.samples is not None and not 1 <= self.samples <= 255:
            raise LogitcacheError(f"--samples must be in 1..255, got {self.samples}")
        if self.bytes_per_token is not None and not self.bytes_per_token > 0:
            raise LogitcacheError(f"--bytes-per-token must be > 0, got {self.bytes_per_token}")
        if self.sampled_logprobs and self.top_k is not None:
            raise LogitcacheError("--sampled-logprobs needs --samples or --bytes-per-token")
        if self.seed < 0:
            raise LogitcacheError(f"--seed must be >= 0, got {self.seed}")
        if self.shard_sequences < 1:
            raise LogitcacheError(f"--shard-sequences must be >= 1, got {self.shard_sequences}")
        if self.batch_tokens < 1:
            raise LogitcacheError(f"--batch-tokens must be >= 1, got {self.batch_tokens}")
        if not 0 <= self.worker_index < self.num_workers:
            raise LogitcacheError(
                f"--worker-index {self.worker_index} must be in 0..{self.num_workers - 1}"
            )
        check_format_version(self.format_version)
        if not 0 < self.logprob_step <= 1:
            raise LogitcacheError(f"--logprob-step must be in (0, 1], got {self.logprob_step}")
        if self.tensor_parallel < 1:
            raise LogitcacheError(f"--tensor-parallel must be >= 1, got {self.tensor_parallel}")
        if self.tensor_parallel > 1 and self.device_map is not None:
            raise LogitcacheError(
                f"--tensor-parallel {self.tensor_parallel} and --device-map {self.device_map} "
                "each place the teacher: choose one"
            )
        if self.tensor_parallel > 1 and self.bytes_per_token is not None:
            raise LogitcacheError(
                f"--tensor-parallel {self.tensor_parallel} does not calibrate --bytes-per-token: "
                "calibrate in one process (--device-map auto), then pass the --samples N it chose"
            )
        if self.device_map is not None and self.device != "auto":
            raise LogitcacheError(
                f"--device-map {self.device_map} places the teacher itself: drop --device "
                f"{self.device}"
            )

    @property
    def mode(self) -> str:
        return "topk" if self.top_k is not None else "sampled"

    def content_settings(self) -> dict[str, Any]:
        """The settings that shape the cache's bytes (workers, batch size, device do not)."""
        return {
            "seed": self.seed,
            "max_tokens": self.corpus.max_tokens,
            "logprob_codec": self.logprob_codec,
            "logprob_step": self.logprob_step,
        }

    def to_argv(self) -> list[str]:
        """The ``logitcache precompute`` flags that make this config."""
        return to_argv(self)


def check_teacher_fits(config: PrecomputeConfig, model_config: Any) -> None:
    """Refuse a --top-k above the teacher's vocabulary or a --seq-len above its positions."""
    vocab = int(model_config.vocab_size)
    if config.top_k is not None and config.top_k > vocab:
        raise LogitcacheError(
            f"--top-k {config.top_k} is larger than the teacher's vocabulary ({vocab})"
        )
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and config.corpus.seq_len > max_pos:
        raise LogitcacheError(
            f"--seq-len {config.corpus.seq_len} exceeds the teacher's maximum positions ({max_pos})"
        )


def make_spec(config: PrecomputeConfig, tokenizer: Any, model_config: Any) -> CacheSpec:
    """The cache spec ``config`` writes with this teacher (refused if they do not fit)."""
    check_teacher_fits(config, model_config)
    vocab = int(model_config.vocab_size)
    codecs = default_codecs(
        vocab,
        logprobs=config.logprob_codec,
        step=config.logprob_step,
        format_version=config.format_version,
        mode=config.mode,
    )
    seq_len, per_shard = config.corpus.seq_len, config.shard_sequences
    return CacheSpec(
        mode=config.mode,
        vocab_size=vocab,
        seq_len=config.corpus.seq_len,
        pack=config.corpus.pack,
        container=config.container,
        codecs=codecs,
        shard_sequences=config.shard_sequences,
        k=config.top_k,
        samples=config.samples,
        sampled_logprobs=config.sampled_logprobs,
        teacher={
            "name_or_path": config.teacher,
            "revision": config.teacher_revision or getattr(model_config, "_commit_hash", None),
            "config_sha256": config_fingerprint(model_config),
            "weights_sha256": weights_fingerprint(config.teacher),
            "dtype": config.dtype or "auto",
        },
        tokenizer=tokenizer_identity(tokenizer, config.teacher),
        corpus=corpus_identity(config.corpus),
        settings=config.content_settings(),
        batch_sequences=format_class(config.format_version).group_sequences(seq_len, per_shard),
    )


def settings_from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that made a cache, from its manifest's spec (recipe keys).

    They are the ones that shape its bytes; device, batch size, workers and streaming do not
    (docs/design.md), so a teacher pass with these writes the same cache. The teacher
    revision is the one resolved at the time (a hub commit), which pins an unpinned run.
    """
    teacher, corpus, content = spec["teacher"], spec["corpus"], spec["settings"]
    if corpus.get("kind") == "hub":
        data = {
            "data": [corpus["name"]],
            "data_config": corpus.get("config"),
            "split": corpus.get("split", "train"),
            "data_revision": corpus.get("revision"),
        }
    else:
        data = {"data": [f["path"] for f in corpus["files"]]}
    dtype = teacher.get("dtype")
    return {
        "teacher": teacher["name_or_path"],
        "teacher_revision": teacher.get("revision"),
        "dtype": None if dtype in (None, "auto") else dtype,
        **data,
        "text_field": corpus.get("text_field", "text"),
        "messages_field": corpus.get("messages_field"),
        "max_tokens": content.get("max_tokens"),
        "seq_len": spec["seq_len"],
        "pack": spec["pack"],
        "top_k": spec["k"],
        "samples": spec["samples"],
        "sampled_logprobs": spec["sampled_logprobs"],
        "seed": content.get("seed", 0),
        "container": spec["container"],
        "logprob_codec": content.get("logprob_codec", "lossy"),
        "logprob_step": content.get("logprob_step", 1 / 32),
        "shard_sequences": spec["shard_sequences"],
        "format_version": 1 if spec.get("batch_sequences") is None else 2,
    }


def read_recipe(path: str) -> dict[str, Any]:
    """The ``precompute`` recipe of a cache (directory, URL or its manifest.json) whose
    manifest says how it was made (a YAML/JSON recipe file the CLI reads itself: recipes
    live above the stages)."""
    from logitcache.storage import Location, read_manifest

    if path.endswith("manifest.json"):
        path = path[: -len("manifest.json")].rstrip("/") or "."
    try:
        manifest = read_manifest(Location(path))
    except LogitcacheError as err:
        raise LogitcacheError(
            f"--config {redact(path)} (a .yaml/.json recipe or a cache): {err}"
        ) from None
    try:
        return settings_from_spec(manifest.spec.to_dict())
    except (KeyError, TypeError) as err:
        raise LogitcacheError(
            f"--config {redact(path)}: its manifest does not record how it was made (no {err})"
        ) from None
