"""Corpus reading, tokenization and packing for the teacher pass.

In: a `CorpusSpec` (local .txt/.jsonl/.json/.parquet files or globs, or one Hugging Face
dataset name) and a tokenizer. Out: `PackedSequence`s — token ids, a per-token loss mask
and document starts — in a fixed order, so parallel workers that each iterate the whole
stream and keep every n-th sequence see the same sequences.

The three stages are public so each can be tested and reused alone:
`iter_documents` (spec -> `Document`), `tokenize_document` (document -> ids + train mask)
and `pack_sequences` (token streams -> fixed-length sequences); `iter_sequences` chains
them.

Reading rules:

- Each `data` argument is, in order: a glob (contains ``*``, ``?`` or ``[``) expanded and
  sorted; an existing file; an existing directory (its supported files, recursively,
  sorted); otherwise, if it looks like a path (starts with ``.``, ``/`` or ``~``, or ends
  in a known extension), an error; otherwise a Hugging Face dataset name, which must then
  be the only argument. Files are read argument by argument in that order; a file
  matched twice is read once.
- ``.txt``: if a blank (empty or whitespace-only) line separates two non-blank lines
  anywhere in the file, documents are paragraphs — maximal runs of non-blank lines, joined
  with ``\\n``. Otherwise every non-blank line is one document.
- ``.jsonl`` / ``.json`` (JSON lines, one object per line), ``.parquet`` and hub rows: the
  row's ``messages_field`` if one is set (a list of ``{"role", "content"}``), else its
  ``text_field`` if present, else its ``input_ids`` (pre-tokenized, used as is).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.errors import LogitcacheError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "CorpusError",
    "CorpusSpec",
    "CorpusStats",
    "Document",
    "PackedSequence",
    "corpus_identity",
    "iter_documents",
    "iter_sequences",
    "pack_sequences",
    "resolve_files",
    "tokenize_document",
]

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_GLOB_CHARS = ("*", "?", "[")
_HASH_CHUNK = 1 << 20  # 1 MiB reads keep hashing a multi-GB corpus at disk speed
_PARQUET_BATCH = 1024  # rows per Arrow batch: bounded memory, few Python round trips


class CorpusError(LogitcacheError, ValueError):
    """A corpus argument, file or row that cannot be used; the message says which."""


@dataclass(frozen=True)
class CorpusSpec:
    """What to read and how to cut it into sequences."""

    data: tuple[str, ...]
    """One Hugging Face dataset name, or local paths / globs of .txt, .jsonl, .json, .parquet."""
    data_config: str | None = None
    """Hub dataset configuration name (hub only)."""
    split: str = "train"
    """Hub dataset split (hub only)."""
    revision: str | None = None
    """Hub dataset revision (commit, tag or branch) to pin; hub only."""
    streaming: bool = False
    """Stream the hub dataset instead of downloading it first (hub only)."""
    text_field: str = "text"
    """Row field holding the document text."""
    messages_field: str | None = None
    """Row field holding a chat as a list of {"role", "content"}; overrides text_field."""
    max_tokens: int | None = None
    """Stop after emitting exactly this many tokens in total (None: the whole corpus)."""
    seq_len: int = 2048
    """Tokens per packed sequence; the upper bound on length when not packing."""
    pack: bool = True
    """Concatenate documents (EOS-separated) into full seq_len chunks; else one per sequence."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):  # a bare string would iterate as characters
            object.__setattr__(self, "data", (self.data,))
        else:
            object.__setattr__(self, "data", tuple(self.data))
        if not self.data:
            raise CorpusError("data: give at least one file, glob or dataset name")
        if any(not isinstance(d, str) or not d for d in self.data):
            raise CorpusError(f"data: every entry must be a non-empty string, got {self.data!r}")
        if self.seq_len < 2:
            raise CorpusError(
                f"seq_len must be >= 2 (one input and one target), got {self.seq_len}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CorpusError(f"max_tokens must be >= 1 or unset, got {self.max_tokens}")
        if not self.text_field:
            raise CorpusError("text_field must be a non-empty field name")
        if self.messages_field is not None and not self.messages_field:
            raise CorpusError("messages_field must be a non-empty field name or unset")
        if not self.split:
            raise CorpusError("split must be a non-empty split name")


@dataclass(frozen=True)
class Document:
    """One document: exactly one of `text`, `messages`, `input_ids` is set."""

    text: str | None = None
    messages: list[dict] | None = None
    input_ids: list[int] | None = None
    source: str = ""
    """Where it came from ("data/x.jsonl row 3"), for error messages."""

    def __post_init__(self) -> None:
        n_set = sum(v is not None for v in (self.text, self.messages, self.input_ids))
        if n_set != 1:
            raise CorpusError(
                f"a Document needs exactly one of text, messages, input_ids; got {n_set}"
            )


@dataclass
class PackedSequence:
    """One sequence for the teacher; T == seq_len except possibly the last (or no-pack)."""

    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool; token t is a training target; [0] is always False
    doc_starts: np.ndarray  # [D] int32 positions where a document begins in this sequence


@dataclass
class CorpusStats:
    """Counters filled in while a corpus is iterated, for the run's summary line."""

    documents: int = 0
    """Documents read from the corpus, skipped ones included."""
    skipped_empty: int = 0
    """Documents with no tokens (empty or whitespace-only text, empty chat or ids)."""
    skipped_short: int = 0
    """Documents under 2 tokens, skipped when not packing."""
    truncated: int = 0
    """Documents cut at seq_len when not packing."""
    tokens: int = 0
    """Tokens emitted in sequences."""
    sequences: int = 0
    """Sequences emitted."""


# ---------------------------------------------------------------------------------------
# Resolving `data` into files or a hub dataset


def _looks_like_path(arg: str) -> bool:
    return arg.startswith((".", "/", "~")) or arg.lower().endswith(SUPPORTED_SUFFIXES)


def _check_suffix(path: str, arg: str) -> None:
    if not path.lower().endswith(SUPPORTED_SUFFIXES):
        raise CorpusError(
            f"unsupported file type: {path} (from {arg!r}); "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )


def resolve_files(spec: CorpusSpec) -> tuple[str, ...] | None:
    """The local files `spec.data` names, in reading order; None if it names a hub dataset.

    Raises CorpusError for a glob that matches nothing, a path-looking argument that does
    not exist, an unsupported file type, or a hub name mixed with other arguments.
    """
    files: list[str] = []
    hub_names: list[str] = []
    for arg in spec.data:
        expanded = os.path.expanduser(arg)
        if any(c in arg for c in _GLOB_CHARS):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise CorpusError(f"no files match {arg!r}")
            for p in matches:
                _check_suffix(p, arg)
            files.extend(matches)
        elif os.path.isfile(expanded):
            _check_suffix(expanded, arg)
            files.append(expanded)
        elif os.path.isdir(expanded):
            matches = sorted(
                str(p)
                for p in Path(expanded).rglob("*")
                if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES)
            )
            if not matches:
                raise CorpusError(
                    f"directory {arg!r} holds no {', '.join(SUPPORTED_SUFFIXES)} files"
                )
            files.extend(matches)
        elif _looks_like_path(arg):
            raise CorpusError(f"no such file or directory: {arg!r}")
        else:
            hub_names.append(arg)
    if hub_names:
        if len(spec.data) > 1:
            raise CorpusError(
                f"{hub_names[0]!r} is not a local file, so it is read as a Hugging Face "
                f"dataset name, which must be the only data argument; got {list(spec.data)}"
            )
        return None
    if spec.data_config is not None or spec.revision is not None:
        raise CorpusError("data_config and revision apply only to a Hugging Face dataset name")
    return tuple(dict.fromkeys(files))  # drop repeats, keep first-seen order


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def corpus_identity(spec: CorpusSpec) -> dict[str, Any]:
    """A JSON-able description of the corpus for the cache manifest.

    Local files are identified by path (as given), size and SHA-256, so an edited file
    changes the identity. Hub datasets by name, config, split and revision (None when
    unpinned: then the identity cannot vouch for the content).
    """
    files = resolve_files(spec)
    fields = {"text_field": spec.text_field, "messages_field": spec.messages_field}
    if files is None:
        return {
            "kind": "hub",
            "name": spec.data[0],
            "config": spec.data_config,
            "split": spec.split,
            "revision": spec.revision,
            **fields,
        }
    return {
        "kind": "files",
        "files": [{"path": p, "bytes": os.path.getsize(p), "sha256": _sha256(p)} for p in files],
        **fields,
    }


# ---------------------------------------------------------------------------------------
# Reading documents


def _is_blank(line: str) -> bool:
    return not line.strip()


def _txt_has_paragraphs(path: str) -> bool:
    """Whether a blank line separates two non-blank lines somewhere in the file."""
    seen_text = pending_blank = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _is_blank(line):
                pending_blank = seen_text
            elif pending_blank:
                return True
            else:
                seen_text = True
    return False


def _iter_txt(path: str) -> Iterator[Document]:
    try:
        paragraphs = _txt_has_paragraphs(path)
        with open(path, encoding="utf-8") as f:
            block: list[str] = []
            first = 0  # line number where `block` began
            for i, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not paragraphs:
                    if not _is_blank(line):
                        yield Document(text=line, source=f"{path} line {i}")
                elif not _is_blank(line):
                    first = first or i
                    block.append(line)
                elif block:
                    yield Document(text="\n".join(block), source=f"{path} line {first}")
                    block, first = [], 0
            if block:
                yield Document(text="\n".join(block), source=f"{path} line {first}")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text: {e}") from e


def _row_document(row: Any, spec: CorpusSpec, where: str) -> Document:
    """Pick the document out of one row (a dict) by the rules in the module docstring."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if spec.messages_field is not None:
        if spec.messages_field not in row:
            raise CorpusError(
                f"messages field {spec.messages_field!r} not found in {where}; "
                f"fields: {', '.join(map(str, row))}"
            )
        return Document(messages=_check_messages(row[spec.messages_field], where), source=where)
    if spec.text_field in row:
        text = row[spec.text_field]
        if not isinstance(text, str):
            raise CorpusError(
                f"text field {spec.text_field!r} in {where} is {type(text).__name__}, "
                "expected a string"
            )
        return Document(text=text, source=where)
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise CorpusError(f"input_ids in {where} must be a list of integers")
        return Document(input_ids=ids, source=where)
    raise CorpusError(
        f"text field {spec.text_field!r} not found in {where}; fields: {', '.join(map(str, row))}"
    )


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list):
        raise CorpusError(f"messages in {where} must be a list, got {type(messages).__name__}")
    for j, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise CorpusError(
                f"message {j} in {where} must be a dict with string 'role' and 'content'"
            )
    return messages


def _iter_jsonl(path: str, spec: CorpusSpec) -> Iterator[Document]:
    row = 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if _is_blank(line):
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(
                        f"bad JSON in {path} line {i + 1}: {e.msg} "
                        "(.json and .jsonl are read as JSON lines: one object per line)"
                    ) from e
                yield _row_document(obj, spec, f"{path} row {row}")
                row += 1
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text: {e}") from e


def _iter_parquet(path: str, spec: CorpusSpec) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise CorpusError(f"cannot read parquet file {path}: {e}") from e
    names = pf.schema_arrow.names
    wanted = spec.messages_field or next(
        (c for c in (spec.text_field, "input_ids") if c in names), spec.text_field
    )
    if wanted not in names:  # name the missing field and what exists, as for JSON rows
        _row_document(dict.fromkeys(names), spec, f"{path} row 0")
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[wanted]):
        for value in batch.column(0).to_pylist():
            yield _row_document({wanted: value}, spec, f"{path} row {row}")
            row += 1


def _iter_hub(spec: CorpusSpec) -> Iterator[Document]:
    import datasets

    name = spec.data[0]
    try:
        ds = datasets.load_dataset(
            name,
            spec.data_config,
            split=spec.split,
            revision=spec.revision,
            streaming=spec.streaming,
        )
    except Exception as e:  # network, auth, missing config/split: all end the run the same
        raise CorpusError(
            f"cannot load Hugging Face dataset {name!r} (config {spec.data_config!r}, "
            f"split {spec.split!r}); if it is a local path, check it exists: {e}"
        ) from e
    for i, row in enumerate(ds):
        yield _row_document(row, spec, f"{name}[{spec.split}] row {i}")


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """The corpus's documents in a fixed order; argument errors are raised on the call."""
    files = resolve_files(spec)

    def generate() -> Iterator[Document]:
        if files is None:
            yield from _iter_hub(spec)
            return
        for path in files:
            suffix = Path(path).suffix.lower()
            if suffix == ".txt":
                yield from _iter_txt(path)
            elif suffix == ".parquet":
                yield from _iter_parquet(path, spec)
            else:
                yield from _iter_jsonl(path, spec)

    return generate()


# ---------------------------------------------------------------------------------------
# Tokenization


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict], source: str, *, generation: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # jinja errors, missing template: all mean this chat is unusable
        raise CorpusError(f"chat template failed on {source}: {e}") from e
    return _encode(tokenizer, text)


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _tokenize_chat(
    messages: list[dict], tokenizer: Any, source: str
) -> tuple[list[int], list[bool]]:
    """Mark assistant tokens by rendering prefixes, which works with any template.

    For assistant message i the span starts after messages[:i] rendered with the
    generation prompt (so the role header is not a target) and ends after messages[:i+1]
    (so the end-of-turn marker is). Both renders must be token prefixes of the whole chat.
    """
    ids = _render(tokenizer, messages, source, generation=False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        end = _render(tokenizer, messages[: i + 1], source, generation=False)
        if not _is_prefix(end, ids):
            raise CorpusError(
                f"chat template is not prefix-stable on {source}: messages[:{i + 1}] do not "
                "render as a prefix of the whole chat, so assistant tokens cannot be located"
            )
        start = 0
        if i > 0:  # transformers refuses to render an empty chat; then the header is kept
            with_prompt = _render(tokenizer, messages[:i], source, generation=True)
            without = _render(tokenizer, messages[:i], source, generation=False)
            if _is_prefix(with_prompt, end):
                start = len(with_prompt)
            elif _is_prefix(without, end):
                start = len(without)
            else:
                raise CorpusError(
                    f"chat template is not prefix-stable on {source}: messages[:{i}] do not "
                    f"render as a prefix of messages[:{i + 1}]"
                )
        mask[start : len(end)] = [True] * (len(end) - start)
    return ids, mask


def tokenize_document(doc: Document, tokenizer: Any) -> tuple[list[int], list[bool]] | None:
    """Token ids and a per-token train mask (True: a training target); None if empty.

    Text: no special tokens added, all True. Chat: rendered with the tokenizer's chat
    template, True only on assistant content and the end-of-turn marker after it.
    input_ids: used as is, all True, checked to lie in [0, len(tokenizer)).
    """
    if doc.text is not None:
        if not doc.text.strip():
            return None
        ids = _encode(tokenizer, doc.text)
        return (ids, [True] * len(ids)) if ids else None
    if doc.messages is not None:
        if not doc.messages:
            return None
        ids, mask = _tokenize_chat(doc.messages, tokenizer, doc.source)
        return (ids, mask) if ids else None
    ids = list(doc.input_ids)  # type: ignore[arg-type]  # Document guarantees one is set
    if not ids:
        return None
    vocab = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise CorpusError(
            f"input_ids in {doc.source} hold {bad}, outside the tokenizer's vocabulary "
            f"[0, {vocab}); was it tokenized with another tokenizer?"
        )
    return ids, [True] * len(ids)


# ---------------------------------------------------------------------------------------
# Packing


def _sequence(ids: list[int], mask: list[bool], starts: list[int]) -> PackedSequence:
    loss_mask = np.asarray(mask, dtype=bool)
    loss_mask[0] = False  # nothing in this sequence predicts its first token
    return PackedSequence(
        input_ids=np.asarray(ids, dtype=np.int32),
        loss_mask=loss_mask,
        doc_starts=np.asarray(starts, dtype=np.int32),
    )


def pack_sequences(
    tokenized_docs: Iterable[tuple[list[int], list[bool]]],
    *,
    seq_len: int,
    eos_id: int | None,
    pack: bool,
    max_tokens: int | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[PackedSequence]:
    """Cut tokenized documents into sequences; see the module docstring for the order.

    pack=True: each document is followed by EOS (unless it already ends in one; the EOS
    is a target iff the document's last token is), the stream is cut into consecutive
    seq_len chunks, and a final partial chunk of >= 2 tokens is kept.
    pack=False: one document per sequence, cut to seq_len, EOS appended if it fits and
    eos_id is set, no padding; documents under 2 tokens are skipped.
    max_tokens: the sequence that reaches the budget is cut so exactly max_tokens tokens
    are emitted (a 1-token remainder is dropped instead, as no sequence is that short).
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise CorpusError(f"max_tokens must be >= 1 or unset, got {max_tokens}")
    if pack and eos_id is None:
        raise CorpusError(
            "tokenizer has no EOS token; packing needs one: set one or pass --no-pack"
        )
    stats = stats if stats is not None else CorpusStats()
    if pack:
        return _pack(tokenized_docs, seq_len, eos_id, max_tokens, stats)
    return _no_pack(tokenized_docs, seq_len, eos_id, max_tokens, stats)


def _emit(stats: CorpusStats, seq: PackedSequence) -> PackedSequence:
    stats.tokens += len(seq.input_ids)
    stats.sequences += 1
    return seq


def _pack(
    docs: Iterable[tuple[list[int], list[bool]]],
    seq_len: int,
    eos_id: int,
    max_tokens: int | None,
    stats: CorpusStats,
) -> Iterator[PackedSequence]:
    budget = max_tokens
    buf_ids: list[int] = []
    buf_mask: list[bool] = []
    starts: list[int] = []  # document starts, as positions in buf_ids
    pos = 0  # buf_ids[:pos] is already emitted

    def chunk(n: int) -> PackedSequence:
        return _sequence(
            buf_ids[pos : pos + n],
            buf_mask[pos : pos + n],
            [s - pos for s in starts if pos <= s < pos + n],
        )

    for ids, mask in docs:
        assert len(ids) == len(mask) and ids, "tokenized documents are non-empty and aligned"
        # Drop the emitted prefix once per document, not once per chunk: a 1M-token
        # document then costs one copy, not 500 (at seq_len 2048).
        buf_ids, buf_mask = buf_ids[pos:], buf_mask[pos:]
        starts = [s - pos for s in starts if s >= pos]
        pos = 0
        starts.append(len(buf_ids))
        buf_ids.extend(ids)
        buf_mask.extend(mask)
        if ids[-1] != eos_id:
            buf_ids.append(eos_id)
            buf_mask.append(mask[-1])
        while True:
            if budget is not None and budget < 2:  # no sequence is shorter than 2 tokens
                return
            n = seq_len if budget is None else min(seq_len, budget)
            if len(buf_ids) - pos < n:
                break
            yield _emit(stats, chunk(n))
            pos += n
            if budget is not None:
                budget -= n
    if len(buf_ids) - pos >= 2:  # shorter than seq_len and than the budget
        yield _emit(stats, chunk(len(buf_ids) - pos))


def _no_pack(
    docs: Iterable[tuple[list[int], list[bool]]],
    seq_len: int,
    eos_id: int | None,
    max_tokens: int | None,
    stats: CorpusStats,
) -> Iterator[PackedSequence]:
    budget = max_tokens
    for ids, mask in docs:
        assert len(ids) == len(mask), "tokenized documents are aligned"
        if len(ids) < 2:
            stats.skipped_short += 1
            continue
        if len(ids) > seq_len:
            stats.truncated += 1
        ids, mask = list(ids[:seq_len]), list(mask[:seq_len])
        if eos_id is not None and len(ids) < seq_len and ids[-1] != eos_id:
            ids.append(eos_id)
            mask.append(mask[-1])
        if budget is not None:
            ids, mask = ids[:budget], mask[:budget]
            if len(ids) < 2:
                return
            budget -= len(ids)
        yield _emit(stats, _sequence(ids, mask, [0]))
        if budget == 0:
            return


# ---------------------------------------------------------------------------------------
# The whole chain


def iter_sequences(
    spec: CorpusSpec, tokenizer: Any, stats: CorpusStats | None = None
) -> Iterator[PackedSequence]:
    """Documents -> tokens -> sequences for `spec`; the same inputs give the same order.

    `stats`, if given, is updated as the iterator advances. Raises CorpusError("corpus is
    empty: ...") at the end if no sequence resulted.
    """
    stats = stats if stats is not None else CorpusStats()
    documents = iter_documents(spec)

    def tokenized() -> Iterator[tuple[list[int], list[bool]]]:
        for doc in documents:
            stats.documents += 1
            out = tokenize_document(doc, tokenizer)
            if out is None:
                stats.skipped_empty += 1
            else:
                yield out

    sequences = pack_sequences(
        tokenized(),
        seq_len=spec.seq_len,
        eos_id=tokenizer.eos_token_id,
        pack=spec.pack,
        max_tokens=spec.max_tokens,
        stats=stats,
    )

    def generate() -> Iterator[PackedSequence]:
        emitted = 0
        for seq in sequences:
            emitted += 1
            yield seq
        if emitted == 0:
            raise CorpusError(
                f"corpus is empty: no sequence of >= 2 tokens from {', '.join(spec.data)} "
                f"({stats.documents} documents read, {stats.skipped_empty} empty, "
                f"{stats.skipped_short} too short)"
            )

    return generate()
