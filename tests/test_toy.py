"""Tests for logitcache.toy: stdlib corpus, stable split, tokenizer, teacher pretraining."""

import itertools
import json

import numpy as np
import pytest

from logitcache import toy

PARAGRAPH = (
    "The teacher runs once over the corpus and writes what it predicts at every position.\n"
    "def main():\n    return sum(x * x for x in range(10)) if True else None\n"
    "Small students then learn from those shards alone, many times, on small machines.\n"
)


@pytest.fixture
def one_thread():
    """Tiny models run ~20x faster on 1 thread when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stdlib_docs():
    return toy.stdlib_documents()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [PARAGRAPH, PARAGRAPH.upper(), "for i in range(3):\n    print(i)\n"]
    return toy.train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


def test_stdlib_documents_are_library_code_without_tests(stdlib_docs):
    paths = [p for p, _ in stdlib_docs]
    assert len(paths) > 100
    assert paths == sorted(paths)
    assert len(set(paths)) == len(paths)
    assert "os.py" in paths
    assert "json/decoder.py" in paths
    excluded = {"test", "tests", "idle_test", "site-packages", "pydoc_data"}
    assert not [p for p in paths if excluded.intersection(p.split("/")[:-1])]
    assert all(isinstance(text, str) for _, text in stdlib_docs)


def test_stdlib_documents_skips_non_utf8_and_test_dirs(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "b.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (tmp_path / "site-packages" / "c.py").write_text("z = 3\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "pkg" / "cp999.py").write_text('""" generated from X with gencodec.py """\n')
    (tmp_path / "_sysconfigdata__linux.py").write_text("build_time_vars = {}\n")
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text("topics = {}\n")
    assert toy.stdlib_documents(tmp_path) == [("b.py", "x = 1\n"), ("pkg/a.py", "y = 2\n")]


def test_split_is_stable_disjoint_and_near_fraction():
    docs = [(f"pkg/mod_{i}.py", f"text {i}") for i in range(2000)]
    train, held = toy.split_heldout(docs, 0.1)
    assert len(train) + len(held) == len(docs)
    assert not {p for p, _ in train} & {p for p, _ in held}
    assert 140 < len(held) < 260
    # A document's side depends on its path only, not on which other documents exist.
    _train_rev, held_rev = toy.split_heldout(docs[::-1][:500], 0.1)
    assert {p for p, _ in held_rev} == {p for p, _ in held} & {p for p, _ in docs[-500:]}
    # Pinned: sha256("os.py")[:8] / 2**64 = 0.8509..., the same on every machine.
    assert toy.split_heldout([("os.py", "")], 0.851)[1] == [("os.py", "")]
    assert toy.split_heldout([("os.py", "")], 0.850)[1] == []
    with pytest.raises(ValueError, match="fraction"):
        toy.split_heldout(docs, 1.5)


def test_write_jsonl_round_trip(tmp_path):
    docs = [("a.py", 'print("é")\n'), ("b/c.py", "")]
    path = toy.write_jsonl(docs, tmp_path / "sub" / "corpus.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": t, "path": p} for p, t in docs]


def test_tokenizer_round_trip_eos_and_reload(tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    assert tokenizer.eos_token == toy.EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 300
    text = "def f(x):\n    return x ** 2  # naïve ✓\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    reloaded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_tokenize_corpus_puts_eos_after_each_document(tokenizer):
    docs = [("a", "The teacher runs once."), ("b", ""), ("c", "def main(): return 1")]
    stream = toy.tokenize_corpus(docs, tokenizer)
    assert stream.dtype == np.uint16
    eos = tokenizer.eos_token_id
    assert np.flatnonzero(stream == eos).size == 3
    parts = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
    decoded = [tokenizer.decode(p[:-1].tolist()) for p in parts]
    assert decoded == [text for _, text in docs]


def test_spec_and_config_validate(tokenizer):
    with pytest.raises(ValueError, match="multiple of heads"):
        toy.ToyModelSpec(hidden=30, heads=4)
    config = toy.llama_config(toy.ToyModelSpec(hidden=32, layers=2, heads=2), tokenizer)
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        toy.llama_config(toy.ToyModelSpec(vocab_size=10), tokenizer)


def test_lr_multiplier_warms_up_then_decays():
    values = [toy.lr_multiplier(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    assert values[-1] == pytest.approx(0.1, abs=0.01)


def test_pretrain_lowers_loss_and_saves_loadable_model(tokenizer, tmp_path, one_thread, capfd):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process (other tests may have disabled it)

    docs = [(str(i), PARAGRAPH) for i in range(8)]
    tokens = toy.tokenize_corpus(docs, tokenizer)
    spec = toy.ToyModelSpec(hidden=32, layers=2, heads=2, intermediate=64, max_positions=64)
    torch.manual_seed(0)
    before = toy.heldout_cross_entropy(
        LlamaForCausalLM(toy.llama_config(spec, tokenizer)), tokens, 32, 8
    )
    out = toy.pretrain(
        tmp_path / "teacher",
        tokenizer,
        tokens,
        spec=spec,
        steps=40,
        batch_size=8,
        seq_len=32,
        lr=1e-2,
        seed=0,
        progress=False,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temp dir left
    assert "Writing model shards" not in capfd.readouterr().err  # no bar beside the demo's
    model = AutoModelForCausalLM.from_pretrained(out)
    after = toy.heldout_cross_entropy(model, tokens, 32, 8)
    assert after < before - 1.0
    record = json.loads((out / "toy_pretrain.json").read_text())
    assert record["steps"] == 40
    assert (out / "tokenizer.json").exists()
    with pytest.raises(FileExistsError):
        toy.pretrain(out, tokenizer, tokens, spec=spec, steps=1, batch_size=1, seq_len=8, lr=1e-3)


def test_heldout_cross_entropy_is_deterministic_and_restores_mode(tokenizer, one_thread):
    import torch
    from transformers import LlamaForCausalLM

    tokens = toy.tokenize_corpus([("a", PARAGRAPH * 2)], tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        toy.llama_config(toy.ToyModelSpec(hidden=32, layers=1, heads=2), tokenizer)
    )
    model.train()
    a = toy.heldout_cross_entropy(model, tokens, 16, 5, batch_size=2)
    b = toy.heldout_cross_entropy(model, tokens, 16, 5, batch_size=5)
    assert a == pytest.approx(b, rel=1e-5)
    assert model.training
    assert a == pytest.approx(np.log(len(tokenizer)), abs=0.5)  # near-uniform at init
