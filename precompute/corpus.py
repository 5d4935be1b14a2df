"""Corpus reading for the teacher pass: what the corpus is and its documents, in order.

In: a `CorpusSpec` (local .txt/.jsonl/.json/.parquet files or globs, or one Hugging Face
dataset name). Out: `Document`s in a fixed order (`iter_documents`), and the corpus's
identity for the cache (`corpus_identity`). Tokenizing and packing them into sequences is
`packing.py`; `iter_sequences` there chains the stages.

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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.core.errors import LogitcacheError
from logitcache.core.options import option

__all__ = [
    "SUPPORTED_SUFFIXES",
    "CorpusError",
    "CorpusSpec",
    "Document",
    "corpus_identity",
    "iter_documents",
    "resolve_files",
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
    """One Hugging Face dataset name, or local .txt/.jsonl/.json/.parquet files, directories or
    globs (repeat the flag for several)."""
    data_config: str | None = None
    """Hub dataset configuration name (hub only)."""
    split: str = "train"
    """Hub dataset split (hub only)."""
    revision: str | None = option(None, key="data_revision")
    """Hub dataset revision (commit, tag or branch) to pin; hub only."""
    streaming: bool = False
    """Stream the hub dataset instead of downloading it first (hub only)."""
    text_field: str = "text"
    """Row field holding the document text."""
    messages_field: str | None = None
    """Row field holding a chat as a list of {"role", "content"}; overrides text_field."""
    max_tokens: int | None = None
    """Stop after emitting exactly this many tokens in total (unset: the whole corpus)."""
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
    read: float | None = None
    """Share of the corpus read up to this document, in (0, 1]: by file bytes (of its lines:
    a CRLF counts one), by rows in parquet files and Hub datasets; None where unknown (a
    streamed Hub dataset with no row count). For progress bars; not part of the document."""

    def __post_init__(self) -> None:
        n_set = sum(v is not None for v in (self.text, self.messages, self.input_ids))
        if n_set != 1:
            raise CorpusError(
                f"a Document needs exactly one of text, messages, input_ids; got {n_set}"
            )


# ---------------------------------------------------------------------------------------
# Resolving `data` into files or a hub dataset


def _looks_like_path(arg: str) -> bool:
    """Whether ``arg`` cannot be a hub dataset id (``NAME`` or ``ORG/NAME``): it starts like a
    path, has a file extension (``corpus.csv``; ``v1.0`` is not one), more than one ``/``, a
    backslash, or a first component that is a directory here (``data/train``)."""
    if arg.startswith((".", "/", "~")) or "\\" in arg or arg.count("/") > 1:
        return True
    if re.search(r"\.[A-Za-z][A-Za-z0-9]{0,7}$", arg):
        return True
    return "/" in arg and os.path.isdir(arg.split("/", 1)[0])


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
            raise CorpusError(
                f"no such file or directory: {arg!r} (a local path, not a Hugging Face dataset "
                "name: those look like NAME or ORG/NAME, without a file extension)"
            )
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


def _iter_txt(path: str, read: _Share) -> Iterator[Document]:
    try:
        paragraphs = _txt_has_paragraphs(path)
        with open(path, encoding="utf-8") as f:
            block: list[str] = []
            first = 0  # line number where `block` began
            done = 0  # bytes of the lines read (a CRLF counts one: text mode reads it as \n)
            for i, raw in enumerate(f, start=1):
                done += len(raw.encode())
                line = raw.rstrip("\r\n")
                if not paragraphs:
                    if not _is_blank(line):
                        yield Document(
                            text=line, source=f"{path} line {i}", read=read.of_bytes(done)
                        )
                elif not _is_blank(line):
                    first = first or i
                    block.append(line)
                elif block:
                    text = "\n".join(block)
                    yield Document(
                        text=text, source=f"{path} line {first}", read=read.of_bytes(done)
                    )
                    block, first = [], 0
            if block:
                yield Document(text="\n".join(block), source=f"{path} line {first}", read=read(1.0))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text: {e}") from e


def _row_document(row: Any, spec: CorpusSpec, where: str, read: float | None = None) -> Document:
    """Pick the document out of one row (a dict) by the rules in the module docstring."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if spec.messages_field is not None:
        if spec.messages_field not in row:
            raise CorpusError(
                f"messages field {spec.messages_field!r} not found in {where}; "
                f"fields: {', '.join(map(str, row))}"
            )
        messages = _check_messages(row[spec.messages_field], where)
        return Document(messages=messages, source=where, read=read)
    if spec.text_field in row:
        text = row[spec.text_field]
        if not isinstance(text, str):
            raise CorpusError(
                f"text field {spec.text_field!r} in {where} is {type(text).__name__}, "
                "expected a string"
            )
        return Document(text=text, source=where, read=read)
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise CorpusError(f"input_ids in {where} must be a list of integers")
        return Document(input_ids=ids, source=where, read=read)
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


def _iter_jsonl(path: str, spec: CorpusSpec, read: _Share) -> Iterator[Document]:
    row = done = 0  # done: bytes of the lines read
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                done += len(line.encode())
                if _is_blank(line):
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(
                        f"bad JSON in {path} line {i + 1}: {e.msg} "
                        "(.json and .jsonl are read as JSON lines: one object per line)"
                    ) from e
                yield _row_document(obj, spec, f"{path} row {row}", read.of_bytes(done))
                row += 1
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text: {e}") from e


def _iter_parquet(path: str, spec: CorpusSpec, read: _Share) -> Iterator[Document]:
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
    row, rows = 0, max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[wanted]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _row_document({wanted: value}, spec, f"{path} row {row - 1}", read(row / rows))


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
    rows = _hub_rows(ds, spec.split)
    for i, row in enumerate(ds):
        read = min((i + 1) / rows, 1.0) if rows else None
        yield _row_document(row, spec, f"{name}[{spec.split}] row {i}", read)


def _hub_rows(ds: Any, split: str) -> int | None:
    """A Hub split's row count: its length, or for a streamed split its dataset card's count."""
    try:
        return len(ds)
    except TypeError:  # an IterableDataset (streaming) has no len
        splits = getattr(getattr(ds, "info", None), "splits", None) or {}
        info = splits.get(split) if hasattr(splits, "get") else None
        return getattr(info, "num_examples", None) or None


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """The corpus's documents in a fixed order; argument errors are raised on the call."""
    files = resolve_files(spec)

    def generate() -> Iterator[Document]:
        if files is None:
            yield from _iter_hub(spec)
            return
        sizes = [os.path.getsize(path) for path in files]
        total, before = max(1, sum(sizes)), 0
        for path, size in zip(files, sizes, strict=True):
            read = _Share(before, size, total)
            suffix = Path(path).suffix.lower()
            if suffix == ".txt":
                yield from _iter_txt(path, read)
            elif suffix == ".parquet":
                yield from _iter_parquet(path, spec, read)
            else:
                yield from _iter_jsonl(path, spec, read)
            before += size

    return generate()


@dataclass(frozen=True)
class _Share:
    """One file's part of the corpus's bytes: how far into the file the reader is (a share of
    its bytes or rows) -> ``Document.read``."""

    before: int
    """Bytes of the files read before this one."""
    size: int
    total: int
    """Bytes of every file of the corpus."""

    def __call__(self, within: float) -> float:
        return (self.before + min(within, 1.0) * self.size) / self.total

    def of_bytes(self, done: int) -> float:
        return self(done / max(1, self.size))
