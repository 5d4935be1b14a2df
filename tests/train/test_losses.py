"""Distillation losses against a slow, obvious float64 reference: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.train.losses import (
    LOSSES,
    TAIL_POLICIES,
    TeacherTargets,
    chunked_loss,
    cross_entropy_sum,
    distill_loss,
    teacher_kl,
)

N, V, K = 6, 13, 4
# (temperature, alpha, beta)
SETTINGS = [(1.0, 0.0, 0.5), (2.0, 0.3, 0.2), (0.7, 0.0, 0.9)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread only fights the other workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dense_teacher(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(n, v, generator=g, dtype=torch.float64), dim=-1)


def make_targets(kind: str, seed: int = 0, n: int = N, v: int = V, k: int = K) -> TeacherTargets:
    """Top-k or sampled targets with padding, a zero probability, labels in and out."""
    g = torch.Generator().manual_seed(seed + 1000)
    teacher = dense_teacher(n, v, seed)
    ids = torch.zeros(n, k, dtype=torch.int64)
    probs = torch.zeros(n, k, dtype=torch.float64)
    valid = torch.zeros(n, k, dtype=torch.bool)
    tail = torch.zeros(n, dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.int64)
    for r in range(n):
        if kind == "topk":
            width = 2 if r % 3 == 1 else k  # rows 1, 4, ... are padded
            top = teacher[r].topk(width)
            ids[r, :width], probs[r, :width] = top.indices, top.values
            if r % 3 == 2:
                probs[r, width - 1] = 0.0  # a stored zero: its mass goes to the tail
            tail[r] = 1.0 - probs[r].sum()
        else:  # sampled: 4 draws with replacement, counts / 4, no tail
            draws = torch.multinomial(teacher[r], k, replacement=True, generator=g)
            uniq, counts = draws.unique(return_counts=True)
            width = len(uniq)
            ids[r, :width], probs[r, :width] = uniq, counts / k
        valid[r, :width] = True
        support = ids[r, :width].tolist()
        if r % 2 == 0:
            labels[r] = support[-1]
        else:
            labels[r] = next(i for i in range(v) if i not in support)
            ids[r, width:] = labels[r]  # padding that collides with the label must not count
    return TeacherTargets(ids, probs.float(), valid, tail.float(), labels)


def reference_categories(
    targets: TeacherTargets, r: int, tail: str, temperature: float, v: int
) -> list[tuple[list[int], float]]:
    """Row r's categories as (vocabulary ids, teacher probability at T), built by hand."""
    cats: list[tuple[list[int], float]] = []
    for i, p, ok in zip(targets.ids[r], targets.probs[r], targets.valid[r], strict=True):
        if ok:
            cats.append(([int(i)], float(p)))
    support = [ids[0] for ids, _ in cats]
    rest_mass = float(targets.tail[r])
    label = int(targets.labels[r])
    if tail == "bucket":
        cats.append(([j for j in range(v) if j not in support], rest_mass))
    elif tail == "label":
        if label in support:
            at = support.index(label)
            cats[at] = ([label], cats[at][1] + rest_mass)
        else:
            cats.append(([label], rest_mass))
    masses = [m for _, m in cats]
    masses = [m / sum(masses) for m in masses]
    masses = [m ** (1.0 / temperature) for m in masses]
    masses = [m / sum(masses) for m in masses]
    return [(ids, m) for (ids, _), m in zip(cats, masses, strict=True)]


def reference_loss(logits, targets, *, loss, tail, temperature=1.0, alpha=0.0, beta=0.5):
    """The textbook formulas, row by row, category by category, in float64."""
    logits = logits.double()
    v = logits.shape[1]
    total = logits.new_zeros(())
    for r in range(logits.shape[0]):
        cats = reference_categories(targets, r, tail, temperature, v)
        q_full = torch.softmax(logits[r] / temperature, dim=-1)
        p = [m for _, m in cats]
        q = [q_full[ids].sum() for ids, _ in cats]  # the rest: an explicit sum over ids
        if loss != "forward-kl" and tail != "bucket":
            q_sum = sum(q)
            q = [qi / q_sum for qi in q]
        terms = []
        for pi, qi in zip(p, q, strict=True):
            if loss == "forward-kl":
                terms.append(pi * (math.log(pi) - torch.log(qi)) if pi > 0 else qi * 0)
            elif loss == "reverse-kl":
                terms.append(qi * (torch.log(qi) - math.log(max(pi, 1e-12))))
            elif loss == "tvd":
                terms.append(0.5 * torch.abs(pi - qi))
            else:
                mi = beta * pi + (1 - beta) * qi
                kl_p = pi * (math.log(pi) - torch.log(mi)) if pi > 0 else qi * 0
                kl_q = qi * (torch.log(qi) - torch.log(mi))
                terms.append(beta * kl_p + (1 - beta) * kl_q)
        kd = sum(terms)
        ce = -torch.log_softmax(logits[r], dim=-1)[targets.labels[r]]
        total = total + (1 - alpha) * temperature**2 * kd + alpha * ce
    return total


def random_logits(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, v, generator=g, dtype=torch.float64)


def value_and_grad(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("settings_", SETTINGS, ids=lambda s: "T{}-a{}-b{}".format(*s))
@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference(loss, tail, kind, settings_):
    temperature, alpha, beta = settings_
    targets = make_targets(kind, seed=3)
    logits = random_logits(7).float().double()  # exactly representable in float32 too
    kw = dict(loss=loss, tail=tail, temperature=temperature, alpha=alpha, beta=beta)
    ref, ref_grad = value_and_grad(lambda x: reference_loss(x, targets, **kw), logits)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        fast, fast_grad = value_and_grad(lambda x: distill_loss(x, targets, **kw), logits.to(dtype))
        assert fast.dtype == dtype
        torch.testing.assert_close(fast.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(fast_grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("tail", TAIL_POLICIES)
def test_alpha_one_matches_reference(tail):
    targets = make_targets("topk", seed=3)
    kw = dict(loss="jsd", tail=tail, temperature=1.5, alpha=1.0)
    fast, fast_grad = value_and_grad(lambda x: distill_loss(x, targets, **kw), random_logits(7))
    ref, ref_grad = value_and_grad(lambda x: reference_loss(x, targets, **kw), random_logits(7))
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_label_in_support_is_not_double_counted():
    # One row, label = support id 2, tail 0.3: the label category holds 0.5 + 0.3, once.
    targets = TeacherTargets(
        ids=torch.tensor([[2, 5, 2]]),
        probs=torch.tensor([[0.5, 0.2, 0.0]]),
        valid=torch.tensor([[True, True, False]]),
        tail=torch.tensor([0.3]),
        labels=torch.tensor([2]),
    )
    student = torch.full((1, 7), -1e4, dtype=torch.float64)
    student[0, 2], student[0, 5] = math.log(0.8), math.log(0.2)
    for loss in LOSSES:
        value = distill_loss(student, targets, loss=loss, tail="label")
        assert abs(value.item()) < 1e-9, loss


def matching_student(targets: TeacherTargets, tail: str, temperature: float, v: int):
    """Logits whose softmax at T is the teacher's category distribution, spread evenly
    inside each category; ids outside every category get 1e-30."""
    dense = torch.full((len(targets), v), 1e-30, dtype=torch.float64)
    for r in range(len(targets)):
        for ids, m in reference_categories(targets, r, tail, temperature, v):
            dense[r, ids] = max(m, 1e-30) / len(ids)
    return temperature * dense.log()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("loss", LOSSES)
def test_zero_when_student_equals_teacher(loss, tail, kind, temperature):
    targets = make_targets(kind, seed=5)
    student = matching_student(targets, tail, temperature, V)
    value = distill_loss(student, targets, loss=loss, tail=tail, temperature=temperature)
    assert abs(value.item()) < 1e-9


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["topk", "sampled"]),
    loss=st.sampled_from(LOSSES),
    tail=st.sampled_from(TAIL_POLICIES),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    beta=st.floats(0.05, 0.95),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_nonnegative_per_row_with_finite_gradients(
    seed, kind, loss, tail, temperature, beta, scale
):
    targets = make_targets(kind, seed=seed)
    logits = random_logits(seed + 1, scale=scale).float().requires_grad_(True)
    kw = dict(loss=loss, tail=tail, temperature=temperature, beta=beta)
    rows = torch.stack(
        [distill_loss(logits[r : r + 1], targets[r : r + 1], **kw) for r in range(N)]
    )
    assert (rows >= -1e-6).all(), rows
    rows.sum().backward()
    assert torch.isfinite(logits.grad).all()


def topk_targets(teacher: torch.Tensor, k: int) -> TeacherTargets:
    """Plain top-k targets of a dense teacher [N, V]: no padding, the rest in the tail."""
    top = teacher.topk(k)
    n = teacher.shape[0]
    valid = torch.ones(n, k, dtype=torch.bool)
    labels = torch.zeros(n, dtype=torch.int64)
    return TeacherTargets(top.indices, top.values, valid, 1.0 - top.values.sum(-1), labels)


def test_renorm_is_biased_toward_the_support_bucket_is_not():
    teacher = dense_teacher(N, V, seed=11)
    targets = topk_targets(teacher, K)
    true_student = teacher.log()  # the real teacher, tail included
    support_only = torch.full_like(true_student, -1e4)  # the teacher's head, renormalized
    support_only.scatter_(1, targets.ids, targets.probs.log())

    renorm_true = distill_loss(true_student, targets, tail="renorm")
    renorm_support = distill_loss(support_only, targets, tail="renorm")
    assert renorm_support.item() < 1e-9 < renorm_true.item()
    # Its value for the true teacher is exactly sum over rows of -log(1 - tail).
    expected = -torch.log1p(-targets.tail).sum()
    torch.testing.assert_close(renorm_true, expected, rtol=1e-10, atol=1e-10)

    bucket_true = distill_loss(true_student, targets, tail="bucket")
    bucket_support = distill_loss(support_only, targets, tail="bucket")
    assert bucket_true.item() < 1e-9 < bucket_support.item()


def test_teacher_kl_lower_bounds_the_dense_kl_and_is_exact_with_one_id_left():
    teacher = dense_teacher(N, V, seed=2)
    student = random_logits(4)
    dense_kl = (teacher * (teacher.log() - torch.log_softmax(student, -1))).sum()
    for k, exact in [(4, False), (V - 1, True)]:
        value = teacher_kl(student, topk_targets(teacher, k))
        assert value <= dense_kl + 1e-12
        if exact:
            torch.testing.assert_close(value, dense_kl, rtol=1e-10, atol=1e-10)
        else:
            assert value < dense_kl - 1e-3


@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("loss", LOSSES)
def test_student_with_no_mass_off_support_has_finite_gradients(loss, tail):
    targets = make_targets("topk", seed=9)
    logits = torch.zeros(N, V)
    for r in range(N):
        logits[r, targets.ids[r][targets.valid[r]]] = 60.0  # off-support mass ~ e^-60
    logits.requires_grad_(True)
    value = distill_loss(logits, targets, loss=loss, tail=tail, temperature=1.5)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    if loss == "forward-kl" and tail == "bucket":
        # The rest bucket still asks for mass off the support (descent raises those logits).
        off = torch.ones(N, V, dtype=torch.bool)
        for r in range(N):
            off[r, targets.ids[r][targets.valid[r]]] = False
        assert (logits.grad[off] < 0).all()


def test_bf16_logits_are_computed_in_float32():
    targets = make_targets("topk")
    logits = random_logits(1).to(torch.bfloat16)
    value = distill_loss(logits, targets, loss="jsd", alpha=0.3)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, distill_loss(logits.float(), targets, loss="jsd", alpha=0.3))


def test_cross_entropy_sum():
    logits, labels = random_logits(2).float(), torch.arange(N) % V
    value = cross_entropy_sum(logits.bfloat16(), labels)
    assert value.dtype == torch.float32
    expected = F.cross_entropy(logits.bfloat16().float(), labels, reduction="sum")
    torch.testing.assert_close(value, expected)


def test_empty_batch_is_zero():
    targets = make_targets("topk")[0:0]
    logits = torch.zeros(0, V, requires_grad=True)
    assert distill_loss(logits, targets, loss="jsd", alpha=0.5).item() == 0.0
    hidden = torch.zeros(0, 3, requires_grad=True)
    value = chunked_loss(hidden, torch.nn.Linear(3, V), targets)
    value.backward()
    assert value.item() == 0.0


# ---------------------------------------------------------------------------- chunking


def tiny_head(h: int, v: int, dtype=torch.float64, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(h, v, bias=False, dtype=dtype)


@pytest.mark.parametrize("chunk_size", [3, 5, 64])  # N = 10
@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(loss="jsd", tail="label", temperature=2.0, alpha=0.3, beta=0.3),
        dict(loss="reverse-kl", tail="renorm", temperature=0.5),
        None,  # cross-entropy only
    ],
    ids=["default", "jsd-label", "rkl-renorm", "ce"],
)
def test_chunked_equals_unchunked(chunk_size, kw):
    n, h = 10, 8
    targets = make_targets("topk", seed=1, n=n)
    head = tiny_head(h, V)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(fn):
        head.zero_grad()
        x = hidden.clone().requires_grad_(True)
        value = fn(x)
        value.backward()
        return value.detach(), x.grad, head.weight.grad.clone()

    if kw is None:
        chunked = run(
            lambda x: chunked_loss(x, head, None, labels=targets.labels, chunk_size=chunk_size)
        )
        plain = run(lambda x: F.cross_entropy(head(x), targets.labels, reduction="sum"))
    else:
        chunked = run(lambda x: chunked_loss(x, head, targets, chunk_size=chunk_size, **kw))
        plain = run(lambda x: distill_loss(head(x), targets, **kw))
    for got, want in zip(chunked, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def saved_numels(fn) -> list[int]:
    """numel of every tensor autograd saves for backward while fn runs."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = fn()
    value.backward()
    return sizes


@pytest.mark.parametrize("ce_only", [False, True])
def test_chunked_never_saves_full_logits(ce_only):
    n, h, v, chunk = 64, 16, 512, 8  # one chunk of logits: 4,096 values; all of them: 32,768
    targets = make_targets("topk", seed=4, n=n, v=v, k=8)
    head = tiny_head(h, v, dtype=torch.float32)
    hidden = torch.randn(n, h, requires_grad=True)
    kw = dict(loss="jsd", tail="bucket", temperature=2.0, alpha=0.5)

    if ce_only:
        chunked = saved_numels(
            lambda: chunked_loss(hidden, head, None, labels=targets.labels, chunk_size=chunk)
        )
        plain = saved_numels(lambda: cross_entropy_sum(head(hidden), targets.labels))
    else:
        chunked = saved_numels(lambda: chunked_loss(hidden, head, targets, chunk_size=chunk, **kw))
        plain = saved_numels(lambda: distill_loss(head(hidden), targets, **kw))
    # Checkpointing keeps nothing per chunk: all saved tensors together are less than one
    # chunk's logits (chunking alone, without it, would keep N * V values over the chunks).
    assert sum(chunked) < chunk * v
    assert max(plain) >= n * v  # the hooks do see a full [N, V] tensor when there is one
    assert head.weight.grad is not None and hidden.grad is not None


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(loss="kl"), "unknown loss 'kl'"),
        (dict(tail="zero"), "unknown tail policy 'zero'"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(beta=0.0), "beta"),
        (dict(beta=1.0), "beta"),
    ],
)
def test_bad_arguments_raise(kw, match):
    targets = make_targets("topk")
    logits = random_logits(0)
    with pytest.raises(ValueError, match=match):
        distill_loss(logits, targets, **kw)
    with pytest.raises(ValueError, match=match):
        chunked_loss(logits, torch.nn.Identity(), targets, **kw)


def test_bad_chunked_arguments_raise():
    targets = make_targets("topk")
    hidden, head = random_logits(0), torch.nn.Identity()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(hidden, head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="needs targets, or labels"):
        chunked_loss(hidden, head, None)
    with pytest.raises(ValueError, match="inside targets"):
        chunked_loss(hidden, head, targets, labels=targets.labels)
    with pytest.raises(ValueError, match="need targets"):
        chunked_loss(hidden, head, None, labels=targets.labels, loss="jsd")
    with pytest.raises(ValueError, match="unknown distill_loss options"):
        chunked_loss(hidden, head, targets, temprature=2.0)
    with pytest.raises(ValueError, match="rows"):
        chunked_loss(hidden[:3], head, targets)


def test_bad_targets_raise():
    t = make_targets("topk")
    with pytest.raises(ValueError, match="probs"):
        TeacherTargets(t.ids, t.probs[:, :2], t.valid, t.tail, t.labels)
    with pytest.raises(ValueError, match="tail"):
        TeacherTargets(t.ids, t.probs, t.valid, t.tail[:2], t.labels)
    with pytest.raises(ValueError, match="int64"):
        TeacherTargets(t.ids.int(), t.probs, t.valid, t.tail, t.labels)
    with pytest.raises(ValueError, match="bool"):
        TeacherTargets(t.ids, t.probs, t.valid.int(), t.tail, t.labels)


def test_full_vocab_kd_matches_dense_reference():
    from logitcache.train.losses import full_vocab_kd

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (5,), generator=gen)
    t, a = 2.0, 0.3
    got = full_vocab_kd(logits, teacher, labels, temperature=t, alpha=a)
    p = torch.softmax(teacher / t, -1)
    q = torch.log_softmax(logits / t, -1)
    kl = (p * (p.log() - q)).sum()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    want = (1 - a) * t * t * kl + a * ce
    assert torch.allclose(got, want, atol=1e-10)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g1, g2, atol=1e-10)
    assert full_vocab_kd(teacher, teacher, labels).abs() < 1e-10
