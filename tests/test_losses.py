"""Identities for lmdistill.losses: each test states one property that a wrong loss would break."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import (
    DIVERGENCE_KINDS,
    _sparse_buckets,
    chunked_distill_loss,
    cross_entropy,
    divergence,
    kd_loss,
    sparse_kd_loss,
)

# (kind, beta, alpha) covering every kind and the special-cased endpoints.
SETTINGS = [
    ("forward-kl", 0.5, 0.1),
    ("reverse-kl", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 0.3, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew-forward-kl", 0.5, 0.0),
    ("skew-forward-kl", 0.5, 0.1),
    ("skew-reverse-kl", 0.5, 0.1),
    ("skew-reverse-kl", 0.5, 0.7),
    ("tvd", 0.5, 0.1),
]
SETTING_IDS = [f"{k}-b{b}-a{a}" for k, b, a in SETTINGS]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: intra-op thread hand-offs would cost more than the math (seconds on small VMs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randn(*shape: int, seed: int, scale: float = 2.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def logprobs(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.log_softmax(randn(*shape, seed=seed, dtype=dtype), dim=-1)


def make_labels(b: int, t: int, v: int, seed: int, masked: list[tuple[int, int]]) -> torch.Tensor:
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))
    for i, j in masked:
        labels[i, j] = -100
    return labels


def topk_cache(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a top-k cache stores: ids sorted by teacher probability, and their τ=1 log-probs."""
    lp = F.log_softmax(teacher_logits, dim=-1)
    values, ids = lp.topk(k, dim=-1)
    return ids, values


def prob_space_reference(p_s: torch.Tensor, p_t: torch.Tensor, kind: str, beta: float, alpha: float) -> torch.Tensor:
    """Each divergence written directly from its definition with probabilities (float64), mixtures in prob space."""

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward-kl" or (kind == "jsd" and beta == 0.0):
        return kl(p_t, p_s)
    if kind == "reverse-kl" or (kind == "jsd" and beta == 1.0):
        return kl(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if kind == "skew-forward-kl":
        return kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if kind == "skew-reverse-kl":
        return kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    return 0.5 * (p_t - p_s).abs().sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# divergence
# ----------------------------------------------------------------------------------------------------------------


def test_settings_cover_every_kind():
    assert {k for k, _, _ in SETTINGS} == set(DIVERGENCE_KINDS)


@pytest.mark.parametrize(("kind", "beta", "alpha"), SETTINGS, ids=SETTING_IDS)
def test_divergence_of_a_distribution_with_itself_is_zero(kind, beta, alpha):
    for dtype, atol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        lp = logprobs(7, 11, seed=0, dtype=dtype)
        d = divergence(lp, lp.clone(), kind, beta=beta, alpha=alpha)
        assert d.shape == (7,)
        torch.testing.assert_close(d, torch.zeros_like(d), atol=atol, rtol=0)


@pytest.mark.parametrize(("kind", "beta", "alpha"), SETTINGS, ids=SETTING_IDS)
def test_divergence_is_nonnegative_and_matches_its_definition(kind, beta, alpha):
    ls, lt = logprobs(64, 13, seed=1), logprobs(64, 13, seed=2)
    d = divergence(ls, lt, kind, beta=beta, alpha=alpha)
    assert (d > 0).all()  # distinct random distributions: strictly positive
    ref = prob_space_reference(ls.exp(), lt.exp(), kind, beta, alpha)
    torch.testing.assert_close(d, ref, atol=1e-12, rtol=1e-10)
    # float32 and bf16 inputs run in float32 and stay close to the float64 value.
    torch.testing.assert_close(divergence(ls.float(), lt.float(), kind, beta=beta, alpha=alpha), ref.float())
    d_bf16 = divergence(ls.bfloat16(), lt.bfloat16(), kind, beta=beta, alpha=alpha)
    assert d_bf16.dtype == torch.float32
    torch.testing.assert_close(d_bf16, ref.float(), atol=0.05, rtol=0.05)


def test_forward_and_reverse_kl_match_torch_kl_div():
    ls, lt = logprobs(32, 17, seed=3), logprobs(32, 17, seed=4)
    # F.kl_div(input, target) = KL(target‖input)
    forward_ref = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    reverse_ref = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(divergence(ls, lt, "forward-kl"), forward_ref, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(divergence(ls, lt, "reverse-kl"), reverse_ref, atol=1e-13, rtol=1e-12)


def test_jsd_endpoints_are_forward_and_reverse_kl_and_half_is_symmetric():
    ls, lt = logprobs(32, 9, seed=5), logprobs(32, 9, seed=6)
    assert torch.equal(divergence(ls, lt, "jsd", beta=0.0), divergence(ls, lt, "forward-kl"))
    assert torch.equal(divergence(ls, lt, "jsd", beta=1.0), divergence(ls, lt, "reverse-kl"))
    torch.testing.assert_close(divergence(ls, lt, "jsd", beta=0.5), divergence(lt, ls, "jsd", beta=0.5))
    # β and 1-β swap roles under swapping teacher and student.
    torch.testing.assert_close(divergence(ls, lt, "jsd", beta=0.2), divergence(lt, ls, "jsd", beta=0.8))
    # β=0.5 is bounded by log 2.
    assert (divergence(ls, lt, "jsd", beta=0.5) <= math.log(2)).all()


def test_skew_kl_endpoints():
    ls, lt = logprobs(32, 9, seed=7), logprobs(32, 9, seed=8)
    torch.testing.assert_close(divergence(ls, lt, "skew-forward-kl", alpha=0.0), divergence(ls, lt, "forward-kl"))
    torch.testing.assert_close(divergence(ls, lt, "skew-reverse-kl", alpha=0.0), divergence(ls, lt, "reverse-kl"))
    for kind in ("skew-forward-kl", "skew-reverse-kl"):
        d = divergence(ls, lt, kind, alpha=1.0)
        torch.testing.assert_close(d, torch.zeros_like(d), atol=1e-12, rtol=0)
        # skewing toward the distribution itself only shrinks the divergence
        assert (divergence(ls, lt, kind, alpha=0.5) < divergence(ls, lt, kind, alpha=0.1)).all()


@pytest.mark.parametrize(("kind", "beta", "alpha"), SETTINGS, ids=SETTING_IDS)
def test_zero_probabilities_give_finite_values_and_gradients(kind, beta, alpha):
    """Entries with probability 0 in both distributions (e.g. padded vocab) contribute exactly 0."""
    s, t = randn(16, 8, seed=9), randn(16, 8, seed=10)
    s_pad = torch.cat([s, torch.full((16, 3), -math.inf, dtype=s.dtype)], -1).requires_grad_()
    t_pad = torch.cat([t, torch.full((16, 3), -math.inf, dtype=t.dtype)], -1)
    d_pad = divergence(F.log_softmax(s_pad, -1), F.log_softmax(t_pad, -1), kind, beta=beta, alpha=alpha)
    d = divergence(F.log_softmax(s, -1), F.log_softmax(t, -1), kind, beta=beta, alpha=alpha)
    torch.testing.assert_close(d_pad, d, atol=1e-12, rtol=1e-12)
    d_pad.sum().backward()
    assert torch.isfinite(s_pad.grad).all()
    assert (s_pad.grad[:, 8:] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# dense losses
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_temperature_squared_scaling_of_the_forward_kl_gradient(temperature):
    b, t, v = 2, 5, 7
    s = randn(b, t, v, seed=11).requires_grad_()
    teacher = randn(b, t, v, seed=12)
    labels = make_labels(b, t, v, seed=13, masked=[(0, 1), (1, 4)])
    n = int((labels != -100).sum())
    kd_loss(s, teacher, labels, temperature=temperature).backward()
    expected = temperature * (F.softmax(s.detach() / temperature, -1) - F.softmax(teacher / temperature, -1)) / n
    expected[labels == -100] = 0
    torch.testing.assert_close(s.grad, expected, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("temperature", [0.7, 3.0])
@pytest.mark.parametrize(("kind", "beta", "alpha"), SETTINGS, ids=SETTING_IDS)
def test_kd_loss_is_tau_squared_times_the_mean_divergence_of_softened_distributions(kind, beta, alpha, temperature):
    b, t, v = 2, 6, 9
    s, teacher = randn(b, t, v, seed=14), randn(b, t, v, seed=15)
    labels = make_labels(b, t, v, seed=16, masked=[(0, 0), (1, 5), (1, 2)])
    valid = labels != -100
    per_pos = prob_space_reference(
        F.softmax(s[valid] / temperature, -1), F.softmax(teacher[valid] / temperature, -1), kind, beta, alpha
    )
    loss = kd_loss(s, teacher, labels, kind=kind, temperature=temperature, beta=beta, alpha=alpha)
    torch.testing.assert_close(loss, temperature**2 * per_pos.mean(), atol=1e-12, rtol=1e-10)


def test_cross_entropy_matches_torch():
    b, t, v = 3, 5, 11
    s = randn(b, t, v, seed=17)
    labels = make_labels(b, t, v, seed=18, masked=[(0, 0), (2, 3)])
    ref = F.cross_entropy(s.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(s, labels), ref, atol=1e-13, rtol=1e-12)
    # ignore_index is honoured when it is not -100
    labels7 = labels.masked_fill(labels == -100, 7)
    torch.testing.assert_close(
        cross_entropy(s, labels7, ignore_index=7),
        F.cross_entropy(s.reshape(-1, v), labels7.reshape(-1), ignore_index=7),
    )


def test_hand_computed_values_on_a_fixed_example():
    """2×4×4 example; references from plain Python math, and pinned to 4 decimals."""
    s_list = [
        [[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 1.0], [2.0, -2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]],
        [[-1.0, 0.0, 1.0, 4.0], [3.0, 3.0, 3.0, 3.0], [1.0, 0.0, -1.0, 2.0], [2.5, 0.0, 1.5, -0.5]],
    ]
    t_list = [
        [[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0], [-1.0, 2.0, 0.0, 1.0]],
        [[0.0, 0.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 5.0], [3.0, -1.0, 1.0, 0.0]],
    ]
    l_list = [[1, 2, -100, 0], [3, -100, 0, 2]]

    def log_softmax(x: list[float], tau: float = 1.0) -> list[float]:
        z = [v / tau for v in x]
        lse = max(z) + math.log(sum(math.exp(v - max(z)) for v in z))
        return [v - lse for v in z]

    ce_terms, fkl_terms, rkl_terms = [], [], []
    for b in range(2):
        for t in range(4):
            if l_list[b][t] == -100:
                continue
            ce_terms.append(-log_softmax(s_list[b][t])[l_list[b][t]])
            ls, lt = log_softmax(s_list[b][t], 2.0), log_softmax(t_list[b][t], 2.0)
            fkl_terms.append(4.0 * sum(math.exp(a) * (a - c) for a, c in zip(lt, ls)))
            rkl_terms.append(4.0 * sum(math.exp(c) * (c - a) for a, c in zip(lt, ls)))
    expected = {
        "ce": sum(ce_terms) / 6,
        "forward-kl": sum(fkl_terms) / 6,
        "reverse-kl": sum(rkl_terms) / 6,
    }
    pinned = {"ce": 1.1767, "forward-kl": 0.5237, "reverse-kl": 0.5409}
    for key in pinned:
        assert round(expected[key], 4) == pinned[key]

    s = torch.tensor(s_list, dtype=torch.float32)
    teacher = torch.tensor(t_list, dtype=torch.float32)
    labels = torch.tensor(l_list)
    got = {
        "ce": cross_entropy(s, labels).item(),
        "forward-kl": kd_loss(s, teacher, labels, kind="forward-kl", temperature=2.0).item(),
        "reverse-kl": kd_loss(s, teacher, labels, kind="reverse-kl", temperature=2.0).item(),
    }
    for key in pinned:
        assert got[key] == pytest.approx(expected[key], abs=1e-5)
        assert round(got[key], 4) == pinned[key]


def test_low_precision_inputs_are_computed_in_float32():
    b, t, v = 2, 8, 32
    s, teacher = randn(b, t, v, seed=19), randn(b, t, v, seed=20)
    labels = make_labels(b, t, v, seed=21, masked=[(0, 2)])
    for kind in DIVERGENCE_KINDS:
        ref = kd_loss(s, teacher, labels, kind=kind, temperature=2.0)
        got32 = kd_loss(s.float(), teacher.float(), labels, kind=kind, temperature=2.0)
        torch.testing.assert_close(got32, ref.float(), atol=1e-5, rtol=1e-5)
        s16 = s.bfloat16().requires_grad_()
        got16 = kd_loss(s16, teacher.bfloat16(), labels, kind=kind, temperature=2.0)
        assert got16.dtype == torch.float32
        # Same values as float32 on the bf16-rounded inputs: only the inputs are rounded, not the softmax.
        torch.testing.assert_close(
            got16, kd_loss(s.bfloat16().float(), teacher.bfloat16().float(), labels, kind=kind, temperature=2.0)
        )
        torch.testing.assert_close(got16, ref.float(), atol=0.02, rtol=0.02)
        got16.backward()
        assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()
    ce16 = cross_entropy(s.bfloat16(), labels)
    torch.testing.assert_close(ce16, cross_entropy(s, labels).float(), rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------------------------------------------------
# masking and normalization
# ----------------------------------------------------------------------------------------------------------------


def _all_losses(s, teacher, labels, kind, **kwargs):
    ids, lps = topk_cache(teacher, 4)
    return {
        "ce": cross_entropy(s, labels, **kwargs),
        "kd": kd_loss(s, teacher, labels, kind=kind, temperature=1.5, **kwargs),
        "sparse": sparse_kd_loss(s, ids, lps, labels, kind=kind, temperature=1.5, **kwargs),
    }


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_ignored_positions_change_nothing(kind):
    b, t, v = 2, 6, 10
    labels = make_labels(b, t, v, seed=22, masked=[(0, 1), (0, 5), (1, 0)])
    ignored = labels == -100
    s0, teacher0 = randn(b, t, v, seed=23), randn(b, t, v, seed=24)
    s1, teacher1 = s0.clone(), teacher0.clone()
    s1[ignored] = randn(int(ignored.sum()), v, seed=25, scale=50.0)
    teacher1[ignored] = randn(int(ignored.sum()), v, seed=26, scale=50.0)
    s1[0, 1, 3] = math.nan  # garbage in padding must not leak
    teacher1[1, 0, 2] = math.inf
    ids0, lps0 = topk_cache(teacher0, 4)
    ids1, lps1 = ids0.clone(), lps0.clone()
    lps1[ignored] = 5.0  # not even log-probabilities
    ids1[ignored] = 0  # duplicated ids
    losses = {
        "ce": lambda s_, teacher, ids, lps: cross_entropy(s_, labels),
        "kd": lambda s_, teacher, ids, lps: kd_loss(s_, teacher, labels, kind=kind, temperature=1.5),
        "sparse": lambda s_, teacher, ids, lps: sparse_kd_loss(s_, ids, lps, labels, kind=kind, temperature=1.5),
    }
    for name, fn in losses.items():
        a, b_ = s0.clone().requires_grad_(), s1.clone().requires_grad_()
        loss_a, loss_b = fn(a, teacher0, ids0, lps0), fn(b_, teacher1, ids1, lps1)
        assert torch.equal(loss_a, loss_b), name
        loss_a.backward()
        loss_b.backward()
        assert torch.equal(a.grad, b_.grad), name
        assert (a.grad[ignored] == 0).all()

    # chunked path: garbage hidden states at ignored positions
    d = 4
    h0, head = randn(b, t, d, seed=27), randn(v, d, seed=28).requires_grad_()
    th0, t_head = randn(b, t, d, seed=29), randn(v, d, seed=30)
    h1, th1 = h0.clone(), th0.clone()
    h1[ignored], th1[ignored] = math.nan, math.inf
    grads = []
    for h, th in ((h0, th0), (h1, th1)):
        h = h.clone().requires_grad_()
        total, _, _ = chunked_distill_loss(
            h, head, labels, teacher_hidden=th, teacher_head=t_head, kd_weight=0.5, kind=kind, chunk_size=3
        )
        grads.append((total.detach(), *torch.autograd.grad(total, (h, head))))
    for x, y in zip(*grads):
        assert torch.equal(x, y)
    assert (grads[1][1][ignored] == 0).all()


def test_all_masked_batch_is_exactly_zero_with_a_graph():
    b, t, v, d = 2, 3, 8, 4
    labels = torch.full((b, t), -100)
    s = randn(b, t, v, seed=27).requires_grad_()
    teacher = randn(b, t, v, seed=28)
    for name, loss in _all_losses(s, teacher, labels, "jsd").items():
        assert loss.item() == 0.0 and not torch.isnan(loss), name
        loss.backward()
        assert s.grad is not None and (s.grad == 0).all()
    for num_items in (0, 10, torch.tensor(0)):
        assert kd_loss(s, teacher, labels, num_items=num_items).item() == 0.0
    h = randn(b, t, d, seed=29).requires_grad_()
    head = randn(v, d, seed=30).requires_grad_()
    ids, lps = topk_cache(teacher, 3)
    teachers = [
        {},
        {"teacher_hidden": h.detach(), "teacher_head": head.detach()},
        {"teacher_ids": ids, "teacher_logprobs": lps},
    ]
    for kwargs in teachers:
        total, ce, kd = chunked_distill_loss(h, head, labels, kd_weight=0.5 if kwargs else 0.0, **kwargs)
        assert total.item() == ce.item() == kd.item() == 0.0
        total.backward()
        assert (h.grad == 0).all() and (head.grad == 0).all()


@pytest.mark.parametrize("kind", ["forward-kl", "jsd", "skew-reverse-kl"])
def test_num_items_makes_gradient_accumulation_exact(kind):
    b, t, v = 4, 5, 9
    labels = make_labels(b, t, v, seed=31, masked=[(0, 0), (0, 1), (1, 4), (3, 0), (3, 1), (3, 2)])
    s, teacher = randn(b, t, v, seed=32), randn(b, t, v, seed=33)
    n_global = int((labels != -100).sum())
    splits = [slice(0, 1), slice(1, 3), slice(3, 4)]  # uneven micro-batches with different valid counts
    for num_items in (n_global, torch.tensor(n_global)):
        full_s = s.clone().requires_grad_()
        full = _all_losses(full_s, teacher, labels, kind)
        for name, loss in full.items():
            full_s.grad = None
            loss.backward()
            full_grad = full_s.grad.clone()
            acc_s = s.clone().requires_grad_()
            total = 0.0
            for rows in splits:
                micro = _all_losses(acc_s[rows], teacher[rows], labels[rows], kind, num_items=num_items)[name]
                micro.backward()
                total = total + micro.detach()
            torch.testing.assert_close(total, loss.detach(), atol=1e-13, rtol=1e-12)
            torch.testing.assert_close(acc_s.grad, full_grad, atol=1e-13, rtol=1e-12)
    # Without num_items each micro-batch would be a mean over its own tokens: not the same thing.
    per_micro = sum(cross_entropy(s[rows], labels[rows]) for rows in splits)
    assert not torch.allclose(per_micro, cross_entropy(s, labels))


# ----------------------------------------------------------------------------------------------------------------
# sparse (top-k) teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
@pytest.mark.parametrize(("kind", "beta", "alpha"), SETTINGS, ids=SETTING_IDS)
def test_sparse_with_full_vocabulary_equals_dense(kind, beta, alpha, temperature):
    b, t, v = 2, 5, 12
    s0, teacher = randn(b, t, v, seed=34), randn(b, t, v, seed=35)
    labels = make_labels(b, t, v, seed=36, masked=[(1, 3)])
    ids, lps = topk_cache(teacher, v)
    kw = dict(kind=kind, temperature=temperature, beta=beta, alpha=alpha)
    s_dense, s_sparse = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    dense = kd_loss(s_dense, teacher, labels, **kw)
    sparse = sparse_kd_loss(s_sparse, ids, lps, labels, **kw)
    torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=1e-10)
    dense.backward()
    sparse.backward()
    assert torch.isfinite(s_sparse.grad).all()
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, atol=1e-12, rtol=1e-9)
    # float32 cache and logits: same, to float32 precision, and no NaN from the empty tail bucket.
    sparse32 = sparse_kd_loss(s0.float(), ids, lps.float(), labels, **kw)
    torch.testing.assert_close(sparse32, dense.detach().float(), atol=1e-5, rtol=1e-4)


def test_sparse_buckets_by_hand_at_temperature_one():
    s_row = [0.3, -1.0, 2.0, 0.0, 1.2]
    p_t = [0.05, 0.5, 0.1, 0.3, 0.05]  # teacher probabilities; top-2 are ids 1 and 3
    ids = torch.tensor([[[1, 3]]])
    lps = torch.tensor([[[math.log(0.5), math.log(0.3)]]], dtype=torch.float64)
    s = torch.tensor([[s_row]], dtype=torch.float64)
    labels = torch.zeros(1, 1, dtype=torch.long)

    z = sum(math.exp(x) for x in s_row)
    q = [math.exp(x) / z for x in s_row]
    q_b = [q[1], q[3], q[0] + q[2] + q[4]]
    p_b = [p_t[1], p_t[3], 1 - p_t[1] - p_t[3]]

    log_s, log_t = _sparse_buckets(s[0], ids[0], lps[0], 1.0)
    torch.testing.assert_close(log_s.exp()[0], torch.tensor(q_b, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(log_t.exp()[0], torch.tensor(p_b, dtype=torch.float64), atol=1e-14, rtol=0)

    fkl = sum(p * math.log(p / qq) for p, qq in zip(p_b, q_b))
    rkl = sum(qq * math.log(qq / p) for p, qq in zip(p_b, q_b))
    tvd = 0.5 * sum(abs(p - qq) for p, qq in zip(p_b, q_b))
    for kind, want in [("forward-kl", fkl), ("reverse-kl", rkl), ("tvd", tvd)]:
        got = sparse_kd_loss(s, ids, lps, labels, kind=kind)
        assert got.item() == pytest.approx(want, abs=1e-12), kind
    # Coarsening loses information: the bucketed KL is below the full one (data processing inequality).
    full = sum(p * math.log(p / qq) for p, qq in zip(p_t, q))
    assert fkl < full


def test_sparse_tempered_teacher_spreads_the_tail_uniformly():
    v, tau = 6, 2.0
    ids = torch.tensor([[2, 0]])
    p_top = [0.6, 0.25]
    lps = torch.tensor([[math.log(p) for p in p_top]], dtype=torch.float64)
    s = randn(1, v, seed=37)
    r = 1 - sum(p_top)
    unnorm = [p ** (1 / tau) for p in p_top] + [(v - 2) * (r / (v - 2)) ** (1 / tau)]
    want_t = [u / sum(unnorm) for u in unnorm]
    q = F.softmax(s[0] / tau, -1).tolist()
    want_s = [q[2], q[0], 1 - q[2] - q[0]]
    log_s, log_t = _sparse_buckets(s, ids, lps, tau)
    torch.testing.assert_close(log_t.exp()[0], torch.tensor(want_t, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(log_s.exp()[0], torch.tensor(want_s, dtype=torch.float64), atol=1e-14, rtol=0)


def test_sparse_with_zero_teacher_tail_mass_stays_finite():
    """A cache whose top-k sums to 1 (rounding) must not make reverse KL infinite or NaN."""
    v = 6
    ids = torch.tensor([[[0, 1]]])
    lps = torch.tensor([[[math.log(0.7), math.log(0.3) + 1e-7]]], dtype=torch.float32)  # Σ p_k slightly > 1
    s = randn(1, 1, v, seed=38, dtype=torch.float32).requires_grad_()
    labels = torch.zeros(1, 1, dtype=torch.long)
    for kind in DIVERGENCE_KINDS:
        loss = sparse_kd_loss(s, ids, lps, labels, kind=kind, temperature=1.5)
        assert torch.isfinite(loss) and loss.item() < 100, kind
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all(), kind


# ----------------------------------------------------------------------------------------------------------------
# chunked path
# ----------------------------------------------------------------------------------------------------------------


def _chunked_problem(seed: int = 40, b: int = 3, t: int = 7, v: int = 19, d_s: int = 6, d_t: int = 10):
    h = randn(b, t, d_s, seed=seed, scale=1.0)
    head = randn(v, d_s, seed=seed + 1, scale=1.0)
    th = randn(b, t, d_t, seed=seed + 2, scale=1.0)
    t_head = randn(v, d_t, seed=seed + 3, scale=1.0)
    labels = make_labels(b, t, v, seed=seed + 4, masked=[(0, 0), (0, 1), (1, 6), (2, 3)])
    return h, head, th, t_head, labels


@pytest.mark.parametrize("teacher", ["dense", "sparse", "none"])
@pytest.mark.parametrize(("kind", "temperature"), [("forward-kl", 1.0), ("jsd", 2.0), ("skew-reverse-kl", 0.8)])
def test_chunked_equals_unchunked_in_value_and_gradient(teacher, kind, temperature):
    h0, head0, th, t_head, labels = _chunked_problem()
    n = int((labels != -100).sum())  # 17 valid positions
    ids, lps = topk_cache(th @ t_head.T, 5)
    w = 0.0 if teacher == "none" else 0.3
    kw = dict(kind=kind, temperature=temperature)

    h, head = h0.clone().requires_grad_(), head0.clone().requires_grad_()
    logits = h @ head.T
    ce = cross_entropy(logits, labels)
    if teacher == "dense":
        kd = kd_loss(logits, th @ t_head.T, labels, **kw)
    elif teacher == "sparse":
        kd = sparse_kd_loss(logits, ids, lps, labels, **kw)
    else:
        kd = torch.zeros((), dtype=ce.dtype)
    total = (1 - w) * ce + w * kd
    total.backward()
    teacher_kwargs = {
        "dense": {"teacher_hidden": th, "teacher_head": t_head},
        "sparse": {"teacher_ids": ids, "teacher_logprobs": lps},
        "none": {},
    }[teacher]

    for chunk_size in (1, 4, 5, n, 1024):
        hc, headc = h0.clone().requires_grad_(), head0.clone().requires_grad_()
        out = chunked_distill_loss(hc, headc, labels, kd_weight=w, chunk_size=chunk_size, **kw, **teacher_kwargs)
        for got, want in zip(out, (total, ce, kd)):
            torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-11)
        out[0].backward()
        torch.testing.assert_close(hc.grad, h.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(headc.grad, head.grad, atol=1e-12, rtol=1e-10)


def test_chunked_weights_num_items_and_constant_teacher():
    h0, head0, th, t_head, labels = _chunked_problem(seed=50)
    th, t_head = th.clone().requires_grad_(), t_head.clone().requires_grad_()
    for w in (0.0, 1.0):
        h = h0.clone().requires_grad_()
        total, ce, kd = chunked_distill_loss(
            h, head0, labels, teacher_hidden=th, teacher_head=t_head, kd_weight=w, chunk_size=4, num_items=100
        )
        assert torch.equal(total, ce if w == 0.0 else kd)
        n = int((labels != -100).sum())
        ref_ce = cross_entropy(h.detach() @ head0.T, labels)
        torch.testing.assert_close(ce, ref_ce * n / 100)
        total.backward()
        assert h.grad is not None
    assert th.grad is None and t_head.grad is None  # the teacher is a constant


def test_chunked_low_precision_runs_and_is_close():
    h, head, th, t_head, labels = _chunked_problem(seed=60)
    ref = chunked_distill_loss(h, head, labels, teacher_hidden=th, teacher_head=t_head, kd_weight=0.5, chunk_size=4)
    hb = h.bfloat16().requires_grad_()
    headb = head.bfloat16().requires_grad_()
    out = chunked_distill_loss(
        hb, headb, labels, teacher_hidden=th.bfloat16(), teacher_head=t_head.bfloat16(), kd_weight=0.5, chunk_size=4
    )
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), atol=0.05, rtol=0.05)
    out[0].backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(hb.grad.float()).all()
    assert torch.isfinite(headb.grad.float()).all()


def _bytes_saved_for_backward(fn) -> int:
    """Bytes of distinct storages that autograd saves for the backward while fn() builds its graph."""
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn().backward()
    return sum(storages.values())


def test_chunking_keeps_full_logits_out_of_the_saved_tensors():
    b, t, v, d = 2, 256, 4096, 64
    h = randn(b, t, d, seed=70, scale=1.0, dtype=torch.float32).requires_grad_()
    head = randn(v, d, seed=71, scale=0.1, dtype=torch.float32).requires_grad_()
    th = randn(b, t, d, seed=72, scale=1.0, dtype=torch.float32)
    t_head = randn(v, d, seed=73, scale=0.1, dtype=torch.float32)
    labels = make_labels(b, t, v, seed=74, masked=[(0, 0)])

    def unchunked():
        logits = h @ head.T
        return 0.5 * cross_entropy(logits, labels) + 0.5 * kd_loss(logits, th @ t_head.T, labels)

    def chunked():
        return chunked_distill_loss(
            h, head, labels, teacher_hidden=th, teacher_head=t_head, kd_weight=0.5, chunk_size=128
        )[0]

    full_logits_bytes = b * t * v * 4
    unchunked_bytes = _bytes_saved_for_backward(unchunked)
    chunked_bytes = _bytes_saved_for_backward(chunked)
    assert unchunked_bytes >= 2 * full_logits_bytes  # sanity: the reference does keep [B, T, V] tensors
    assert chunked_bytes < unchunked_bytes / 4
    assert chunked_bytes < full_logits_bytes / 2  # not even one full-logits tensor is kept


# ----------------------------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_error_naming_the_problem():
    s, teacher = randn(2, 3, 5, seed=80), randn(2, 3, 5, seed=81)
    labels = torch.zeros(2, 3, dtype=torch.long)
    ids, lps = topk_cache(teacher, 2)
    h, head = randn(2, 3, 4, seed=82), randn(5, 4, seed=83)
    cases = [
        (lambda: divergence(s, teacher[..., :4], "forward-kl"), r"\(2, 3, 5\).*\(2, 3, 4\)"),
        (lambda: divergence(s, teacher, "kl"), "unknown divergence kind 'kl'"),
        (lambda: divergence(s, teacher, "jsd", beta=1.5), "beta must be in"),
        (lambda: divergence(s, teacher, "skew-forward-kl", alpha=-0.1), "alpha must be in"),
        (lambda: kd_loss(s, teacher, labels, temperature=0.0), "temperature"),
        (lambda: kd_loss(s, teacher, labels, temperature=-1.0), "temperature"),
        (lambda: kd_loss(s, teacher, labels, beta=math.nan, kind="jsd"), "beta"),
        (lambda: kd_loss(s, teacher[:, :2], labels), r"teacher_logits shape \(2, 2, 5\).*student_logits.*\(2, 3, 5\)"),
        (lambda: kd_loss(s, teacher, labels[:, :2]), r"labels shape \(2, 2\).*\(2, 3, 5\)"),
        (lambda: cross_entropy(s, labels[0]), r"labels shape \(3,\)"),
        (lambda: cross_entropy(s, labels, num_items=-1), "num_items"),
        (lambda: cross_entropy(s, labels, num_items=torch.ones(2)), "num_items"),
        (lambda: sparse_kd_loss(s, ids, lps[..., :1], labels), r"teacher_ids shape \(2, 3, 2\).*\(2, 3, 1\)"),
        (lambda: sparse_kd_loss(s, ids[:1], lps[:1], labels), r"teacher_ids shape \(1, 3, 2\).*labels"),
        (lambda: sparse_kd_loss(s, ids.float(), lps, labels), "integer"),
        (lambda: sparse_kd_loss(s, *topk_cache(torch.randn(2, 3, 6), 6), labels), "K=6"),
        (lambda: chunked_distill_loss(h, head, labels, kd_weight=0.5), "no teacher"),
        (lambda: chunked_distill_loss(h, head, labels, teacher_hidden=h), "together"),
        (
            lambda: chunked_distill_loss(
                h, head, labels, teacher_ids=ids, teacher_logprobs=lps, teacher_hidden=h, teacher_head=head
            ),
            "not both",
        ),
        (
            lambda: chunked_distill_loss(h, head, labels, teacher_ids=ids, teacher_logprobs=lps, kd_weight=2.0),
            "kd_weight",
        ),
        (lambda: chunked_distill_loss(h, head, labels, chunk_size=0), "chunk_size"),
        (lambda: chunked_distill_loss(h, head[:, :3], labels), r"student_head shape \(5, 3\)"),
        (
            lambda: chunked_distill_loss(h, head, labels, teacher_hidden=h, teacher_head=head[:4]),
            r"teacher_head shape \(4, 4\)",
        ),
        (lambda: chunked_distill_loss(h[:, :2], head, labels), r"labels shape \(2, 3\).*\(2, 2, 4\)"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [3, 11])
@pytest.mark.parametrize("kd_weight", [0.3, 1.0])
def test_closed_form_sparse_gradient_equals_autograd(kind, temperature, k, kd_weight):
    # The fused path differentiates the bucketed loss by hand; the reference is autograd through full logits.
    g = torch.Generator().manual_seed(7)
    b, t, d, v = 2, 5, 6, 11
    h0 = torch.randn(b, t, d, dtype=torch.float64, generator=g)
    head0 = torch.randn(v, d, dtype=torch.float64, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 1] = -100
    teacher_logits = 2 * torch.randn(b, t, v, dtype=torch.float64, generator=g)
    top = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    ids, lps = top.indices, top.values

    h, head = h0.clone().requires_grad_(), head0.clone().requires_grad_()
    logits = h @ head.T
    ce = cross_entropy(logits, labels)
    kd = sparse_kd_loss(logits, ids, lps, labels, kind=kind, temperature=temperature)
    ((1 - kd_weight) * ce + kd_weight * kd).backward()

    hc, headc = h0.clone().requires_grad_(), head0.clone().requires_grad_()
    total, ce_c, kd_c = chunked_distill_loss(
        hc,
        headc,
        labels,
        teacher_ids=ids,
        teacher_logprobs=lps,
        kd_weight=kd_weight,
        kind=kind,
        temperature=temperature,
        chunk_size=4,
    )
    total.backward()
    torch.testing.assert_close(ce_c, ce.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kd_c, kd.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hc.grad, h.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(headc.grad, head.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("kd_weight", [0.0, 0.4, 1.0])
def test_closed_form_dense_gradient_equals_autograd(kind, temperature, kd_weight):
    g = torch.Generator().manual_seed(11)
    b, t, d, d_t, v = 2, 5, 6, 7, 13
    h0 = torch.randn(b, t, d, dtype=torch.float64, generator=g)
    head0 = torch.randn(v, d, dtype=torch.float64, generator=g)
    th = torch.randn(b, t, d_t, dtype=torch.float64, generator=g)
    t_head = torch.randn(v, d_t, dtype=torch.float64, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[1, 3] = -100

    h, head = h0.clone().requires_grad_(), head0.clone().requires_grad_()
    logits = h @ head.T
    ce = cross_entropy(logits, labels)
    kd = kd_loss(logits, th @ t_head.T, labels, kind=kind, temperature=temperature)
    ((1 - kd_weight) * ce + kd_weight * kd).backward()

    hc, headc = h0.clone().requires_grad_(), head0.clone().requires_grad_()
    total, ce_c, kd_c = chunked_distill_loss(
        hc,
        headc,
        labels,
        teacher_hidden=th,
        teacher_head=t_head,
        kd_weight=kd_weight,
        kind=kind,
        temperature=temperature,
        chunk_size=3,
    )
    total.backward()
    torch.testing.assert_close(ce_c, ce.detach(), rtol=1e-10, atol=1e-12)
    if kd_weight > 0:  # at weight 0 the KD term is not computed
        torch.testing.assert_close(kd_c, kd.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hc.grad, h.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(headc.grad, head.grad, rtol=1e-8, atol=1e-10)
