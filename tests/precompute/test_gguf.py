"""GGUF teachers: a tiny Llama written as GGUF in the test gives the cache its safetensors
twin gives.

The GGUF is made here with the ``gguf`` package's writer from the session's 2-layer Llama
(``tiny_teacher_dir``): plain float32 tensors under llama.cpp's names (q/k rows permuted
as llama.cpp's converter does, which transformers' loader undoes), the llama metadata and
the tokenizer (byte-level BPE vocabulary, merges, control tokens, eos/pad ids). Nothing is
downloaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from logitcache.core.errors import LogitcacheError
from logitcache.core.identity import weights_fingerprint
from logitcache.models import (
    gguf_file_of,
    load_teacher,
    load_tokenizer,
    pretrained_source,
)
from logitcache.precompute import CorpusSpec, PrecomputeConfig, run_precompute
from logitcache.storage import CacheReader, Location, read_manifest

pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers reverses it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(model_dir: Path, path: Path) -> Path:
    """``model_dir`` (a saved Llama + byte-level BPE tokenizer) as one float32 GGUF file."""
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    specials = {t["id"] for t in backend["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        data = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            data = _permute(data, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            data = _permute(data, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_teacher(tmp_path_factory, tiny_teacher_dir) -> Path:
    return write_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def _precompute(teacher: Path, data: Path, out: Path, **store) -> Path:
    corpus = CorpusSpec(data=(str(data),), seq_len=64)
    config = PrecomputeConfig(
        teacher=str(teacher), out=str(out), corpus=corpus, device="cpu", shard_sequences=4, **store
    )
    run_precompute(config)
    return out


@pytest.mark.parametrize(
    "store",
    [{"top_k": 8, "logprob_codec": "float32"}, {"samples": 32}],
    ids=["top-8 float32", "sampled N=32"],
)
def test_gguf_teacher_writes_the_cache_of_its_safetensors_twin(
    store, tmp_path, gguf_teacher, tiny_teacher_dir, text_corpus
):
    """Compared record by record: token ids, loss masks, document starts, stored ids,
    counts (sampled) and log-probs / tail masses (top-k, to float32 rounding of the same
    weights: 1e-6); and the manifests' sequence and entry totals."""
    a = _precompute(tiny_teacher_dir, text_corpus, tmp_path / "safetensors", **store)
    b = _precompute(gguf_teacher, text_corpus, tmp_path / "gguf", **store)
    ma, mb = read_manifest(Location(str(a))), read_manifest(Location(str(b)))
    assert (ma.n_sequences, ma.n_tokens, ma.n_entries) == (
        mb.n_sequences,
        mb.n_tokens,
        mb.n_entries,
    )
    assert ma.n_sequences > 4  # more than one shard
    for ra, rb in zip(CacheReader(a), CacheReader(b), strict=True):
        for name in ("input_ids", "loss_mask", "doc_starts", "ids", "n_entries"):
            np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name), err_msg=name)
        if "samples" in store:
            np.testing.assert_array_equal(ra.counts, rb.counts)
        else:
            np.testing.assert_allclose(ra.logprobs, rb.logprobs, atol=1e-6, rtol=0)
            np.testing.assert_allclose(ra.tail_mass, rb.tail_mass, atol=1e-6, rtol=0)
    assert mb.spec.teacher["weights_sha256"] == weights_fingerprint(str(gguf_teacher))
    assert mb.spec.vocab_size == ma.spec.vocab_size == 300


def test_the_gguf_tokenizer_is_the_original_plus_transformers_default_token(
    gguf_teacher, tiny_teacher_dir
):
    """transformers builds a GGUF byte-level tokenizer as GPT-2's, whose default unknown /
    begin token ``<|endoftext|>`` is appended when the vocabulary lacks it (id 300 here;
    SmolLM2's vocabulary has it at id 0, so its tokenizer is exactly its 49,152 tokens).
    Every other id, and the eos / pad tokens, are the original's."""
    original, rebuilt = load_tokenizer(str(tiny_teacher_dir)), load_tokenizer(str(gguf_teacher))
    extra = {t: i for t, i in rebuilt.get_vocab().items() if t not in original.get_vocab()}
    assert extra == {"<|endoftext|>": len(original)}
    assert {t: rebuilt.get_vocab()[t] for t in original.get_vocab()} == original.get_vocab()
    assert (rebuilt.eos_token, rebuilt.pad_token) == (original.eos_token, original.pad_token)


def test_a_directory_holding_one_gguf_is_the_same_teacher(tmp_path, gguf_teacher):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(gguf_teacher, folder / gguf_teacher.name)
    assert gguf_file_of(str(folder)) == folder / gguf_teacher.name
    assert pretrained_source(str(folder)) == (str(folder), {"gguf_file": gguf_teacher.name})
    assert weights_fingerprint(str(folder)) == weights_fingerprint(str(gguf_teacher))
    assert (
        load_tokenizer(str(folder))("def main").input_ids
        == load_tokenizer(str(gguf_teacher))("def main").input_ids
    )

    shutil.copy(gguf_teacher, folder / "other.gguf")
    with pytest.raises(LogitcacheError, match=r"holds 2 GGUF files .*pass the one to use"):
        gguf_file_of(str(folder))


def test_the_weights_fingerprint_covers_the_gguf_file(tmp_path, gguf_teacher):
    copy = tmp_path / gguf_teacher.name  # the file name is part of the fingerprint
    data = bytearray(gguf_teacher.read_bytes())
    copy.write_bytes(data)
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(gguf_teacher))
    data[-1] ^= 1  # one bit of the last tensor
    copy.write_bytes(data)
    assert weights_fingerprint(str(copy)) != weights_fingerprint(str(gguf_teacher))


def test_a_missing_gguf_package_is_one_actionable_line(monkeypatch, gguf_teacher):
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(LogitcacheError) as err:
        load_tokenizer(str(gguf_teacher))
    message = str(err.value)
    assert "\n" not in message
    assert "gguf>=0.10" in message and "pip install 'logitcache[gguf]'" in message


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(LogitcacheError, match="does not exist"):
        load_tokenizer(str(tmp_path / "absent.gguf"))


def test_loading_a_gguf_teacher_draws_no_dequantize_bar(capfd, gguf_teacher):
    """transformers' GGUF loader uses plain tqdm; the teacher load silences it as it does
    every other transformers bar (a --quiet precompute prints one summary line)."""
    from transformers import modeling_gguf_pytorch_utils as loader

    plain = loader.tqdm
    load_teacher(str(gguf_teacher), device="cpu")
    assert "de-quantizing" not in capfd.readouterr().err
    assert loader.tqdm is plain  # put back after the load


def test_a_teacher_without_a_dtype_reads_no_deprecated_torch_dtype():
    """GGUF configs name no dtype; transformers 5's ``torch_dtype`` property would log a
    deprecation warning at every teacher pass (the field of transformers < 5 is still read)."""
    import torch

    from logitcache.models import resolve_dtype

    class Config:
        dtype = None

        @property
        def torch_dtype(self):
            raise AssertionError("read the deprecated property")

    class OldConfig:
        def __init__(self):
            self.torch_dtype = "bfloat16"

    assert resolve_dtype(None, Config()) == torch.float32
    assert resolve_dtype("auto", OldConfig()) == torch.bfloat16
