"""Codec round trips (hypothesis), the lossy default's accuracy, and the codec allowlist."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_synth import peaked_logprobs

from logitcache.storage import CacheError, default_codecs
from logitcache.storage.codecs import (
    FieldCodec,
    FloatCodec,
    IdsCodec,
    LogprobCodec,
    bits_for_vocab,
)
from logitcache.storage.formats.v1 import FIELD_DTYPES

FAST = settings(max_examples=60, deadline=None)


# -- IdsCodec ---------------------------------------------------------------------------


@st.composite
def ids_arrays(draw, bits: int | None = None):
    """(bits, ids) with ids < 2**bits, biased towards 0 and the top of the range."""
    bits = draw(st.integers(1, 32)) if bits is None else bits
    top = (1 << bits) - 1
    n = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 9, 64, 1024, 1025]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, top, size=n, endpoint=True, dtype=np.uint64)
    if n:
        edges = rng.integers(0, n, size=min(n, 4))
        ids[edges] = draw(st.sampled_from([0, top, max(top - 1, 0)]))
    return bits, ids.astype(np.uint32)


@FAST
@given(ids_arrays())
def test_ids_round_trip(case):
    bits, ids = case
    codec = IdsCodec(bits)
    out = codec.decode(codec.encode(ids))
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, ids)


@pytest.mark.parametrize("bits", range(1, 33))
def test_ids_every_width_at_the_edges(bits):
    codec = IdsCodec(bits)
    top = (1 << bits) - 1
    for n in (0, 1, 64, 1024, 1027):
        ids = np.arange(n, dtype=np.uint64) % (top + 1)
        ids[::3] = top
        ids = ids.astype(np.uint32)
        np.testing.assert_array_equal(codec.decode(codec.encode(ids)), ids)
    with pytest.raises(CacheError, match="out of range"):
        codec.encode(np.array([top + 1], dtype=np.uint64))


@pytest.mark.parametrize("vocab", [2, 3, 255, 256, 257, 300, 32000, 65536, 151936, 2**24])
def test_ids_vocabulary_edge(vocab):
    """Every id of a vocabulary fits the width chosen for it, vocab - 1 included."""
    bits = bits_for_vocab(vocab)
    assert (vocab - 1) < (1 << bits)
    assert bits == 1 or (vocab - 1) >= (1 << (bits - 1))  # no wasted bit
    chain = FieldCodec(default_codecs(vocab)["ids"], FIELD_DTYPES["ids"])
    ids = np.array([0, vocab - 1, vocab // 2, vocab - 1], dtype=np.uint32)
    np.testing.assert_array_equal(chain.decode(chain.encode(ids)), ids)


def test_ids_rejects_negative_and_bad_width():
    with pytest.raises(CacheError, match="out of range"):
        IdsCodec(8).encode(np.array([-1, 3], dtype=np.int64))
    for bits in (0, 33):
        with pytest.raises(CacheError, match="bits"):
            IdsCodec(bits)


def test_ids_truncated_payload_is_refused():
    blob = IdsCodec(17).encode(np.arange(100, dtype=np.uint32))
    for cut in (len(blob) - 1, 15, 0):
        with pytest.raises(CacheError):
            IdsCodec(17).decode(blob[:cut])


# -- LogprobCodec -----------------------------------------------------------------------

steps = st.sampled_from([1 / 32, 1 / 64, 1 / 8, 0.5, 1.0, 0.1, 0.0123])


@st.composite
def logprob_rows(draw):
    """(step, lp): sorted and unsorted rows, -inf, 0.0, -0.0, values down to -1e4."""
    step = draw(steps)
    n = draw(st.sampled_from([0, 1, 2, 5, 64, 1024]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0, 1e4]))
    lp = -np.abs(rng.standard_normal(n) * scale).astype(np.float32)
    if draw(st.booleans()):
        lp = np.sort(lp)[::-1].copy()
    if n:
        specials = draw(st.lists(st.sampled_from([0.0, -0.0, -np.inf, -1e-30]), max_size=3))
        for value in specials:
            lp[rng.integers(0, n)] = value
    return step, lp


@FAST
@given(logprob_rows())
def test_logprob_round_trip(case):
    step, lp = case
    codec = LogprobCodec(step)
    out = codec.decode(codec.encode(lp))
    assert out.dtype == np.float32 and out.shape == lp.shape
    # codes are uint16 with 65535 = -inf: values past -65534 * step are stored as -inf
    in_range = np.isfinite(lp) & (np.rint(-lp.astype(np.float64) / step) <= 65534)
    np.testing.assert_array_equal(np.isneginf(out), ~in_range)
    err = np.abs(out[in_range].astype(np.float64) - lp[in_range])
    # step / 2 from the quantizer, plus at most half a float32 ulp from the final cast
    assert (err <= step / 2 + np.spacing(np.abs(lp[in_range]))).all()
    assert (out <= 0).all()


def test_logprob_range_edge():
    step = 1 / 32
    codec = LogprobCodec(step)
    lp = np.array([-65534 * step, -65534.4 * step, -65534.6 * step, -1e6], dtype=np.float32)
    out = codec.decode(codec.encode(lp))
    np.testing.assert_array_equal(out, [-65534 * step, -65534 * step, -np.inf, -np.inf])


def test_logprob_exact_points():
    codec = LogprobCodec(1 / 32)
    lp = np.array([0.0, -np.inf, -1 / 32, -np.inf, -3.0, 0.0, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(lp)), lp)
    assert codec.decode(codec.encode(np.zeros(0, np.float32))).shape == (0,)


@pytest.mark.parametrize("bad", [np.nan, 1e-6, 0.5, np.inf])
def test_logprob_rejects_nan_and_positive(bad):
    with pytest.raises(CacheError, match="<= 0 and not NaN"):
        LogprobCodec(1 / 32).encode(np.array([-1.0, bad, -2.0], dtype=np.float32))


@pytest.mark.parametrize("step", [0, -0.1, 1.5])
def test_logprob_rejects_bad_step(step):
    with pytest.raises(CacheError, match="step"):
        LogprobCodec(step)


# -- FloatCodec -------------------------------------------------------------------------

floats32 = st.lists(st.floats(width=32, allow_nan=False), max_size=300).map(
    lambda xs: np.asarray(xs, dtype=np.float32)
)


@FAST
@given(floats32)
def test_float32_is_exact(values):
    codec = FloatCodec("float32")
    out = codec.decode(codec.encode(values))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))  # -0.0 too


@FAST
@given(st.lists(st.floats(-65000, 65000, width=32), max_size=300))
def test_float16_within_half_precision(xs):
    values = np.asarray(xs, dtype=np.float32)
    codec = FloatCodec("float16")
    out = codec.decode(codec.encode(values))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values.astype(np.float16).astype(np.float32))
    # round to nearest: half an ulp of float16 (relative 2**-11), subnormals 2**-25 absolute
    err = np.abs(out.astype(np.float64) - values)
    assert (err <= np.abs(values) * 2.0**-11 + 2.0**-25).all()


def test_float_codec_rejects_other_dtypes():
    with pytest.raises(CacheError, match="float32 or float16"):
        FloatCodec("float64")


# -- FieldCodec chains ------------------------------------------------------------------


def field_values(name: str, rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    if name in ("input_ids", "ids"):
        return rng.integers(0, vocab, size=n).astype(np.uint32)
    if name == "doc_starts":
        return np.sort(rng.integers(0, 2**32, size=n, dtype=np.uint64)).astype(np.uint32)
    if name == "loss_mask":
        return rng.random(n) < 0.5
    if name in ("counts", "n_entries"):
        return rng.integers(0, 256, size=n).astype(np.uint8)
    if name == "tail_mass":
        return rng.random(n).astype(np.float32)
    assert name == "logprobs"
    return -np.abs(rng.standard_normal(n) * 5).astype(np.float32)


@FAST
@given(
    vocab=st.sampled_from([2, 300, 32000, 151936, 2**24]),
    logprobs=st.sampled_from(["lossy", "float16", "float32"]),
    n=st.sampled_from([0, 1, 7, 9, 1024]),
    seed=st.integers(0, 2**32 - 1),
)
def test_default_chains_round_trip(vocab, logprobs, n, seed):
    rng = np.random.default_rng(seed)
    for name, chain in default_codecs(vocab, logprobs=logprobs, format_version=1).items():
        if n == 0 and name in ("counts", "n_entries"):
            # bare zstd: numcodecs 0.16 cannot decode its own empty frame. A record never
            # has empty counts (every position holds >= 1 entry), so the chain is fine.
            continue
        codec = FieldCodec(chain, FIELD_DTYPES[name])
        values = field_values(name, rng, n, vocab)
        blob = codec.encode(values)
        assert isinstance(blob, bytes)
        out = codec.decode(blob)
        assert out.dtype == np.dtype(FIELD_DTYPES[name]) and out.shape == (n,)
        if name == "tail_mass" or (name == "logprobs" and logprobs == "float16"):
            np.testing.assert_array_equal(out, values.astype(np.float16).astype(np.float32))
        elif name == "logprobs" and logprobs == "lossy":
            assert (np.abs(out - values) <= 1 / 64 + np.spacing(np.abs(values))).all()
        else:
            np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "pickle"},
        {"id": "json2"},
        {"id": "msgpack2"},
        {"id": "vlen-bytes"},
        {"id": "logitcache.nope"},
        {"level": 3},
        {"id": None},
    ],
)
def test_field_codec_refuses_codecs_outside_the_allowlist(config):
    with pytest.raises(CacheError, match="not allowed"):
        FieldCodec([config, {"id": "zstd", "level": 3}], "uint8")


@pytest.mark.parametrize(
    "config",
    [
        {"id": "logitcache.ids", "bits": 40},
        {"id": "logitcache.ids"},
        {"id": "logitcache.logprob", "step": 2.0},
        {"id": "logitcache.float", "dtype": "float64"},
        {"id": "zstd", "bogus": 1},
    ],
)
def test_field_codec_refuses_bad_configs(config):
    with pytest.raises(CacheError, match="bad codec config"):
        FieldCodec([config], "uint32")


def test_field_codec_turns_garbage_into_cache_error():
    codec = FieldCodec(default_codecs(300)["ids"], "uint32")
    blob = codec.encode(np.arange(50, dtype=np.uint32))
    for bad in (b"", b"\x00" * 5, blob[: len(blob) // 2], b"not zstd at all" * 4):
        with pytest.raises(CacheError):
            codec.decode(bad)


def test_unknown_logprob_codec_name():
    with pytest.raises(CacheError, match="unknown logprob codec"):
        default_codecs(300, logprobs="bfloat16")


# -- accuracy of the lossy default ------------------------------------------------------

KL_BUDGET = 2e-4  # nats per position, over the k stored ids plus the tail category


def mean_topk_kl(step: float, *, k: int = 64, vocab: int = 32000, n: int = 96) -> float:
    """Mean KL(exact || decoded) per position over k ids + tail, decoded renormalized.

    Exact: the teacher's top-k probabilities and 1 - their sum. Decoded: what a reader
    sees through the default chains (lossy logprobs, float16 tail_mass), renormalized.
    """
    rng = np.random.default_rng(1234)
    lp = peaked_logprobs(rng, n, vocab)  # [n, V] float64
    top = np.argsort(-lp, axis=1)[:, :k]
    top_lp = np.take_along_axis(lp, top, axis=1).astype(np.float32)  # [n, k] sorted
    p = np.exp(top_lp.astype(np.float64))
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, None)

    codecs = default_codecs(vocab, step=step)
    lp_codec = FieldCodec(codecs["logprobs"], "float32")
    tail_codec = FieldCodec(codecs["tail_mass"], "float32")
    q = np.exp(lp_codec.decode(lp_codec.encode(top_lp.reshape(-1))).astype(np.float64))
    q_tail = tail_codec.decode(tail_codec.encode(tail.astype(np.float32))).astype(np.float64)

    exact = np.concatenate([p, tail[:, None]], axis=1)
    decoded = np.concatenate([q.reshape(n, k), q_tail[:, None]], axis=1)
    exact /= exact.sum(axis=1, keepdims=True)
    decoded /= decoded.sum(axis=1, keepdims=True)
    terms = np.where(exact > 0, exact * np.log(exact / np.maximum(decoded, 1e-300)), 0.0)
    return float(terms.sum(axis=1).mean())


def test_default_step_meets_the_kl_budget():
    default_step = default_codecs(32000)["logprobs"][0]["step"]
    assert mean_topk_kl(default_step) <= KL_BUDGET


def test_coarse_step_breaks_the_kl_budget():
    """The budget is a real bound: a 16x coarser step is far outside it."""
    assert mean_topk_kl(0.5) > KL_BUDGET
