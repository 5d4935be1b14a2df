"""The teacher pass: corpus in, compressed cache out; resumable and splittable across workers.

In: a ``PrecomputeConfig``. Out: a cache (``logitcache.storage``) whose shard j holds
sequences [j*S, (j+1)*S) of the corpus with the teacher's sparse next-token distributions.

Three stages overlap: a reader thread tokenizes and packs the corpus into per-shard work,
the main thread runs the teacher and extracts top-k / samples on the device, and a writer
thread encodes and publishes shards, so the teacher never waits on the disk. Work is
assigned by shard (``j % num_workers == worker``) and a shard's bytes depend only on its
sequences, so any number of workers, any batch size and any number of restarts give the
same cache.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from logitcache.core.errors import LogitcacheError
from logitcache.core.progress import Reporter, human_bytes
from logitcache.models import (
    load_teacher,
    load_teacher_config,
    load_tokenizer,
    split_output_head,
)
from logitcache.storage import CacheSpec, Location, Manifest, SequenceRecord

from .blocks import TokenStore, remove_blocks
from .calibrate import calibrate, check_workers_agree, samples_in_cache
from .config import PrecomputeConfig, make_spec
from .packing import CorpusStats, iter_sequences
from .ranks import (
    device_map_memory,
    launched_as_ranks,
    merge_when_all_ranks_are_done,
    rank_device,
    ranks_group,
)
from .shares import plan_share
from .sparse import Logits, SparseTargets, sample_generator, sampled_targets, topk_targets
from .tensor_parallel import (
    TensorParallelGroup,
    from_first_rank,
    group_writer,
    tensor_parallel_group,
)
from .writing import ShardWriter

__all__ = [
    "Pipeline",
    "PrecomputeConfig",
    "PrecomputeResult",
    "make_spec",
    "run_precompute",
    "sequence_record",
]


@dataclass
class PrecomputeResult:
    manifest: Manifest | None
    """The complete manifest, or None while other workers are still running."""
    teacher_tokens: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    wall_s: float = 0.0
    teacher_s: float = 0.0
    bytes_written: int = 0
    corpus: CorpusStats = field(default_factory=CorpusStats)
    already_complete: bool = False


@dataclass
class _ShardWork:
    shard: int
    sequences: list[tuple[int, Any]]  # (global index, PackedSequence)


_END = object()
_PAD_MULTIPLE = 64  # tokens; see Pipeline._width


def run_precompute(config: PrecomputeConfig, reporter: Reporter | None = None) -> PrecomputeResult:
    """Run (or resume) the teacher pass of ``config``; see the module docstring.

    Under torchrun (``config`` naming this rank as its worker) every rank returns the
    complete manifest, which rank 0 writes once all ranks are done.
    """
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    tp = config.tensor_parallel
    launched = launched_as_ranks(config.worker_index, config.num_workers, tp)
    # Workers tokenize only their blocks of the corpus and meet once in between (shares.py);
    # the ranks of a tensor-parallel group read the whole corpus instead (they must see the
    # same work in the same order), so there the world group is made only for the merge.
    shares = _reads_its_share(config)
    with ranks_group(launched and shares) as meet:
        with tensor_parallel_group(tp, config.worker_index, config.num_workers) as group:
            result = _run_worker(config, reporter, meet, group)
        if launched:
            result.manifest = merge_when_all_ranks_are_done(config.out, result.manifest)
    complete = result.manifest is not None and result.manifest.complete
    if complete and shares and (config.worker_index == 0 or not launched):
        remove_blocks(Location(config.out))  # the shards hold every token now
    result.wall_s = time.perf_counter() - start
    return result


def _run_worker(
    config: PrecomputeConfig,
    reporter: Reporter,
    meet: Callable[[], None] | None = None,
    group: TensorParallelGroup | None = None,
) -> PrecomputeResult:
    """This worker's shards; the complete manifest if it finished last, else None (and None
    on the ranks of a tensor-parallel group that do not write).

    ``meet``: the torchrun ranks' barrier, which every rank reaches once its blocks of the
    corpus are tokenized (``shares.py``)."""
    tokenizer = load_tokenizer(
        config.teacher, revision=config.teacher_revision, trust_remote_code=config.trust_remote_code
    )
    model_config = load_teacher_config(
        config.teacher, revision=config.teacher_revision, trust_remote_code=config.trust_remote_code
    )
    teacher = None  # (model, device) when loaded early, to calibrate --bytes-per-token
    if config.bytes_per_token is not None:
        config, spec, teacher = _budget(config, tokenizer, model_config, reporter)
    else:
        # hashes the teacher's weights (one rank of a tensor-parallel group, for all of it)
        spec = from_first_rank(group, lambda: make_spec(config, tokenizer, model_config))
    result = PrecomputeResult(manifest=None)
    with group_writer(config.out, spec, group, config.worker_index, config.num_workers) as writer:
        if writer.complete:
            reporter.log(f"{config.out} is already complete: nothing to do")
            result.manifest, result.already_complete = writer.manifest, True
            return result
        writer.attach_tokenizer(tokenizer)  # the cache carries its tokenizer (format >= 1.1)
        done = sum(1 for s in writer.manifest.shards if writer.owns(s.index))
        if done:
            reporter.log(f"resuming: {done} shards of this worker are already complete")
        model, device = teacher or _teacher(config)
        pipeline = Pipeline(config, spec, tokenizer, model, device, writer, reporter, result)
        pipeline.meet = meet
        pipeline.run()
    if teacher is not None and config.num_workers > 1:
        check_workers_agree(config)  # workers that calibrated apart chose the same N
    return result


def _reads_its_share(config: PrecomputeConfig) -> bool:
    """Whether this worker tokenizes only its blocks of the corpus (``shares.py``): with
    several workers, unless a tensor-parallel group shares the teacher."""
    return config.num_workers > 1 and config.tensor_parallel == 1


def _teacher(config: PrecomputeConfig) -> tuple[Any, torch.device]:
    """The loaded teacher of ``config`` and the device its inputs go to."""
    model, _, device = load_teacher(
        config.teacher,
        dtype=config.dtype,
        device=config.device
        if config.device_map or config.tensor_parallel > 1  # they place the teacher
        else rank_device(config.device),
        revision=config.teacher_revision,
        trust_remote_code=config.trust_remote_code,
        device_map=config.device_map,
        max_memory=device_map_memory(config.device_map),
        tensor_parallel=config.tensor_parallel,
    )
    return model, device


def _budget(
    config: PrecomputeConfig, tokenizer: Any, model_config: Any, reporter: Reporter
) -> tuple[PrecomputeConfig, CacheSpec, tuple[Any, torch.device] | None]:
    """``config`` as the plain ``--samples N`` run its --bytes-per-token chooses, its spec, and
    the teacher if choosing loaded it (None: N is that of the cache already at --out)."""
    budget, plain = config.bytes_per_token, functools.partial(replace, config, bytes_per_token=None)
    existing = samples_in_cache(config)
    if existing is not None:
        reporter.log(
            f"--bytes-per-token {budget:g}: {config.out} already holds a cache of "
            f"--samples {existing}; N={existing} (no calibration)"
        )
        resumed = plain(samples=existing)
        return resumed, make_spec(resumed, tokenizer, model_config), None
    model, device = _teacher(config)
    # once, for every N (only ``samples`` differs): it hashes the teacher's weights
    spec = make_spec(plain(samples=1), tokenizer, model_config)

    def teacher_pass(n: int) -> Pipeline:  # the pass's own forward and extraction, N draws
        return Pipeline(
            plain(samples=n),
            replace(spec, samples=n),
            tokenizer,
            model,
            device,
            None,
            reporter,
            PrecomputeResult(manifest=None),
        )

    calibration = calibrate(config, tokenizer, teacher_pass)
    reporter.log(calibration.summary())
    n = calibration.samples
    return plain(samples=n), replace(spec, samples=n), (model, device)


class Pipeline:
    """The three overlapping stages of one worker's teacher pass (see the module docstring)."""

    def __init__(self, config, spec, tokenizer, model, device, writer, reporter, result):
        self.config, self.spec, self.tokenizer = config, spec, tokenizer
        self.model, self.device, self.writer = model, device, writer
        self.reporter, self.result = reporter, result
        self.batch_tokens = config.batch_tokens
        # None: the teacher's logits are not its head's alone; each batch's are held whole
        self.split = split_output_head(model, device)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.expected_tokens: int | None = None  # the bar's total, as the reader estimates it
        self.meet: Callable[[], None] | None = None  # the torchrun ranks' barrier, if any

    # -- stage 1: corpus -> per-shard work (reader thread) --------------------------
    def _read(self, out: queue.Queue) -> None:
        try:
            if _reads_its_share(self.config):  # tokenizes its share only (shares.py)
                total = self._read_share(out)
                if total is not None:
                    self._put(out, ("total", total))
                return
            writer, size = self.writer, self.spec.shard_sequences
            current: _ShardWork | None = None
            total = mine = 0  # sequences read; tokens of those this worker's teacher runs
            stats = self.result.corpus
            for index, seq in enumerate(iter_sequences(self.config.corpus, self.tokenizer, stats)):
                total = index + 1
                shard = index // size
                if not writer.owns(shard) or writer.is_done(shard):
                    if writer.owns(shard) and index % size == 0:
                        self.result.shards_skipped += 1
                    continue
                if current is None or current.shard != shard:
                    if current is not None:
                        self._put(out, current)
                    current = _ShardWork(shard, [])
                current.sequences.append((index, seq))
                mine += len(seq.input_ids)
                rest = stats.tokens_to_come(self.config.corpus.max_tokens)  # this worker's share:
                self.expected_tokens = (
                    None if rest is None else mine + rest // self.config.num_workers
                )
                if self.stop.is_set():
                    return
            self.expected_tokens = mine
            if current is not None:
                self._put(out, current)
            self._put(out, ("total", total))
        except BaseException as err:
            self.errors.append(err)
        finally:
            self._put(out, _END)

    def _read_share(self, out: queue.Queue) -> int | None:
        """Only this worker's shards, tokenized by all workers once (``shares.py``); None if
        stopped."""
        config, writer, size = self.config, self.writer, self.spec.shard_sequences
        eos, vocab = self.tokenizer.eos_token_id, len(self.tokenizer)
        store = TokenStore(
            writer.loc, self.spec.cache_id, seq_len=self.spec.seq_len, eos_id=eos, vocab=vocab
        )
        plan = plan_share(
            store, config.corpus, self.tokenizer, config.worker_index, config.num_workers, self.meet
        )
        plan.stats(self.result.corpus)
        owned = [j for j in range(-(-plan.total // size)) if writer.owns(j)]
        todo = [j for j in owned if not writer.is_done(j)]
        self.result.shards_skipped += len(owned) - len(todo)
        ranges = [(j * size, min(size, plan.total - j * size)) for j in todo]
        counts = [plan.tokens(first, count) for first, count in ranges]
        self.expected_tokens = None if None in counts else sum(counts)
        for shard, (first, count) in zip(todo, ranges):
            if self.stop.is_set():
                return None
            self._put(
                out, _ShardWork(shard, list(plan.sequences(first, count, self.result.corpus)))
            )
        return plan.total

    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- stage 2: teacher (main thread) ---------------------------------------------
    def run(self) -> None:
        work: queue.Queue = queue.Queue(maxsize=2)
        reader = threading.Thread(target=self._read, args=(work,), daemon=True, name="corpus")
        # stage 3: records -> published shards, in a writer thread
        written = ShardWriter(self.writer, self.config.out, stop=self.stop, errors=self.errors)
        reader.start()
        total = None
        budget = self.config.corpus.max_tokens
        if self.split is None:
            self.reporter.log(
                "this teacher changes its logits after its output head: each batch's logits "
                f"are held whole ({self.spec.vocab_size * 4:,} bytes per --batch-tokens token)"
            )
        bar = self.reporter.bar(total=budget, desc="teacher pass")
        try:
            with written:
                while True:
                    item = _get(work, reader)
                    if item is _END:
                        break
                    if isinstance(item, tuple):
                        total = item[1]
                        continue
                    if self.stop.is_set():
                        break
                    self._send(written, item.shard, self._teacher_shard(item, bar))
                    bar.set_postfix_str(f"cache {human_bytes(written.bytes_written)}")
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.result.shards_written += written.shards_written
            self.result.bytes_written += written.bytes_written
            bar.set_postfix_str(f"cache {human_bytes(self.result.bytes_written)}")  # all written
            bar.close()
            self.stop.set()
            reader.join(timeout=5)
        if self.errors:
            raise self.errors[0]
        if total is None:
            raise LogitcacheError("the corpus reader stopped before the end of the corpus")
        self.result.manifest = self.writer.finish(total)
        self._summary(total)

    def _send(self, written: ShardWriter, shard: int, records: list[SequenceRecord]) -> None:
        """Hand a finished shard to the writer stage (waits while its queue is full)."""
        written.put(shard, records)

    def _teacher_shard(self, work: _ShardWork, bar: Any) -> list[SequenceRecord]:
        """Run the teacher over one shard's sequences; records come back in index order."""
        records: dict[int, SequenceRecord] = {}
        for part, states in self.forward(work.sequences):
            records.update((r.index, r) for r in self.records(part, states))
            tokens = sum(len(seq.input_ids) for _, seq in part)
            if self.expected_tokens is not None:  # set before update: the bar draws then
                bar.total = max(self.expected_tokens, bar.n + tokens)
            bar.update(tokens)
        return [records[i] for i, _ in work.sequences]

    def forward(self, sequences: list[tuple[int, Any]]) -> Iterator[tuple[list, torch.Tensor]]:
        """(sub-batch, its teacher states [B, W, D]) over (index, PackedSequence) pairs, in
        batches: the last hidden states (D = hidden size) that ``records`` turns into logits a
        chunk at a time, or the logits themselves (D = V) where the teacher cannot be split."""
        for batch in self._batches(sequences):
            yield from self._forward(batch)

    def records(self, part: list[tuple[int, Any]], states: torch.Tensor) -> list[SequenceRecord]:
        """The records of a sub-batch from its teacher states [B, W, D] (``forward``'s pairs)."""
        sparse = self._extract(part, states)
        return [self._record(index, seq, s) for (index, seq), s in zip(part, sparse)]

    def _width(self, length: int) -> int:
        """Padded width of a sequence: a function of its own length, never of its batch's.

        Masked attention over more padded keys rounds differently (~1e-6 in the logits of
        the real positions on CPU), which would make the bytes depend on --batch-tokens.
        Rounding up to _PAD_MULTIPLE costs at most 63 padding tokens per sequence.
        """
        return min(-(-length // _PAD_MULTIPLE) * _PAD_MULTIPLE, self.spec.seq_len)

    def _batches(self, sequences: list[tuple[int, Any]]) -> Iterator[list[tuple[int, Any]]]:
        """Batches of one padded width within the token budget, widest first."""
        ordered = sorted(
            sequences, key=lambda item: (-self._width(len(item[1].input_ids)), item[0])
        )
        batch: list[tuple[int, Any]] = []
        batch_width = 0
        for item in ordered:
            width = self._width(len(item[1].input_ids))
            if batch and (width != batch_width or width * (len(batch) + 1) > self.batch_tokens):
                yield batch
                batch = []
            batch.append(item)
            batch_width = width
        if batch:
            yield batch

    def _forward(self, batch: list[tuple[int, Any]]):
        """Yields (sub-batch, states [B, W, D]): the batch, or halves after out-of-memory."""
        lengths = [len(seq.input_ids) for _, seq in batch]
        width = self._width(max(lengths))  # the same for every sequence of the batch
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, seq) in enumerate(batch):
            ids[row, : lengths[row]] = torch.from_numpy(seq.input_ids.astype(np.int64))
            mask[row, : lengths[row]] = 1
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                states = self._states(ids.to(self.device), mask.to(self.device))  # [B, W, D]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # time the forward, not its launch
            self.result.teacher_s += time.perf_counter() - t0
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise LogitcacheError(
                    f"out of memory running the teacher on one sequence of {width} tokens; "
                    "use a shorter --seq-len, a smaller --dtype or --device-map auto"
                ) from None
            self.batch_tokens = max(1, self.batch_tokens // 2)
            self.reporter.log(f"out of memory: retrying with --batch-tokens {self.batch_tokens}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            yield from self._forward(batch[:half])
            yield from self._forward(batch[half:])
            return
        self.result.teacher_tokens += sum(lengths)
        yield batch, states

    def _states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The teacher on [B, W] ids: last hidden states [B, W, D], or logits [B, W, V]."""
        if self.split is None:
            return self.model(input_ids=ids, attention_mask=mask).logits
        return self.split.body(ids, mask)

    def _extract(self, batch: list[tuple[int, Any]], states: torch.Tensor) -> list[SparseTargets]:
        """The sparse targets of each sequence, from the batch's teacher states [B, W, D].

        Sequence by sequence (every position's result is its own row's; sampling needs each
        sequence's own generator), a chunk of positions' logits at a time.
        """
        split = self.split  # None: the states are the logits
        head, vocab = (None, states.shape[-1]) if split is None else (split.head, split.vocab)
        rows = [
            Logits(states[row], len(seq.input_ids) - 1, vocab, head)  # [W, D], a view
            for row, (_, seq) in enumerate(batch)
        ]
        if self.config.top_k is not None:
            return [topk_targets(logits, self.config.top_k) for logits in rows]
        return [
            sampled_targets(
                logits,
                self.config.samples,
                sample_generator(self.config.seed, index, states.device),
            )
            for logits, (index, _) in zip(rows, batch)
        ]

    def _record(self, index: int, seq: Any, sparse: SparseTargets) -> SequenceRecord:
        keep = self.config.top_k is not None or self.config.sampled_logprobs
        return sequence_record(index, seq, sparse, logprobs=keep)

    def _summary(self, total_sequences: int) -> None:
        r, stats = self.result, self.result.corpus
        rate = r.teacher_tokens / r.teacher_s if r.teacher_s else float("nan")
        lines = [
            f"sequences: {total_sequences} in the corpus; {r.shards_written} "
            f"shard{'s' * (r.shards_written != 1)} written, {r.shards_skipped} already present",
        ]
        if stats.skipped_empty:
            lines.append(f"skipped {stats.skipped_empty} empty or whitespace-only documents")
        if r.teacher_tokens:
            lines.append(
                f"teacher: {r.teacher_tokens} tokens at {rate:,.0f} tokens/s (forward only); "
                f"written {human_bytes(r.bytes_written)} = "
                f"{r.bytes_written / r.teacher_tokens:.1f} bytes/token"
            )
        if r.manifest is None:
            lines.append("this worker is done; the manifest is written when all workers are")
        for line in lines:
            self.reporter.log(line)


def sequence_record(
    index: int, seq: Any, sparse: SparseTargets, *, logprobs: bool
) -> SequenceRecord:
    """The cache record of a ``PackedSequence`` and its sparse targets (``logprobs``: keep
    the log-probs, which top-k and ``--sampled-logprobs`` store)."""
    return SequenceRecord(
        index=index,
        input_ids=seq.input_ids.astype(np.uint32),
        loss_mask=seq.loss_mask.astype(bool),
        doc_starts=seq.doc_starts.astype(np.uint32),
        ids=sparse.ids,
        n_entries=sparse.n_entries,
        tail_mass=sparse.tail_mass,
        logprobs=sparse.logprobs if logprobs else None,
        counts=sparse.counts,
    )


def _get(inbox: queue.Queue, producer: threading.Thread) -> Any:
    """The next item from a producer thread, or _END if it died without sending one.

    After a stop the reader gives up its final _END rather than block on a full queue, so
    the main thread must not wait forever on an empty one.
    """
    while True:
        try:
            return inbox.get(timeout=0.2)
        except queue.Empty:
            if not producer.is_alive():
                try:
                    return inbox.get_nowait()  # it may have put an item just before exiting
                except queue.Empty:
                    return _END
