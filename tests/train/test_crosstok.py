"""Students of another tokenizer: token bytes, alignment checked by hand, the mapping of the
teacher's mass (conserved), and the loss against a slow reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from crosstok_tokenizers import (
    build_other_bpe_tokenizer,
    build_sentencepiece_tokenizer,
    hand_student,
    hand_teacher,
)

from logitcache.core.errors import LogitcacheError
from logitcache.storage import SequenceRecord
from logitcache.train import DistillationLoss
from logitcache.train.alignment import StudentTokenizer, align_row, special_map
from logitcache.train.collator import DistillCollator
from logitcache.train.crosstok import CrossTokenizer, map_ids
from logitcache.train.dataset import example_of
from logitcache.train.token_bytes import token_bytes

TEXTS = ["naïve 日本", "  two  spaces\n\ttab", "The teacher runs once.", "ünïcödé ≠ ascii"]


@pytest.fixture(scope="module")
def teacher():
    return hand_teacher()


@pytest.fixture(scope="module")
def student():
    return hand_student()


def ids_of(tokenizer, *tokens: str) -> np.ndarray:
    return np.asarray(tokenizer.convert_tokens_to_ids(list(tokens)), dtype=np.int64)


@pytest.mark.parametrize(
    "make", [build_other_bpe_tokenizer, build_sentencepiece_tokenizer, hand_student]
)
def test_token_bytes_spell_the_text(make, tiny_tokenizer):
    """Joined, the bytes of a tokenization are the text's UTF-8 (byte-level, ▁ and <0xNN>
    spellings); special tokens have none."""
    for tokenizer in (tiny_tokenizer, make()):
        table = token_bytes(tokenizer)
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert b"".join(table.pieces[i] for i in ids) == text.encode()
        eos = tokenizer.eos_token_id
        assert table.special[eos] and table.pieces[eos] == b"" and table.lengths[eos] == 0


def test_alignment_by_hand(teacher, student):
    """Doc 1 "naïve 日本" then EOS, doc 2 "na". Teacher tokens and their byte starts:
    [na]0 [ïv]2 [e]5 [ 日₁₂]6 [日₃本]9 <eos> | [na]0. Student: [na]0 [ï]2 [ve]4 [▁日]6
    [E6]10 [9C]11 [AC]12 </s> | [na]0. Both start a token at bytes 2 and 6 of doc 1 (teacher
    tokens 1 and 3), at the EOS and at doc 2's start; [ve] straddles the untrained [e]."""
    row = ids_of(teacher, "na", "Ã¯v", "e", "ĠæĹ", "¥æľ¬", "<|eos|>", "na")
    mask = np.array([0, 1, 0, 1, 1, 1, 1], dtype=bool)
    st = StudentTokenizer(student, token_bytes(student))
    table = token_bytes(teacher)
    a = align_row(row, mask, np.array([0, 6]), table, st, special_map(table, st.table), 64)
    assert student.convert_ids_to_tokens(a.input_ids.tolist()) == [
        "na",
        "ï",
        "ve",
        "▁日",
        "<0xE6>",
        "<0x9C>",
        "<0xAC>",
        "</s>",
        "na",
    ]
    assert a.teacher_row.tolist() == [-1, 1, -1, 3, -1, -1, -1, 5, 6]
    assert a.trained.tolist() == [False, True, False, True, True, True, True, True, True]
    assert (a.n_bytes, a.cut_bytes) == (15, 0)


def test_a_student_that_writes_bos_gets_it_first(teacher):
    """A tokenizer that starts every text with <s> (Llama, Gemma): the row starts with it,
    untrained and aligned with nothing; the rest is the hand alignment one token later."""
    from tokenizers import processors

    student = hand_student()
    student.add_special_tokens({"bos_token": "<s>"})
    bos = student.bos_token_id
    student.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    row = ids_of(teacher, "na", "Ã¯v", "e", "ĠæĹ", "¥æľ¬", "<|eos|>", "na")
    st = StudentTokenizer(student, token_bytes(student))
    table = token_bytes(teacher)
    mask = np.arange(7) > 0  # a cache never trains its row's first token
    a = align_row(row, mask, np.array([0, 6]), table, st, special_map(table, st.table), 64)
    assert a.input_ids[0] == bos and len(a.input_ids) == 10
    assert a.teacher_row.tolist() == [-1, -1, 1, -1, 3, -1, -1, -1, 5, 6]
    assert not a.trained[:2].any()
    # a row that starts with the teacher's own BOS (here <|user|>, the student's too) keeps one
    other = hand_student()
    other.add_special_tokens({"bos_token": "<|user|>"})
    other.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|user|> $A", special_tokens=[("<|user|>", other.bos_token_id)]
    )
    st = StudentTokenizer(other, token_bytes(other))
    row = ids_of(teacher, "<|user|>", "na", "e")
    a = align_row(row, mask[:3], np.array([0]), table, st, special_map(table, st.table), 64)
    assert other.convert_ids_to_tokens(a.input_ids.tolist()) == ["<|user|>", "na", "e"]
    assert a.teacher_row.tolist() == [-1, 1, 2]


def test_alignment_of_a_special_token_the_student_lacks(teacher, student):
    """<|user|> has no student token: it is dropped, and the token after it (predicted by
    the teacher from after <|user|>) is not aligned."""
    row = ids_of(teacher, "na", "<|user|>", "na", "e")
    st = StudentTokenizer(student, token_bytes(student))
    table = token_bytes(teacher)
    a = align_row(row, np.ones(4, bool), np.array([0]), table, st, special_map(table, st.table), 64)
    assert student.convert_ids_to_tokens(a.input_ids.tolist()) == ["na", "na", "e"]
    assert a.teacher_row.tolist() == [-1, -1, 3]
    # a row of nothing the student can spell is one untrained token (batches stay valid)
    row = ids_of(teacher, "<|user|>", "<|user|>")
    a = align_row(row, np.ones(2, bool), np.array([0]), table, st, special_map(table, st.table), 9)
    assert student.convert_ids_to_tokens(a.input_ids.tolist()) == ["</s>"]
    assert not a.trained.any() and a.teacher_row.tolist() == [-1]


def test_alignment_of_a_row_cut_inside_a_character(teacher, student):
    """A row that starts with the last byte of 日 (the packer cut there): that byte is no
    UTF-8, no student token covers it; 本 is its three byte pieces, the first aligned with
    nothing (the teacher token spans it), and the row is cut at max_tokens."""
    row = ids_of(teacher, "¥æľ¬", "na", "e")
    st = StudentTokenizer(student, token_bytes(student))
    table = token_bytes(teacher)
    specials = special_map(table, st.table)
    a = align_row(row, np.ones(3, bool), np.array([], dtype=np.int64), table, st, specials, 64)
    assert student.convert_ids_to_tokens(a.input_ids.tolist()) == [
        "<0xE6>",
        "<0x9C>",
        "<0xAC>",
        "na",
        "e",
    ]
    assert a.teacher_row.tolist() == [-1, -1, -1, 1, 2]
    assert (a.n_bytes, a.cut_bytes) == (7, 1)
    cut = align_row(row, np.ones(3, bool), np.array([], dtype=np.int64), table, st, specials, 4)
    assert len(cut.input_ids) == 4 and cut.cut_bytes == 2


def test_same_tokenizer_aligns_everywhere(tiny_tokenizer):
    """A student of the cache's own tokenizer sees the row unchanged, every position aligned."""
    ids = tiny_tokenizer("The teacher runs once. Small students", add_special_tokens=False)
    row = np.asarray([*ids["input_ids"], tiny_tokenizer.eos_token_id, *ids["input_ids"]])
    mask = np.ones(len(row), bool)
    mask[0] = False
    table = token_bytes(tiny_tokenizer)
    st = StudentTokenizer(tiny_tokenizer, table)
    doc2 = len(ids["input_ids"]) + 1
    a = align_row(row, mask, np.array([0, doc2]), table, st, special_map(table, table), 999)
    assert a.input_ids.tolist() == row.tolist()
    assert a.teacher_row.tolist() == [-1, *range(1, len(row))]
    assert a.trained.tolist() == mask.tolist()


def test_map_ids_by_hand(teacher, student):
    """exact: [na] and [e] are student tokens, EOS is EOS; prefix adds [ïv] -> [ï],
    [ 日₁₂] -> [▁] and [日₃本] -> <0xA5> (the longest student token each starts with)."""
    t, s = token_bytes(teacher), token_bytes(student)
    specials = special_map(t, s)
    names = ["na", "Ã¯v", "e", "ĠæĹ", "¥æľ¬", "<|eos|>", "<|user|>"]
    rows = ids_of(teacher, *names)
    exact, is_exact = map_ids(t, s, "exact", specials)
    prefix, _ = map_ids(t, s, "prefix", specials)
    show = lambda m: [None if i < 0 else student.convert_ids_to_tokens(int(i)) for i in m[rows]]  # noqa: E731
    assert show(exact) == ["na", None, "e", None, None, "</s>", None]
    assert show(prefix) == ["na", "ï", "e", "▁", "<0xA5>", "</s>", None]
    assert is_exact[rows].tolist() == [True, False, True, False, False, True, False]


def record_of(teacher, tokens: list[str], support: list[dict[str, float]]) -> SequenceRecord:
    """A top-k row of ``teacher``'s ``tokens`` whose position p stores ``support[p]`` (the
    teacher's view of token p + 1); the tail holds the rest of each position's mass."""
    ids = [ids_of(teacher, *row) for row in support]
    probs = [np.asarray(list(row.values()), dtype=np.float64) for row in support]
    mask = np.ones(len(tokens), dtype=bool)
    mask[0] = False
    return SequenceRecord(
        index=0,
        input_ids=ids_of(teacher, *tokens).astype(np.uint32),
        loss_mask=mask,
        doc_starts=np.array([0]),
        ids=np.concatenate(ids).astype(np.uint32),
        n_entries=np.array([len(x) for x in ids], dtype=np.int32),
        tail_mass=np.array([1 - x.sum() for x in probs], dtype=np.float32),
        logprobs=np.log(np.concatenate(probs)).astype(np.float32),
    )


def target_of(student, out, s: int) -> dict[str | None, float]:
    """Student row ``s``'s target as {token: mass}, the tail under None."""
    valid = out["teacher_valid"][s]
    tokens = student.convert_ids_to_tokens(out["teacher_ids"][s][valid].tolist())
    found = dict(zip(tokens, out["teacher_probs"][s][valid].tolist()))
    return {**found, None: float(out["teacher_tail"][s])}


@pytest.mark.parametrize(
    ("second", "chained"),
    [
        ({"a": 0.6, "e": 0.3}, 0.3),  # p(n) x p(a | n) = 0.5 x 0.6
        ({"e": 0.9}, 0.0),  # "a" not in the top-k: no chain
    ],
)
def test_chain_by_hand(teacher, student, second, chained):
    """Text "enae": teacher tokens [e][n][a][e], the student's [e][na][e]. The student's
    [na] spans the teacher's [n][a]: ``chain`` gives it p(n) x p(a | n) (rows 1 and 2), off
    the student's [n]; ``exact`` leaves [n] all of p(n). Mass is conserved either way, and
    the last row (aligned one to one) is the same."""
    support = [{"n": 0.5, "na": 0.2, "e": 0.1}, second, {"e": 0.9}]
    r = record_of(teacher, ["e", "n", "a", "e"], support)
    outs = {}
    for method in ("exact", "chain"):
        cross = CrossTokenizer(teacher, student, method=method, max_tokens=64)
        outs[method] = cross.example(r, example_of(r))
        assert student.convert_ids_to_tokens(outs[method]["input_ids"].tolist()) == ["e", "na", "e"]
        assert outs[method]["teacher_aligned"].tolist() == [False, True, True]
    exact, chain = (target_of(student, outs[m], 1) for m in ("exact", "chain"))
    assert exact == pytest.approx({"n": 0.5, "na": 0.2, "e": 0.1, None: 0.2})
    assert chain["na"] == pytest.approx(0.2 + chained)
    assert chain.get("n", 0.0) == pytest.approx(0.5 - chained)
    assert sum(chain.values()) == pytest.approx(1.0)
    assert target_of(student, outs["chain"], 2) == pytest.approx(
        target_of(student, outs["exact"], 2)
    )
    assert cross.stats.longer == 1 and cross.stats.chained == (1 if chained else 0)
    assert cross.stats.chained_mass == pytest.approx(chained)


def test_chain_takes_an_unmapped_first_token_off_the_tail(teacher, student):
    """Text "e 日e": teacher [e][ 日₁₂][日₃][e], the student's [e][▁日][e]. The teacher's
    [ 日₁₂] is no student token (its mass is in the tail); the student's [▁日] spans it and
    [日₃], so the chain moves p( 日₁₂) x p(日₃ | ...) = 0.4 x 0.5 off the tail."""
    support = [{"ĠæĹ": 0.4, "e": 0.1}, {"¥": 0.5}, {"e": 0.9}]
    r = record_of(teacher, ["e", "ĠæĹ", "¥", "e"], support)
    cross = CrossTokenizer(teacher, student, method="chain", max_tokens=64)
    out = cross.example(r, example_of(r))
    assert student.convert_ids_to_tokens(out["input_ids"].tolist()) == ["e", "▁日", "e"]
    assert target_of(student, out, 1) == pytest.approx({"▁日": 0.2, "e": 0.1, None: 0.7})


def random_record(
    tokenizer, rng, *, k: int = 6, counts: bool = False, with_true: bool = False
) -> SequenceRecord:
    """Two documents of the paragraph, with a random teacher support at every position
    (top-k log-probs and a tail, or the counts of 16 draws); ``with_true``: every support
    holds the row's true next token."""
    text = "The teacher runs once over the corpus. Small students then learn from those shards."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = np.asarray([*ids[:12], tokenizer.eos_token_id, *ids[12:]], dtype=np.uint32)
    t, v = len(row), len(tokenizer)
    support = np.stack([rng.choice(v, size=k, replace=False) for _ in range(t - 1)])
    if with_true:
        for p in range(t - 1):
            if row[p + 1] not in support[p]:
                support[p, rng.integers(k)] = row[p + 1]
    mask = rng.random(t) < 0.8
    mask[0] = False
    common = dict(index=0, input_ids=row, loss_mask=mask, doc_starts=np.array([0, 13]))
    if counts:
        draws = rng.multinomial(16, np.full(k, 1 / k), size=t - 1)
        keep = draws > 0
        return SequenceRecord(
            **common,
            ids=support[keep].astype(np.uint32),
            n_entries=keep.sum(1).astype(np.int32),
            tail_mass=None,
            counts=draws[keep].astype(np.uint8),
        )
    p = rng.dirichlet(np.ones(k + 1), size=t - 1)  # the last column: the tail
    return SequenceRecord(
        **common,
        ids=support.reshape(-1).astype(np.uint32),
        n_entries=np.full(t - 1, k, dtype=np.int32),
        tail_mass=p[:, -1].astype(np.float32),
        logprobs=np.log(p[:, :-1]).reshape(-1).astype(np.float32),
    )


STUDENTS = {"sentencepiece": build_sentencepiece_tokenizer, "hand": hand_student}


@pytest.mark.parametrize("method", ["exact", "prefix", "chain"])
@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("which", list(STUDENTS))
def test_mapping_conserves_mass(tiny_tokenizer, method, counts, which):
    """At every aligned position the student row's support plus tail holds exactly the
    teacher row's mass; ids are unique per row; exact-mapped ids keep their own mass. The
    hand-made student spells most of the text in byte pieces: many trained positions have
    no teacher position (cross-entropy only)."""
    student = STUDENTS[which]()
    cross = CrossTokenizer(tiny_tokenizer, student, method=method, max_tokens=256)
    rng = np.random.default_rng(0)
    ce_only = 0
    for _ in range(5):
        r = random_record(tiny_tokenizer, rng, counts=counts)
        view = example_of(r)
        out = cross.example(r, view)
        a = align_row(
            r.input_ids,
            r.loss_mask,
            r.doc_starts,
            cross.teacher,
            cross.student,
            cross.specials,
            256,
        )
        aligned = out["teacher_aligned"].numpy()
        assert aligned.any() and not aligned.all()
        for s in np.flatnonzero(aligned):
            t = a.teacher_row[s]
            want = (
                view["teacher_probs"][t][view["teacher_valid"][t]].sum() + view["teacher_tail"][t]
            )
            valid = out["teacher_valid"][s]
            got = out["teacher_probs"][s][valid].sum() + out["teacher_tail"][s]
            assert float(got) == pytest.approx(float(want), abs=1e-6)
            ids = out["teacher_ids"][s][valid]
            assert len(set(ids.tolist())) == len(ids)
            for tid, p in zip(view["teacher_ids"][t], view["teacher_probs"][t]):
                if cross.exact[tid] and p > 0 and method == "exact":
                    sid = cross.id_map[tid]
                    assert float(out["teacher_probs"][s][ids_index(out, s, sid)]) >= float(p) - 1e-7
        assert not out["teacher_valid"][~aligned].any()
        ce_only += int((out["labels"][~aligned] != -100).sum())
    assert ce_only > 0 or which == "sentencepiece"  # trained without a teacher target


@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("which", ["other_bpe", "sentencepiece"])
def test_chain_matches_a_slow_reference(tiny_tokenizer, counts, which):
    """``chain``'s rows against the obvious loop over the ``exact`` rows: where the
    student's true token is spelled by teacher tokens t .. t+m-1 (m >= 2, the next student
    token aligned with t+m), the product of the teacher's probabilities of its own tokens
    moves from the first token's student id (or the tail) onto the student's token."""
    student = {
        "other_bpe": build_other_bpe_tokenizer,
        "sentencepiece": build_sentencepiece_tokenizer,
    }[which]()
    exact = CrossTokenizer(tiny_tokenizer, student, method="exact", max_tokens=256)
    chain = CrossTokenizer(tiny_tokenizer, student, method="chain", max_tokens=256)
    rng = np.random.default_rng(1)
    chained = 0
    for _ in range(4):
        r = random_record(tiny_tokenizer, rng, counts=counts, with_true=True)
        view = example_of(r)
        want, got = exact.example(r, view), chain.example(r, view)
        a = exact.align(r)
        t_ids = np.asarray(r.input_ids, dtype=np.int64)
        for s in np.flatnonzero(want["teacher_aligned"].numpy()):
            target = target_dict(want, s)
            t = int(a.teacher_row[s])
            nxt = int(a.teacher_row[s + 1]) if s + 1 < len(a.teacher_row) else -1
            spelled = b"".join(exact.teacher.pieces[i] for i in t_ids[t:nxt])
            label = int(a.input_ids[s])
            if nxt - t >= 2 and spelled == exact.student_bytes.pieces[label]:
                mass = 1.0
                for row in range(t, nxt):
                    hit = (view["teacher_ids"][row] == int(t_ids[row])) & view["teacher_valid"][row]
                    mass *= float(view["teacher_probs"][row][hit].sum())
                source = int(exact.id_map[t_ids[t]])
                target[source] = target.get(source, 0.0) - mass
                target[label] = target.get(label, 0.0) + mass
                chained += mass > 0
            assert target_dict(got, s) == pytest.approx(
                {k: v for k, v in target.items() if abs(v) > 1e-9 or k == -1}, abs=1e-6
            )
    assert chained > 0 and chain.stats.chained == chained


def target_dict(out, s: int) -> dict[int, float]:
    """Row ``s``'s target as {student id: mass}, the tail under -1."""
    valid = out["teacher_valid"][s]
    found = dict(
        zip(out["teacher_ids"][s][valid].tolist(), out["teacher_probs"][s][valid].tolist())
    )
    return {**found, -1: float(out["teacher_tail"][s])}


def ids_index(out, s, sid) -> int:
    return int(np.flatnonzero(out["teacher_ids"][s].numpy() == sid)[0])


def slow_loss(logits: torch.Tensor, batch: dict, alpha: float) -> torch.Tensor:
    """The obvious per-row loop: aligned trained rows forward KL with a rest bucket (mixed
    with alpha CE), the other trained rows cross-entropy, divided by the trained rows."""
    total, rows = logits.new_zeros(()), 0
    b, length = batch["labels"].shape
    for i in range(b):
        for pos in range(length - 1):
            label = int(batch["labels"][i, pos + 1])
            if label == -100:
                continue
            rows += 1
            logq = torch.log_softmax(logits[i, pos].double(), -1)
            ce = -logq[label]
            if not batch["teacher_aligned"][i, pos + 1]:
                total = total + ce
                continue
            valid = batch["teacher_valid"][i, pos + 1]
            ids = batch["teacher_ids"][i, pos + 1][valid]
            p = batch["teacher_probs"][i, pos + 1][valid].double()
            rest = batch["teacher_tail"][i, pos + 1].double()
            z = p.sum() + rest
            p, rest = p / z, rest / z
            kl = sum(pi * (math.log(pi) - logq[j]) for pi, j in zip(p.tolist(), ids) if pi > 0)
            q_rest = 1 - logq[ids].exp().sum()
            if rest > 0:
                kl = kl + rest * (torch.log(rest) - torch.log(q_rest))
            total = total + (1 - alpha) * kl + alpha * ce
    return total / rows


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_loss_and_gradients_match_a_slow_reference(tiny_tokenizer, alpha):
    """Two rows of different lengths (one padded), aligned rows and CE-only rows."""
    student = hand_student()
    cross = CrossTokenizer(tiny_tokenizer, student, method="prefix", max_tokens=256)
    rng = np.random.default_rng(1)
    records = [random_record(tiny_tokenizer, rng) for _ in range(2)]
    records[1].input_ids[20:] = tiny_tokenizer.convert_tokens_to_ids("e")  # a shorter student row
    batch = DistillCollator()([cross.example(r, example_of(r)) for r in records])
    trained = batch["labels"][:, 1:] != -100
    aligned = batch["teacher_aligned"][:, 1:]
    assert (trained & aligned).sum() > 5 and (trained & ~aligned).sum() > 5
    assert batch["attention_mask"].sum(1).unique().numel() == 2
    torch.manual_seed(0)
    b, length = batch["input_ids"].shape
    logits = (torch.randn(b, length, len(student)) * 3).requires_grad_()
    got = DistillationLoss("forward-kl", alpha=alpha)(batch, logits=logits)
    (grad,) = torch.autograd.grad(got, logits)
    ref_logits = logits.detach().double().requires_grad_()
    want = slow_loss(ref_logits, batch, alpha)
    (ref_grad,) = torch.autograd.grad(want, ref_logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    # the chunked path (hidden states and an LM head) computes the same
    hidden = torch.randn(b, length, 8)
    head = torch.nn.Linear(8, len(student), bias=False)
    chunked = DistillationLoss("forward-kl", alpha=alpha, chunk_size=3)(
        batch, hidden=hidden, head=head
    )
    plain = DistillationLoss("forward-kl", alpha=alpha)(batch, logits=head(hidden))
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)


def test_teacher_ids_past_the_tokenizer_join_the_tail(tiny_tokenizer):
    """A cache whose vocabulary has more rows than its tokenizer has tokens (Qwen2.5: 152,064
    for 151,665): a support id past the tokenizer carries its mass to the tail."""
    rows = len(tiny_tokenizer) + 10
    cross = CrossTokenizer(
        tiny_tokenizer, hand_student(), method="prefix", max_tokens=256, teacher_rows=rows
    )
    r = random_record(tiny_tokenizer, np.random.default_rng(2))
    r.ids[::6] = rows - 1  # the first id of every position's support
    view, out = example_of(r), cross.example(r, example_of(r))
    aligned = out["teacher_aligned"].numpy()
    assert aligned.any() and (view["teacher_ids"] >= len(tiny_tokenizer)).any()
    total = out["teacher_probs"].sum(1) + out["teacher_tail"]
    assert (out["teacher_tail"][aligned] > 0).all()
    assert torch.allclose(total[aligned], torch.ones(int(aligned.sum())), atol=1e-5)
    with pytest.raises(LogitcacheError, match="more than 2,097,152"):
        CrossTokenizer(tiny_tokenizer, hand_student(), max_tokens=8, teacher_rows=1 << 24)
