"""The student trainer's settings, typed and checked, and the small pure schedule function."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from logitcache.core.errors import LogitcacheError
from logitcache.core.options import check_choices, include, option, resume_policy, to_argv, view

from .loss_options import LOSSES, TAIL_POLICIES, LossOptions, loss_range_checks

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "RESUME_MAY_CHANGE",
    "RUN_RECORD_KEYS",
    "TAIL_POLICIES",
    "ComputeArgs",
    "EvalArgs",
    "LoraArgs",
    "LossOptions",
    "MemoryArgs",
    "RunArgs",
    "StudentArgs",
    "TrainArgs",
    "TrainConfig",
    "lr_multiplier",
    "resume_settings",
]

# The optimizers of train.optim; kept here, free of torch, so the CLI builds its options
# without importing it (the losses' choices: train.loss_options).
Optimizer = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

# Keys train_config.json holds besides the settings (written by the training loop): skipped
# when the file is read back with --config.
RUN_RECORD_KEYS = frozenset(["world_size", "total_steps", "fingerprint"])


@dataclass(frozen=True)
class StudentArgs:
    """The student: its weights or config, its tokenizer, and what may run."""

    student: str | None = option(None, fingerprint="path")
    """Hub id or directory of a pretrained student."""
    student_config: str | None = option(None, fingerprint="file")
    """A JSON/YAML transformers config (with model_type) for a student from scratch."""
    tokenizer: str | None = option(None, fingerprint="path")
    """The student's tokenizer (default: a pretrained student's own; else, and for a student
    from scratch, the one stored in the cache; caches made before format 1.1 store none: pass
    it, or add it with `logitcache tokenizer CACHE --add`)."""
    extended_vocab: bool = False
    """Accept a student tokenizer that differs from the cache's (it must extend it)."""
    cross_tokenizer: Literal["exact", "prefix", "chain"] | None = option(
        None, none="off", added_with="cross_tokenizer"
    )
    """Train a student whose tokenizer differs from the cache's (any family): the cache's
    rows are retokenized by the student's tokenizer (--tokenizer, or the student's own) and
    the teacher's targets are moved onto its vocabulary where both tokenizations meet.
    exact: teacher tokens that are exactly a student token keep their mass, the rest goes
    to the tail; prefix: the rest goes to the student's longest token that starts it;
    chain: as exact, and a student token spanning several teacher tokens (":\n" for ":"
    then "\n") gets the chained probability of the true text, p(":") x p("\n" | ":")."""
    student_seq_len: int | None = option(None, added_with="cross_tokenizer")
    """--cross-tokenizer: student tokens kept per cache row (default the cache's sequence
    length); a row the student spells in more tokens is cut there."""
    trust_remote_code: bool = False
    """Run the Python code a hub student or --tokenizer ships with (only if you trust it);
    never code stored in a cache."""


@dataclass(frozen=True)
class TrainArgs:
    """How long, in which batches, with which optimizer settings and schedule."""

    steps: int | None = option(None, resume="may-grow")
    """Optimizer steps (default: one epoch when neither steps nor epochs is given)."""
    epochs: float | None = option(None, resume="may-grow")
    """Epochs over the cache (default 1 when neither steps nor epochs is given)."""
    batch_size: int = option(8, fingerprint="global_batch")
    """Sequences per micro-batch per process."""
    grad_accum: int = option(1, fingerprint="global_batch")
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The learning rate decays to lr * min_lr_ratio (cosine and wsd)."""
    warmup_steps: int = 0
    """Steps of linear warmup."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine, wsd (warmup-stable-decay) or constant (after warmup)."""
    decay_fraction: float = 0.2
    """wsd: share of the steps spent decaying."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: off)."""
    seed: int = 0
    """Seeds a from-scratch student's weights and the data order."""


@dataclass(frozen=True)
class EvalArgs:
    """Evaluation and checkpoints: on what, how often, how many are kept."""

    eval_every: int = option(0, resume="may-change")
    """Evaluate every N steps (0: only at the end)."""
    eval_fraction: float = 0.02
    """Share of the cache's sequences held out (by a stable hash of their index)."""
    eval_sequences: int = 256
    """At most this many held-out sequences per evaluation."""
    eval_cache: str | None = option(None, fingerprint="path")
    """A separate cache (same tokenizer) to evaluate on, all of it, instead of the split."""
    save_every: int = option(0, resume="may-change")
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = option(2, resume="may-change")
    """How many of the latest checkpoints are kept."""


@dataclass(frozen=True)
class ComputeArgs:
    """Data loading and compute: the teacher targets read, the shuffle window, the
    loss's chunks, loader workers, device and precision."""

    target: Literal["auto", "counts", "probs"] = "auto"
    """Sampled caches: counts (unbiased counts/N) or probs (stored log-probs); auto picks."""
    block_shards: int = 4
    """Shuffle window: sequences are shuffled within blocks of this many shards."""
    chunk_size: int = 1024
    """Rows per chunk of the loss over the vocabulary."""
    loader_workers: int = option(1, resume="may-change", old_key="num_workers")
    """DataLoader workers decoding shards in the background (0: in the main process)."""
    device: str = option("auto", resume="may-change")
    """auto, cuda, cuda:N, cpu or mps."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto (bfloat16 autocast on CUDA, float32 elsewhere), bf16 or fp32."""


@dataclass(frozen=True)
class RunArgs:
    """This invocation: resume or overwrite, shard verification, the local shard cache,
    output."""

    resume: bool = option(False, resume="may-change")
    """Continue from the newest complete checkpoint in out."""
    overwrite: bool = option(False, resume="may-change")
    """Replace the run already in --out (its checkpoints, model, metrics.jsonl and
    train_config.json; other files stay); without it, or --resume, such an --out is refused."""
    verify: bool = option(True, resume="may-change")
    """Check each shard's sha256 when first opened."""
    local_cache: str | None = option(None, resume="may-change")
    """Remote caches: where downloaded shards are kept (default $LOGITCACHE_HOME/shards)."""
    local_cache_gb: float | None = option(None, resume="may-change")
    """Remote caches: size limit of the local shard cache in GB (default 20); least recently
    used shards are evicted."""
    quiet: bool = option(False, resume="may-change")
    """No progress bars or status lines."""


@dataclass(frozen=True)
class LoraArgs:
    """LoRA adapters instead of training all weights."""

    lora_r: int = option(0, added_with="lora_r")
    """LoRA rank: train low-rank adapters instead of all weights (0: off; needs ``peft``)."""
    lora_alpha: float | None = option(None, added_with="lora_r")
    """LoRA scaling numerator (default: 2 x lora_r); updates are scaled by alpha / r."""
    lora_targets: tuple[str, ...] = option((), added_with="lora_r")
    """Module names that get adapters, e.g. q_proj,v_proj (default: every linear layer but
    the LM head, PEFT's ``all-linear``)."""
    lora_dropout: float = option(0.0, added_with="lora_r")
    """Dropout on the adapters' input."""
    merge_lora: bool = option(False, resume="may-change")  # only the final save
    """Also save the student with the adapters merged in, to ``OUT/model-merged``."""


@dataclass(frozen=True)
class MemoryArgs:
    """Memory at scale: sharding, recomputation, optimizer state."""

    fsdp: bool = option(False, added_with="fsdp")
    """Shard the student's weights, gradients and optimizer state over the torchrun ranks
    (FSDP2): 1/N of the 16 B per parameter each, so a student too large for one GPU trains
    on several. Checkpoints are then sharded (torch.distributed.checkpoint)."""
    gradient_checkpointing: bool = option(False, resume="may-change")
    """Keep only each decoder layer's input for backward and rerun the layer there: layer
    activations drop ~(8 h + 4 i) / h-fold for ~1/3 more compute; the loss is unchanged."""
    optimizer: Literal[Optimizer] = option("adamw", added_with="optimizer")
    """adamw (torch, 8 B of state per parameter) or adamw8bit (torchao's 8-bit AdamW, ~2 B;
    needs torchao installed)."""


# What a resumed run may do with each setting, and how it enters the resume fingerprint, is
# declared on its field (``option(..., resume=..., added_with=..., fingerprint=...)``, default
# must-match, as its value; see ``logitcache.core.options.OptionMeta`` and
# ``train/resume_rules.py``, which applies them).
@dataclass(frozen=True)
@include(StudentArgs, LossOptions, TrainArgs, EvalArgs, ComputeArgs, RunArgs, LoraArgs, MemoryArgs)
class TrainConfig:
    """Everything ``logitcache train`` needs; saved resolved as ``train_config.json``.

    Its settings are grouped by concern, as litgpt's ``TrainArgs`` / ``EvalArgs``: what to
    train on and where the run goes are declared here, the rest in the groups it includes,
    flat (``options.include``): ``TrainConfig(lr=1e-3)``, the flags, the recipe keys and
    ``train_config.json`` know no groups. Each group is also a read-only view
    (``config.train_args.lr``).
    """

    # -- what to train on, where the run goes ------------------------------------------------------
    cache: str = option(rest_into="mix_caches", fingerprint="cache_id")
    """Cache directory (or URL) written by precompute; repeat --cache to mix several caches."""
    out: str = option(resume="may-change")
    """Output directory: checkpoints, metrics.jsonl, the final model in ``model/``."""
    mix_caches: tuple[str, ...] = option((), cli=False, fingerprint="mix_cache_ids")
    """More caches (same tokenizer) mixed into the stream with ``cache`` (the 2nd, 3rd...
    ``--cache`` on the command line)."""
    cache_weights: tuple[float, ...] = ()
    """Mixing weights of the caches, in --cache order, e.g. 3,1 (any positive scale; default:
    by size)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mix_caches", tuple(self.mix_caches))
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else self.lora_targets
        names = tuple(n.strip() for t in targets for n in t.split(",") if n.strip())
        object.__setattr__(self, "lora_targets", names)  # "q_proj,v_proj" or a list of names
        object.__setattr__(self, "cache_weights", tuple(float(w) for w in self.cache_weights))
        n_caches, weights = 1 + len(self.mix_caches), self.cache_weights
        if weights and (len(weights) != n_caches or min(weights) <= 0):
            raise LogitcacheError(
                f"--cache-weights {','.join(f'{w:g}' for w in weights)}: expected {n_caches} "
                "positive numbers, one per --cache, in the same order"
            )
        check_choices(self)
        for ok, message in [*self._range_checks(), *self._lora_checks()]:
            if not ok:
                raise LogitcacheError(message)

    def _range_checks(self) -> list[tuple[bool, str]]:
        """(holds, what to tell the user) for every numeric setting."""
        ef = self.eval_fraction
        loss = [
            (ok, f"--{k} {must}, got {getattr(self, k)}") for ok, k, must in loss_range_checks(self)
        ]
        return [
            *loss,
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (0 <= self.eval_fraction < 1, f"--eval-fraction must be in [0, 1), got {ef}"),
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
            (self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}"),
            (self.block_shards >= 1, f"--block-shards must be >= 1, got {self.block_shards}"),
            (
                self.loader_workers >= 0,
                f"--loader-workers must be >= 0, got {self.loader_workers}",
            ),
            (self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}"),
            (
                self.keep_checkpoints >= 1,
                f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}",
            ),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (0: off), got {self.grad_clip}"),
            (
                0 < self.decay_fraction <= 1,
                f"--decay-fraction must be in (0, 1], got {self.decay_fraction}",
            ),
            (self.eval_sequences >= 1, f"--eval-sequences must be >= 1, got {self.eval_sequences}"),
            (
                self.student_seq_len is None or self.student_seq_len >= 2,
                f"--student-seq-len must be >= 2, got {self.student_seq_len}",
            ),
            (
                self.cross_tokenizer is not None or self.student_seq_len is None,
                "--student-seq-len needs --cross-tokenizer",
            ),
            (
                not (self.cross_tokenizer and self.extended_vocab),
                "give --cross-tokenizer or --extended-vocab, not both",
            ),
            (
                self.local_cache_gb is None or self.local_cache_gb > 0,
                f"--local-cache-gb must be > 0, got {self.local_cache_gb}",
            ),
        ]

    def _lora_checks(self) -> list[tuple[bool, str]]:
        """(holds, what to tell the user) for the LoRA settings and what they exclude."""
        return [
            (self.lora_r >= 0, f"--lora-r must be >= 0 (0: off), got {self.lora_r}"),
            (
                self.lora_r > 0
                or (
                    self.lora_alpha is None
                    and not self.lora_targets
                    and not self.lora_dropout
                    and not self.merge_lora
                ),
                "--lora-alpha, --lora-targets, --lora-dropout and --merge-lora need --lora-r",
            ),
            (
                self.lora_alpha is None or self.lora_alpha > 0,
                f"--lora-alpha must be > 0, got {self.lora_alpha}",
            ),
            (not (self.resume and self.overwrite), "give --resume or --overwrite, not both"),
            (
                0 <= self.lora_dropout < 1,
                f"--lora-dropout must be in [0, 1), got {self.lora_dropout}",
            ),
            (
                not (self.fsdp and self.lora_r),
                "--fsdp with --lora-r is not supported: LoRA freezes the base weights (no "
                "gradients or optimizer state for them), so try it without --fsdp",
            ),
        ]

    # -- the groups, as read-only views ---------------------------------------------------------
    @property
    def student_args(self) -> StudentArgs:
        return view(StudentArgs, self)

    @property
    def loss_options(self) -> LossOptions:
        return view(LossOptions, self)

    @property
    def train_args(self) -> TrainArgs:
        return view(TrainArgs, self)

    @property
    def eval_args(self) -> EvalArgs:
        return view(EvalArgs, self)

    @property
    def compute_args(self) -> ComputeArgs:
        return view(ComputeArgs, self)

    @property
    def run_args(self) -> RunArgs:
        return view(RunArgs, self)

    @property
    def lora_args(self) -> LoraArgs:
        return view(LoraArgs, self)

    @property
    def memory_args(self) -> MemoryArgs:
        return view(MemoryArgs, self)

    @property
    def caches(self) -> list[str]:
        """All training caches, the main one first."""
        return [self.cache, *self.mix_caches]

    def reader_options(self) -> dict[str, Any]:
        """Keyword arguments of every ``CacheReader`` this run opens."""
        size = None if self.local_cache_gb is None else int(self.local_cache_gb * 1e9)
        return {"verify": self.verify, "local_cache": self.local_cache, "local_cache_bytes": size}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), as saved and compared on resume."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        data = {"loader_workers": data["num_workers"], **data} if "num_workers" in data else data
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_argv(self) -> list[str]:
        """The ``logitcache train`` flags that make this config."""
        return to_argv(self)


RESUME_MAY_CHANGE = frozenset(
    name for name, meta in resume_policy(TrainConfig).items() if meta.resume != "must-match"
)
"""Settings a resumed run may change (may-grow ones too: steps and epochs, whose growth the
resume checks); any other difference is refused. Declared on each field."""


def resume_settings(config: TrainConfig) -> dict[str, Any]:
    """``config.to_dict()`` less what a resumed run may change, and less each setting added
    after runs that must still resume while it is unused (``added_with`` at its default)."""
    policy, values = resume_policy(TrainConfig), config.to_dict()
    unused = {
        name
        for name, meta in policy.items()
        if meta.added_with and values[meta.added_with] == _DEFAULTS[meta.added_with]
    }
    return {k: v for k, v in values.items() if k not in RESUME_MAY_CHANGE and k not in unused}


_DEFAULTS = TrainConfig(cache="", out="").to_dict()


def lr_multiplier(
    step: int,
    total: int,
    *,
    warmup: int,
    schedule: str,
    min_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(total * decay_fraction))
        start = total - decay_steps
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / decay_steps)
        return 1.0 - (1.0 - min_ratio) * progress
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
