"""CPU seconds spent reading and tokenizing the corpus, with 1, 2, 4... teacher workers.

In: corpus files (``--data``, repeatable; ``--stdlib DIR`` writes the Python standard library
as ``DIR/stdlib.jsonl`` and adds it) and a tokenizer (a directory, or a ``.gguf`` file whose
tokenizer transformers reads). Out: one Markdown table row per corpus and worker count.

Before (every worker ran ``iter_sequences`` over the whole corpus and kept its shards): the
CPU of one such pass times the workers, as each ran that same loop; the pass is measured
before and after the workers' runs, to show how much the machine's load moved it. Now
(``precompute/shares.py``): each worker's step 1 (tokenizing its blocks) runs, then each
worker's step 2 (the summaries walked, then the sequences of its own shards packed from the
blocks they come from), as ranks meeting at their barrier would; CPU is measured around each
step of each worker with ``time.process_time`` (all threads of this process). Each worker
and the pass before get a fresh copy of the tokenizer, so no BPE word cache carries over.

    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python benchmarks/corpus_reader.py \\
        --tokenizer $GGUF --stdlib /tmp/reader --data /work/shared/corpora/tinyshakespeare.txt

Numbers, with the machine and load, are in docs/benchmarks.md ("The corpus reader").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from logitcache.precompute import blocks
from logitcache.precompute.corpus import CorpusSpec
from logitcache.precompute.packing import iter_sequences
from logitcache.precompute.shares import plan_share, tokenize_share
from logitcache.storage import Location


def saved_tokenizer(source: str, workdir: Path) -> Path:
    """The tokenizer of ``source`` saved as a directory (a GGUF parse takes ~20 s: once)."""
    from transformers import AutoTokenizer

    path = Path(source)
    if path.is_dir():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(workdir / "tokenizer")
    return workdir / "tokenizer"


def fresh(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def cpu(fn):
    """(fn(), CPU seconds of this process while it ran)."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def one_pass(spec: CorpusSpec, tokenizer_dir: Path) -> tuple[int, float]:
    """(tokens, CPU s) of one whole ``iter_sequences`` pass: a worker's reading before."""
    tokenizer = fresh(tokenizer_dir)
    return cpu(lambda: sum(len(s.input_ids) for s in iter_sequences(spec, tokenizer)))


def shared(spec: CorpusSpec, tokenizer_dir: Path, workers: int, shard_sequences: int, root: Path):
    """CPU s of each worker's step 1 and step 2, and the tokens all of them read."""
    tokenizers = [fresh(tokenizer_dir) for _ in range(workers)]
    eos, vocab = tokenizers[0].eos_token_id, len(tokenizers[0])
    loc = Location(str(root / f"workers-{workers}"))
    store = blocks.TokenStore(loc, "bench", seq_len=spec.seq_len, eos_id=eos, vocab=vocab)
    step1 = [
        cpu(lambda w=w: tokenize_share(store, spec, tokenizers[w], w, workers))[1]
        for w in range(workers)
    ]
    step2, tokens = [], 0
    for w in range(workers):

        def read(w=w) -> int:
            plan = plan_share(store, spec, tokenizers[w], w, workers)
            n = 0
            for shard in range(w, -(-plan.total // shard_sequences), workers):
                first = shard * shard_sequences
                count = min(shard_sequences, plan.total - first)
                n += sum(len(s.input_ids) for _, s in plan.sequences(first, count))
            return n

        got, seconds = cpu(read)
        tokens += got
        step2.append(seconds)
    shutil.rmtree(loc.root, ignore_errors=True)
    return step1, step2, tokens


def write_stdlib(workdir: Path) -> Path:
    from logitcache.toy import stdlib_documents

    path = workdir / "stdlib.jsonl"
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"text": text}) + "\n" for _, text in stdlib_documents())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", default=[])
    parser.add_argument("--stdlib", help="write the standard library here as a corpus")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory or .gguf")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--shard-sequences", type=int, default=16)
    parser.add_argument("--block-chars", type=int, default=blocks.BLOCK_CHARS)
    args = parser.parse_args()
    blocks.BLOCK_CHARS = args.block_chars
    workdir = Path(args.stdlib or tempfile.mkdtemp(prefix="corpus-reader-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = list(args.data) + ([str(write_stdlib(workdir))] if args.stdlib else [])
    tokenizer_dir = saved_tokenizer(args.tokenizer, workdir)
    print(
        f"load {os.getloadavg()[0]:.1f}, block chars {args.block_chars:,}, "
        f"seq_len {args.seq_len}, {args.shard_sequences} sequences per shard"
    )
    print(
        "| corpus | tokens | blocks | workers | before: CPU s (N x one pass, "
        "before / after) | now: step 1 "
        "(tokenize) | step 2 (plan + read) | total | most of one worker | tokens/CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in data:
        spec = CorpusSpec(data=(path,), seq_len=args.seq_len)
        n_blocks = sum(1 for _ in blocks.iter_blocks(spec))
        tokens, alone = one_pass(spec, tokenizer_dir)
        rows = []
        for workers in args.workers:
            step1, step2, read = shared(
                spec, tokenizer_dir, workers, args.shard_sequences, workdir / "stores"
            )
            assert read == tokens, (read, tokens)  # every sequence read once, by its worker
            total = sum(step1) + sum(step2)
            most = max(a + b for a, b in zip(step1, step2))
            rows.append((workers, sum(step1), sum(step2), total, most))
        _, again = one_pass(spec, tokenizer_dir)  # after: the load may have changed
        for workers, step1, step2, total, most in rows:
            print(
                f"| {Path(path).name} | {tokens:,} | {n_blocks} | {workers} "
                f"| {workers * alone:.1f} / {workers * again:.1f} "
                f"({tokens / max(alone, again) / 1e6:.2f}-{tokens / min(alone, again) / 1e6:.2f}"
                f" M tok/s) | {step1:.1f} | {step2:.1f} | {total:.1f} | {most:.1f} "
                f"| {tokens / total / 1e6:.2f} M |",
                flush=True,
            )


if __name__ == "__main__":
    main()
