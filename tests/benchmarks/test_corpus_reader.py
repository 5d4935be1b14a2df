"""The corpus reader benchmark (benchmarks/corpus_reader.py): its workers read every token of
the corpus once between them, and its one-worker pass reads the same tokens."""

from __future__ import annotations

from corpus_reader import one_pass, shared

from logitcache.precompute import blocks
from logitcache.precompute.corpus import CorpusSpec


def test_workers_read_the_tokens_of_one_pass(tmp_path, monkeypatch, tiny_tokenizer, text_corpus):
    monkeypatch.setattr(blocks, "BLOCK_CHARS", 200)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    spec = CorpusSpec(data=(str(text_corpus),), seq_len=32)
    tokens, seconds = one_pass(spec, tmp_path / "tokenizer")
    step1, step2, read = shared(spec, tmp_path / "tokenizer", 3, 2, tmp_path / "stores")
    assert read == tokens > 0 and seconds > 0
    assert len(step1) == len(step2) == 3
    assert not (tmp_path / "stores" / "workers-3").exists()  # its store is removed
