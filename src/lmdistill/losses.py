"""Distillation losses: cross-entropy, dense and top-k (sparse) KD divergences, and a chunked fused path.

Conventions shared by every public function:

* ``labels`` are already aligned with the logits: the logits at position ``t`` predict ``labels[t]`` (the caller
  shifts). Positions whose label is ``ignore_index`` are dropped before anything is computed, for CE and KD alike, so
  whatever the logits hold there (padding, even NaN) changes neither the loss nor any gradient.
* Every loss is ``(sum over valid positions) / num_items``. ``num_items`` defaults to this call's number of valid
  positions; a training loop with gradient accumulation passes the global number of valid tokens over all
  micro-batches (and processes), which makes the accumulated gradient exactly the full-batch one. ``num_items`` is
  clamped to at least 1, so a call without valid positions returns a 0 that is still attached to the graph.
* Softmax and log-softmax always run in float32 (float64 inputs stay float64), whatever the input dtype.
* Temperature ``τ`` softens both distributions (``logits / τ``) and the divergence is multiplied by ``τ²`` so that
  gradient magnitudes stay comparable across temperatures (Hinton et al., 2015): for forward KL the gradient of
  ``τ² · KL`` with respect to the student logits ``s`` at one position is ``τ · (softmax(s/τ) - softmax(t/τ))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.errors import LmdistillError

__all__ = [
    "DIVERGENCE_KINDS",
    "DivergenceKind",
    "chunked_distill_loss",
    "cross_entropy",
    "divergence",
    "hidden_loss",
    "kd_loss",
    "sparse_kd_loss",
]

DivergenceKind = Literal["forward-kl", "reverse-kl", "jsd", "skew-forward-kl", "skew-reverse-kl", "tvd"]
DIVERGENCE_KINDS: tuple[str, ...] = get_args(DivergenceKind)

# Log-probabilities are clamped to this floor: exp() of it is exactly 0 in float32 and float64, but unlike -inf it
# keeps (log p - log q) and every gradient finite where a probability is 0 (masked vocab entries, empty tail buckets).
_LOG_FLOOR = -1e30
# Lower bound on the teacher's tail mass when K < V: 1 - sum(p_k) below this is rounding noise, and an exact 0 would
# make reverse KL infinite whenever the student puts any mass outside the teacher's top-k.
_MIN_TAIL_MASS = 1e-10


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_divergence_args(kind: str, beta: float, alpha: float) -> None:
    if kind not in DIVERGENCE_KINDS:
        raise LmdistillError(f"unknown divergence kind {kind!r}; expected one of: {', '.join(DIVERGENCE_KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise LmdistillError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise LmdistillError(f"alpha must be in [0, 1], got {alpha}")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise LmdistillError(f"temperature must be a finite number > 0, got {temperature}")


def _check_num_items(num_items: int | Tensor | None) -> None:
    if num_items is None:
        return
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise LmdistillError(
                f"num_items must be an int or a 0-dim tensor, got a tensor of shape {tuple(num_items.shape)}"
            )
    elif num_items < 0:
        raise LmdistillError(f"num_items must be >= 0, got {num_items}")


def _check_logits_labels(name: str, logits: Tensor, labels: Tensor) -> None:
    if logits.dim() < 2:
        raise LmdistillError(f"{name} must have shape [B, T, V], got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise LmdistillError(
            f"labels shape {tuple(labels.shape)} does not match {name} shape {tuple(logits.shape)} "
            f"(expected labels of shape {tuple(logits.shape[:-1])})"
        )


def _check_sparse_teacher(teacher_ids: Tensor, teacher_logprobs: Tensor, labels: Tensor, vocab_size: int) -> None:
    if tuple(teacher_ids.shape) != tuple(teacher_logprobs.shape):
        raise LmdistillError(
            f"teacher_ids shape {tuple(teacher_ids.shape)} does not match "
            f"teacher_logprobs shape {tuple(teacher_logprobs.shape)}"
        )
    if teacher_ids.dim() < 1 or tuple(teacher_ids.shape[:-1]) != tuple(labels.shape):
        raise LmdistillError(
            f"teacher_ids shape {tuple(teacher_ids.shape)} does not match labels shape {tuple(labels.shape)} "
            f"(expected {tuple(labels.shape) + ('K',)})"
        )
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise LmdistillError(f"teacher_ids must be an integer tensor, got {teacher_ids.dtype}")
    if not teacher_logprobs.dtype.is_floating_point:
        raise LmdistillError(f"teacher_logprobs must be a floating-point tensor, got {teacher_logprobs.dtype}")
    k = teacher_ids.shape[-1]
    if not 1 <= k <= vocab_size:
        raise LmdistillError(f"top-k size K={k} must be in [1, V={vocab_size}]")


# ----------------------------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    """float32 for every floating dtype but float64, which stays: softmax never runs in half precision."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim of floored log-probs: [..., C] -> [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w·p + (1 - w)·q), elementwise in log space, for w in [0, 1]."""
    log_w = math.log(w) if w > 0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1 else -math.inf
    return torch.logaddexp(log_p + log_w, log_q + log_1mw)


def divergence(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    kind: DivergenceKind,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-position divergence between a student and a teacher distribution given as log-probabilities.

    With ``p_T`` the teacher and ``p_S`` the student distribution over the last dim:

    * ``forward-kl``: KL(p_T‖p_S), mean-seeking.
    * ``reverse-kl``: KL(p_S‖p_T), mode-seeking.
    * ``jsd``: generalized Jensen-Shannon divergence in TRL's GKD convention (Agarwal et al. 2024): with the mixture
      ``m = β·p_T + (1-β)·p_S`` (computed in log space), ``β·KL(p_T‖m) + (1-β)·KL(p_S‖m)``. As in TRL the endpoints
      are special-cased: ``β = 0`` gives exactly forward KL(p_T‖p_S) and ``β = 1`` exactly reverse KL(p_S‖p_T).
      (The mixture formula itself tends to 0 at both ends, so the loss jumps at β ∈ {0, 1}; ``β = 0.5`` is the
      symmetric Jensen-Shannon divergence.)
    * ``skew-forward-kl``: KL(p_T ‖ α·p_T + (1-α)·p_S), ``skew-reverse-kl``: KL(p_S ‖ α·p_S + (1-α)·p_T)
      (DistiLLM, Ko et al. 2024); ``α = 0`` gives the plain KL, ``α = 1`` gives 0.
    * ``tvd``: total variation distance ½·Σ|p_T - p_S|.

    Log-probabilities of -inf (probability 0) are allowed: they are clamped to a finite floor whose exp() is 0, so
    terms with a zero probability contribute exactly 0 and gradients stay finite. A divergence that is truly
    infinite (e.g. forward KL where p_S = 0 < p_T) therefore comes out huge but finite.

    Args:
        student_logprobs: ``[N, C]`` student log-probabilities, normalized over the last dim (any leading dims work).
        teacher_logprobs: ``[N, C]`` teacher log-probabilities, same shape.
        kind: Which divergence, see above.
        beta: JSD interpolation coefficient in [0, 1]; only used by ``jsd``.
        alpha: Skew coefficient in [0, 1]; only used by ``skew-forward-kl`` and ``skew-reverse-kl``.

    Returns:
        ``[N]`` divergence per position, in float32 (float64 if an input is float64).

    Raises:
        LmdistillError: (a ValueError) on mismatched shapes, an unknown kind, or β, α outside [0, 1].
    """
    if tuple(student_logprobs.shape) != tuple(teacher_logprobs.shape):
        raise LmdistillError(
            f"student_logprobs shape {tuple(student_logprobs.shape)} does not match "
            f"teacher_logprobs shape {tuple(teacher_logprobs.shape)}"
        )
    if student_logprobs.dim() < 1:
        raise LmdistillError("divergence needs at least one (class) dimension, got 0-dim tensors")
    _check_divergence_args(kind, beta, alpha)

    dtype = torch.promote_types(_upcast(student_logprobs).dtype, _upcast(teacher_logprobs).dtype)
    log_s = student_logprobs.to(dtype).clamp(min=_LOG_FLOOR)
    log_t = teacher_logprobs.to(dtype).clamp(min=_LOG_FLOOR)

    if kind == "forward-kl":
        return _kl(log_t, log_s)
    if kind == "reverse-kl":
        return _kl(log_s, log_t)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(log_t, log_s)
        if beta == 1.0:
            return _kl(log_s, log_t)
        log_m = _log_mix(log_t, log_s, beta)
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    if kind == "skew-forward-kl":
        return _kl(log_t, _log_mix(log_t, log_s, alpha))
    if kind == "skew-reverse-kl":
        return _kl(log_s, _log_mix(log_s, log_t, alpha))
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)  # tvd


# ----------------------------------------------------------------------------------------------------------------
# Sums over valid positions (shared by the public losses and the chunked path)
# ----------------------------------------------------------------------------------------------------------------


def _normalize(loss_sum: Tensor, valid: Tensor, num_items: int | Tensor | None) -> Tensor:
    """Divide a summed loss by num_items (default: this call's valid-position count), clamped to >= 1."""
    if num_items is None:
        return loss_sum / valid.sum().clamp(min=1)
    if isinstance(num_items, Tensor):
        return loss_sum / num_items.reshape(()).to(loss_sum.device).clamp(min=1)
    return loss_sum / max(int(num_items), 1)


def _ce_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """[N, V] logits, [N] targets -> summed token cross-entropy (float32 softmax)."""
    return F.cross_entropy(_upcast(logits), targets, reduction="sum")


def _dense_kd_sum(
    student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float, beta: float, alpha: float
) -> Tensor:
    """[N, V] student and teacher logits -> τ² · Σ_positions divergence at temperature τ."""
    log_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    return divergence(log_s, log_t, kind, beta=beta, alpha=alpha).sum() * temperature**2


def _sparse_buckets(
    student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Coarsen both distributions to the K teacher ids plus one tail bucket.

    Args:
        student_logits: ``[N, V]`` student logits.
        teacher_ids: ``[N, K]`` int64 teacher top-k ids (distinct within a row).
        teacher_logprobs: ``[N, K]`` teacher log-probs of those ids at τ = 1.
        temperature: τ > 0.

    Returns:
        ``([N, K+1], [N, K+1])`` student and teacher log-probabilities over the buckets, tail bucket last.
    """
    vocab = student_logits.shape[-1]
    ids = teacher_ids.long()

    s = _upcast(student_logits) / temperature  # [N, V]
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)  # [N, 1]
    s_top = s.gather(-1, ids) - log_z  # [N, K]
    # Tail = logsumexp over the ids outside the top-k: no 1 - Σq cancellation. Filling the top-k with a finite floor
    # (not -inf) keeps this finite with finite gradients even when the top-k covers the whole vocab.
    s_tail = torch.logsumexp(s.scatter(-1, ids, _LOG_FLOOR), dim=-1, keepdim=True) - log_z  # [N, 1]
    student = torch.cat([s_top, s_tail], dim=-1)

    return student, _teacher_buckets(teacher_logprobs, vocab, temperature)


def _teacher_buckets(teacher_logprobs: Tensor, vocab: int, temperature: float) -> Tensor:
    """[N, K] teacher top-k log-probs at τ = 1 -> [N, K+1] tempered log-probs over the K ids and the tail bucket."""
    k = teacher_logprobs.shape[-1]
    t_top = _upcast(teacher_logprobs)  # [N, K]
    if k == vocab:
        t_tail = torch.full_like(t_top[..., :1], -math.inf)
    else:
        # r = 1 - Σ_k p_k, from log Σ_k p_k via expm1 (accurate when r is small).
        mass = -torch.expm1(torch.logsumexp(t_top, dim=-1, keepdim=True))
        log_r = mass.clamp(min=_MIN_TAIL_MASS).log()  # [N, 1]
        # Tail spread uniformly over the V-K unseen ids, each tempered: (V-K) · (r / (V-K))^(1/τ).
        log_unseen = math.log(vocab - k)
        t_tail = log_r / temperature + (1.0 - 1.0 / temperature) * log_unseen
    return F.log_softmax(torch.cat([t_top / temperature, t_tail], dim=-1), dim=-1)


def _ce_grad(x: Tensor, log_z: Tensor, targets: Tensor) -> Tensor:
    """[n, V] float32 logits, [n, 1] their logsumexp, [n] targets -> CE gradient softmax - onehot [n, V]."""
    grad = (x - log_z).exp_()  # [n, V]
    return grad.scatter_add_(-1, targets[:, None], -torch.ones_like(targets[:, None], dtype=grad.dtype))


def _divergence_grad(log_s: Tensor, log_t: Tensor, kind: str, beta: float, alpha: float) -> tuple[Tensor, Tensor]:
    """Σ divergence over [n, C] log-probabilities and its gradient with respect to the student's log-probabilities."""
    log_s = log_s.detach().requires_grad_()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        # A local graph, consumed here: identity hooks keep the caller's saved-tensor hooks (offloading, memory
        # accounting) to the tensors that really outlive the forward.
        total = divergence(log_s, log_t, kind, beta=beta, alpha=alpha).sum()
        (g,) = torch.autograd.grad(total, log_s)
    return total.detach(), g


def _dense_kd_with_grad(
    logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float, beta: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """[n, V] student and teacher logits -> (τ²·Σ divergence, its gradient with respect to the student logits).

    Autograd runs on the divergence of the two [n, V] log-probability tensors only; the softmax's Jacobian is applied
    in closed form, d/ds = (g - p·Σg) / τ with g = d/d(log p), p = softmax(s / τ).
    """
    log_s = F.log_softmax(_upcast(logits) / temperature, dim=-1)  # [n, V]
    log_t = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    total, g = _divergence_grad(log_s, log_t, kind, beta, alpha)
    g_total = g.sum(-1, keepdim=True)
    grad = g.sub_(log_s.exp_().mul_(g_total)).mul_(temperature)  # τ² / τ
    return total * temperature**2, grad


def dense_kd_in_closed_form(kind: str, beta: float) -> bool:
    """Whether the chunked loss differentiates a dense (online teacher's) divergence in closed form: forward KL, and
    JSD at β = 0, which is forward KL (`_forward_kl_with_grad`); the others go through autograd."""
    return kind == "forward-kl" or (kind == "jsd" and beta == 0.0)


def _forward_kl_with_grad(s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """[n, V] float32 student and teacher logits, both overwritten -> (τ²·Σ KL(p_T‖p_S) at temperature τ, its gradient
    with respect to the student logits).

    In closed form, d/ds τ²·KL(p_T‖p_S) = τ·(p_S - p_T), so the only [n, V] buffer beyond the two inputs is the log
    ratio (autograd through `divergence` holds about nine); the log-probabilities are floored as `divergence` floors
    them, so sum and gradient equal `_dense_kd_with_grad`'s up to float rounding.
    """
    if temperature != 1.0:
        s, t = s.div_(temperature), t.div_(temperature)
    log_s = s.sub_(torch.logsumexp(s, dim=-1, keepdim=True)).clamp_(min=_LOG_FLOOR)  # [n, V]
    log_t = t.sub_(torch.logsumexp(t, dim=-1, keepdim=True)).clamp_(min=_LOG_FLOOR)
    ratio = log_t - log_s  # [n, V]
    p_t = log_t.exp_()
    total = ratio.mul_(p_t).sum()
    grad = log_s.exp_().sub_(p_t).mul_(temperature)  # τ² / τ
    return total * temperature**2, grad


def _sparse_kd_with_grad(
    s: Tensor,
    log_z: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """Bucketed KD sum of one chunk and its gradient with respect to the student logits, by hand over V.

    With p = softmax(s), s = logits / τ, and g = dL/d(log q) over the K + 1 buckets (autograd on [n, K+1] only),
    dL/ds_j = -p_j·Σ_b g_b + g_k (j the k-th top id) or + g_tail·p_j / p_tail (j in the tail).

    Args:
        s: [n, V] float32 student logits / τ; overwritten (the softmax is computed in place).
        log_z: [n, 1] logsumexp of s.
        teacher_ids: [n, K] teacher top-k ids.
        teacher_logprobs: [n, K] their teacher log-probs at τ = 1.
        kind: divergence kind.
        temperature: τ.
        beta: JSD coefficient.
        alpha: skew coefficient.

    Returns:
        (τ²·Σ divergence, [n, V] float32 gradient with respect to the logits).
    """
    ids = teacher_ids.long()
    vocab = s.shape[-1]
    log_q_top = s.gather(-1, ids) - log_z  # [n, K], in log space: no underflow for unlikely top ids
    p = s.sub_(log_z).exp_()  # [n, V] softmax, in place: s is not needed again
    p_top = log_q_top.exp()
    p_tail = p.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)  # [n, 1]; p now holds the tail entries only
    if ids.shape[-1] == vocab:
        log_q_tail = torch.full_like(p_tail, -math.inf)
    else:  # a tail that underflows to 0 counts as the smallest normal float, not as log 0
        log_q_tail = p_tail.clamp(min=torch.finfo(p_tail.dtype).tiny).log()
    student = torch.cat([log_q_top, log_q_tail], dim=-1)  # [n, K+1]
    teacher = _teacher_buckets(teacher_logprobs, vocab, temperature)
    total, g = _divergence_grad(student, teacher, kind, beta, alpha)  # g: [n, K+1]
    g_total = g.sum(-1, keepdim=True)  # [n, 1]
    tail_scale = torch.where(p_tail > 0, g[:, -1:] / p_tail, torch.zeros_like(p_tail))
    grad = p.mul_(tail_scale - g_total)  # tail entries; the top entries are 0 here
    grad.scatter_(-1, ids, g[:, :-1] - p_top * g_total).mul_(temperature)  # τ² / τ
    return total * temperature**2, grad


def _sparse_kd_sum(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> Tensor:
    """[N, V] student logits, [N, K] teacher ids and log-probs -> τ² · Σ_positions bucketed divergence."""
    log_s, log_t = _sparse_buckets(student_logits, teacher_ids, teacher_logprobs, temperature)
    return divergence(log_s, log_t, kind, beta=beta, alpha=alpha).sum() * temperature**2


# ----------------------------------------------------------------------------------------------------------------
# Public losses on full logits
# ----------------------------------------------------------------------------------------------------------------


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Token cross-entropy against the labels, summed over valid positions and divided by ``num_items``.

    Args:
        student_logits: ``[B, T, V]`` logits (any float dtype; the softmax runs in float32).
        labels: ``[B, T]`` int64 targets aligned with the logits; ``ignore_index`` marks masked positions.
        ignore_index: Label value of masked positions.
        num_items: Normalizer: an int or 0-dim tensor (e.g. the global count of valid tokens across accumulation
            micro-batches and processes). Defaults to this call's number of valid positions.

    Returns:
        Scalar loss (0, still attached to the graph, if no position is valid).
    """
    _check_logits_labels("student_logits", student_logits, labels)
    _check_num_items(num_items)
    valid = labels != ignore_index  # [B, T]
    return _normalize(_ce_sum(student_logits[valid], labels[valid]), valid, num_items)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kind: DivergenceKind = "forward-kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ignore_index: int = -100,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Dense logit distillation: ``τ² · Σ_valid divergence(softmax(s/τ), softmax(t/τ)) / num_items``.

    Gradients flow into ``teacher_logits`` too if it requires grad; compute the teacher under ``torch.no_grad()``.

    Args:
        student_logits: ``[B, T, V]`` student logits.
        teacher_logits: ``[B, T, V]`` teacher logits over the same vocabulary.
        labels: ``[B, T]`` labels, used only for the ``ignore_index`` mask.
        kind: Divergence, see :func:`divergence`.
        temperature: τ > 0; both distributions are softened by it and the divergence is scaled by τ².
        beta: JSD coefficient in [0, 1].
        alpha: Skew-KL coefficient in [0, 1].
        ignore_index: Label value of masked positions.
        num_items: Normalizer, see :func:`cross_entropy`.

    Returns:
        Scalar loss.
    """
    _check_logits_labels("student_logits", student_logits, labels)
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise LmdistillError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} does not match "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    _check_divergence_args(kind, beta, alpha)
    _check_temperature(temperature)
    _check_num_items(num_items)
    valid = labels != ignore_index  # [B, T]
    loss_sum = _dense_kd_sum(student_logits[valid], teacher_logits[valid], kind, temperature, beta, alpha)
    return _normalize(loss_sum, valid, num_items)


def sparse_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    *,
    kind: DivergenceKind = "forward-kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ignore_index: int = -100,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Distillation from a cached teacher top-k: the divergence between both distributions coarsened to K+1 buckets.

    The teacher is known on its top-K ids plus the tail mass ``r = 1 - Σ_k p_k`` (clamped to >= 1e-10 when K < V).
    Both distributions are coarsened to the K ids and one "tail" bucket; the student's tail is the logsumexp of its
    log-probs outside the top-k (not ``1 - Σ q_k``). :func:`divergence` is then applied to the K+1 buckets, and the
    result is scaled by τ². With K = V this equals :func:`kd_loss` (the tail buckets are empty and contribute 0).

    Temperature approximation: the cache holds τ = 1 log-probs only. For τ != 1 the teacher's top-k are tempered as
    ``p_k^(1/τ)``, the tail is assumed spread uniformly over the V - K unseen ids (each ``r / (V-K)``, tempered to
    ``(r / (V-K))^(1/τ)``), and the K+1 buckets are renormalized. The student is tempered exactly (``logits / τ``)
    before bucketing. This is exact for τ = 1 and for K = V; otherwise, for τ > 1, the uniform tail gives the
    largest tempered tail mass compatible with ``r`` (an upper bound on the true one).

    Args:
        student_logits: ``[B, T, V]`` student logits.
        teacher_ids: ``[B, T, K]`` int64 teacher top-k token ids, distinct within each position.
        teacher_logprobs: ``[B, T, K]`` teacher log-probs of those ids at τ = 1 (any float dtype; -inf allowed).
        labels: ``[B, T]`` labels, used only for the ``ignore_index`` mask.
        kind: Divergence, see :func:`divergence`.
        temperature: τ > 0.
        beta: JSD coefficient in [0, 1].
        alpha: Skew-KL coefficient in [0, 1].
        ignore_index: Label value of masked positions.
        num_items: Normalizer, see :func:`cross_entropy`.

    Returns:
        Scalar loss.
    """
    _check_logits_labels("student_logits", student_logits, labels)
    _check_sparse_teacher(teacher_ids, teacher_logprobs, labels, student_logits.shape[-1])
    _check_divergence_args(kind, beta, alpha)
    _check_temperature(temperature)
    _check_num_items(num_items)
    valid = labels != ignore_index  # [B, T]
    loss_sum = _sparse_kd_sum(
        student_logits[valid], teacher_ids[valid], teacher_logprobs[valid], kind, temperature, beta, alpha
    )
    return _normalize(loss_sum, valid, num_items)


def hidden_loss(
    student_hidden: Tensor, target: Tensor, valid: Tensor, num_items: int | Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """Hidden-state distillation: 1 - cosine(student, target) per valid position, summed, divided by ``num_items``.

    Cosine rather than MSE: it is bounded in [0, 2] and blind to each state's norm, which grows with depth and varies
    by orders of magnitude between positions, so one weight serves every layer and no position dominates.

    Args:
        student_hidden: ``[B, T, d]`` student states.
        target: ``[B, T, d]`` targets (constants: detached), any floating dtype.
        valid: ``[B, T]`` bool, the positions that count (the predicted ones).
        num_items: Normalizer, see :func:`cross_entropy`.
        eps: floor of the product of the two norms.

    Returns:
        The loss, a scalar in float32 (float64 for float64 states).
    """
    if tuple(target.shape) != tuple(student_hidden.shape) or tuple(valid.shape) != tuple(student_hidden.shape[:-1]):
        raise LmdistillError(
            f"hidden_loss: student {tuple(student_hidden.shape)}, target {tuple(target.shape)} and valid "
            f"{tuple(valid.shape)} must be [B, T, d], [B, T, d] and [B, T]"
        )
    _check_num_items(num_items)
    s = _upcast(student_hidden[valid])  # [N, d]
    t = target.detach()[valid].to(s.dtype)  # [N, d]
    cosine = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp(min=eps)  # [N]
    return _normalize((1 - cosine).sum(), valid, num_items)


# ----------------------------------------------------------------------------------------------------------------
# Chunked path: logits are never materialized for the whole batch
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Teacher:
    """The teacher at the N valid positions: dense (hidden states and head) or sparse (top-k), or nothing (CE only)."""

    hidden: Tensor | None = None  # [N, d_T], with head
    head: Tensor | None = None  # [V, d_T]
    ids: Tensor | None = None  # [N, K], with logprobs
    logprobs: Tensor | None = None  # [N, K]

    @classmethod
    def at(
        cls,
        flat: Tensor,
        hidden: Tensor | None,
        head: Tensor | None,
        ids: Tensor | None,
        logprobs: Tensor | None,
    ) -> _Teacher:
        """The teacher tensors ``[B, T, ...]`` of `chunked_distill_loss` at the positions where `flat` ``[B·T]`` is
        True, detached (constants)."""
        if hidden is not None:
            return cls(hidden=hidden.detach().reshape(-1, hidden.shape[-1])[flat], head=head.detach())
        if ids is not None:
            k = ids.shape[-1]
            return cls(ids=ids.reshape(-1, k)[flat], logprobs=logprobs.detach().reshape(-1, k)[flat])
        return cls()

    def rows(self, rows: slice) -> _Teacher:
        """The teacher at the positions `rows` of its N (the head is shared)."""
        return _Teacher(
            hidden=None if self.hidden is None else self.hidden[rows],
            head=self.head,
            ids=None if self.ids is None else self.ids[rows],
            logprobs=None if self.logprobs is None else self.logprobs[rows],
        )


@dataclass(frozen=True)
class _Options:
    """The settings of `chunked_distill_loss` every chunk shares."""

    kind: str
    temperature: float
    beta: float
    alpha: float
    kd_weight: float
    chunk_size: int


def _mix(ce: Tensor, kd: Tensor, kd_weight: float) -> Tensor:
    """(1 - w)·ce + w·kd, taking a zero-weighted term out rather than multiplying it by 0 (no 0·inf)."""
    if kd_weight == 0.0:
        return ce
    if kd_weight == 1.0:
        return kd
    return (1.0 - kd_weight) * ce + kd_weight * kd


def _chunk(
    h: Tensor,
    head: Tensor,
    targets: Tensor,
    teacher: _Teacher,
    options: _Options,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk of n valid positions -> (CE sum, KD sum, d(mix)/d(logits) [n, V] in the logits' dtype, or None).

    The [n, V] logits (and the teacher's) live only inside this call. At kd_weight 0 the KD term is not computed.
    """
    kind, temperature, beta, alpha = options.kind, options.temperature, options.beta, options.alpha
    kd_weight = options.kd_weight
    logits = F.linear(h, head.detach().to(h.dtype))  # [n, V]
    x = _upcast(logits)  # [n, V] float32: the logits themselves when they already are
    log_z = torch.logsumexp(x, dim=-1, keepdim=True)  # [n, 1], shared by CE and, at τ = 1, the sparse KD
    ce = (log_z - x.gather(-1, targets[:, None])).sum()
    d_logits = _ce_grad(x, log_z, targets) if with_grad and kd_weight < 1.0 else None
    if kd_weight == 0.0:
        return (
            ce,
            torch.zeros((), dtype=ce.dtype, device=ce.device),
            None if d_logits is None else d_logits.to(logits.dtype),
        )
    if teacher.ids is not None:
        if not with_grad:
            return ce, _sparse_kd_sum(logits, teacher.ids, teacher.logprobs, kind, temperature, beta, alpha), None
        if temperature != 1.0:
            x = x / temperature
            log_z = torch.logsumexp(x, dim=-1, keepdim=True)
        # x is not read again: the KD softmax overwrites it (and the float32 logits it may be)
        kd, d_kd = _sparse_kd_with_grad(x, log_z, teacher.ids, teacher.logprobs, kind, temperature, beta, alpha)
    else:
        teacher_logits = F.linear(teacher.hidden, teacher.head.to(teacher.hidden.dtype))  # [n, V]
        if not with_grad:
            return ce, _dense_kd_sum(logits, teacher_logits, kind, temperature, beta, alpha), None
        if dense_kd_in_closed_form(kind, beta):  # x is not read again: overwritten here
            kd, d_kd = _forward_kl_with_grad(x, _upcast(teacher_logits), temperature)
        else:
            kd, d_kd = _dense_kd_with_grad(logits, teacher_logits, kind, temperature, beta, alpha)
    d_logits = d_kd if d_logits is None else d_logits.mul_(1.0 - kd_weight).add_(d_kd, alpha=kd_weight)
    return ce, kd, d_logits.to(logits.dtype)


def _chunked(
    hidden: Tensor, head: Tensor, targets: Tensor, teacher: _Teacher, options: _Options, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """CE and KD sums over [N, d] valid positions, chunk by chunk, with dL/dhidden [N, d] and dL/dhead [V, d]."""
    grad_hidden = grad_head = None
    if with_grad:
        accumulate = torch.promote_types(head.dtype, torch.float32)  # bf16 heads accumulate in float32
        grad_hidden = torch.zeros_like(hidden)  # [N, d_S]
        grad_head = torch.zeros(head.shape, dtype=accumulate, device=head.device)  # [V, d_S]
    ce_parts, kd_parts = [], []
    # One empty chunk when nothing is valid, so the zero loss still has a graph.
    for start in range(0, max(hidden.shape[0], 1), options.chunk_size):
        rows = slice(start, start + options.chunk_size)
        h = hidden[rows].detach()  # [n, d_S]
        ce, kd, d_logits = _chunk(h, head, targets[rows], teacher.rows(rows), options, with_grad)
        if with_grad:
            grad_hidden[rows] = (d_logits @ head.to(d_logits.dtype)).to(hidden.dtype)
            grad_head += (d_logits.T @ h.to(d_logits.dtype)).to(grad_head.dtype)
        ce_parts.append(ce.detach())
        kd_parts.append(kd.detach())
    return torch.stack(ce_parts).sum(), torch.stack(kd_parts).sum(), grad_hidden, grad_head


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class _FusedChunks(torch.autograd.Function):
    """Loss sums and their gradients in one pass over the chunks.

    Each chunk's [n, V] logits are computed once, differentiated on the spot in closed form (softmax Jacobians by
    hand; autograd only on the divergence of log-probabilities), and dropped: the forward keeps only dL/dhidden
    [N, d] and dL/dhead [V, d], and the backward scales them. That is three matrix products per chunk, the minimum
    (checkpointing would recompute the logits, a fourth), and the teacher's logits are computed once. Only the
    weighted sum is differentiable; the CE and KD sums are returned for logging (a zero-weighted term is not
    differentiated, and KD is not computed at all at weight 0).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, targets: Tensor, teacher: _Teacher, options: _Options):
        ce_sum, kd_sum, grad_hidden, grad_head = _chunked(hidden, head, targets, teacher, options, with_grad=True)
        ctx.save_for_backward(grad_hidden, grad_head.to(head.dtype))
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return _mix(ce_sum, kd_sum, options.kd_weight).clone(), ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_weighted, _grad_ce, _grad_kd):
        grad_hidden, grad_head = ctx.saved_tensors
        # One gradient per input of forward: hidden and head; targets, teacher and options are constants (None).
        return grad_weighted * grad_hidden, grad_weighted * grad_head, None, None, None


def _check_chunked_tensors(
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head: Tensor | None,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor | None,
) -> bool:
    """Refuse tensors of `chunked_distill_loss` that do not fit together; return whether a teacher was passed."""
    if student_hidden.dim() < 2 or tuple(labels.shape) != tuple(student_hidden.shape[:-1]):
        raise LmdistillError(
            f"labels shape {tuple(labels.shape)} does not match student_hidden shape {tuple(student_hidden.shape)} "
            f"(expected student_hidden [B, T, d_S] and labels [B, T])"
        )
    d_s = student_hidden.shape[-1]
    if student_head.dim() != 2 or student_head.shape[1] != d_s:
        raise LmdistillError(
            f"student_head shape {tuple(student_head.shape)} does not match student_hidden shape "
            f"{tuple(student_hidden.shape)} (expected [V, {d_s}])"
        )
    vocab = student_head.shape[0]
    dense = teacher_hidden is not None or teacher_head is not None
    sparse = teacher_ids is not None or teacher_logprobs is not None
    if dense and sparse:
        raise LmdistillError("pass either teacher_hidden/teacher_head or teacher_ids/teacher_logprobs, not both")
    if dense:
        if teacher_hidden is None or teacher_head is None:
            raise LmdistillError("teacher_hidden and teacher_head must be passed together")
        if teacher_hidden.dim() < 2 or tuple(teacher_hidden.shape[:-1]) != tuple(labels.shape):
            raise LmdistillError(
                f"teacher_hidden shape {tuple(teacher_hidden.shape)} does not match labels shape "
                f"{tuple(labels.shape)} (expected {tuple(labels.shape) + ('d_T',)})"
            )
        if tuple(teacher_head.shape) != (vocab, teacher_hidden.shape[-1]):
            raise LmdistillError(
                f"teacher_head shape {tuple(teacher_head.shape)} does not match teacher_hidden shape "
                f"{tuple(teacher_hidden.shape)} and student vocab size {vocab} "
                f"(expected {(vocab, teacher_hidden.shape[-1])})"
            )
    if sparse:
        if teacher_ids is None or teacher_logprobs is None:
            raise LmdistillError("teacher_ids and teacher_logprobs must be passed together")
        _check_sparse_teacher(teacher_ids, teacher_logprobs, labels, vocab)
    return dense or sparse


def _check_chunked_options(options: _Options, with_teacher: bool, num_items: int | Tensor | None) -> None:
    """Refuse settings of `chunked_distill_loss` outside their ranges, or a KD weight without a teacher."""
    kd_weight = options.kd_weight
    if not 0.0 <= kd_weight <= 1.0:
        raise LmdistillError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if not with_teacher and kd_weight != 0.0:
        raise LmdistillError(f"kd_weight is {kd_weight} but no teacher was passed (CE-only needs kd_weight=0)")
    chunk_size = options.chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise LmdistillError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_divergence_args(options.kind, options.beta, options.alpha)
    _check_temperature(options.temperature)
    _check_num_items(num_items)


def chunked_distill_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    kd_weight: float = 0.0,
    kind: DivergenceKind = "forward-kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ignore_index: int = -100,
    num_items: int | Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """CE and KD from hidden states and LM-head weights, without ever materializing full-batch logits.

    The valid positions are gathered first (masked positions need no logits), then processed ``chunk_size`` at a
    time. When gradients are needed, each chunk's logits are differentiated as soon as they are computed and
    dropped (see ``_FusedChunks``): the ``[n, V]`` float32 logits of a chunk exist only transiently, the full
    ``[B, T, V]`` student or teacher logits never do, and nothing is recomputed in the backward. Only ``total`` is
    differentiable; ``ce`` and ``kd`` are for logging. Teacher tensors are detached (constants). The logit
    matmul runs in the hidden states' dtype (the head is cast to it), the softmax in float32. Values equal
    :func:`cross_entropy` plus :func:`kd_loss` / :func:`sparse_kd_loss` on the full logits, up to summation order.

    Args:
        student_hidden: ``[B, T, d_S]`` student hidden states (output of the final norm).
        student_head: ``[V, d_S]`` student LM-head weight (no bias).
        labels: ``[B, T]`` int64 targets aligned with the hidden states; ``ignore_index`` marks masked positions.
        teacher_hidden: ``[B, T, d_T]`` teacher hidden states (dense teacher), with ``teacher_head``.
        teacher_head: ``[V, d_T]`` teacher LM-head weight.
        teacher_ids: ``[B, T, K]`` teacher top-k ids (sparse teacher), with ``teacher_logprobs``.
        teacher_logprobs: ``[B, T, K]`` teacher log-probs of those ids at τ = 1; see :func:`sparse_kd_loss`.
        kd_weight: Weight w in [0, 1] of KD in ``total = (1 - w)·ce + w·kd``; must be 0 without a teacher.
        kind: Divergence, see :func:`divergence`.
        temperature: τ > 0 for KD (CE is always at τ = 1).
        beta: JSD coefficient in [0, 1].
        alpha: Skew-KL coefficient in [0, 1].
        ignore_index: Label value of masked positions.
        num_items: Normalizer for both CE and KD, see :func:`cross_entropy`.
        chunk_size: Number of valid positions per chunk.

    Returns:
        ``(total, ce, kd)`` scalars, each normalized by ``num_items``; ``kd`` is 0 without a teacher or at
        ``kd_weight`` 0 (the term is not computed).
    """
    with_teacher = _check_chunked_tensors(
        student_hidden, student_head, labels, teacher_hidden, teacher_head, teacher_ids, teacher_logprobs
    )
    options = _Options(kind, temperature, beta, alpha, kd_weight, chunk_size)
    _check_chunked_options(options, with_teacher, num_items)

    valid = labels != ignore_index  # [B, T]
    flat = valid.reshape(-1)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])[flat]  # [N, d_S]
    targets = labels.reshape(-1)[flat]  # [N]
    teacher = _Teacher.at(flat, teacher_hidden, teacher_head, teacher_ids, teacher_logprobs)
    if torch.is_grad_enabled() and (hidden.requires_grad or student_head.requires_grad):
        weighted, ce_sum, kd_sum = _FusedChunks.apply(hidden, student_head, targets, teacher, options)
    else:
        ce_sum, kd_sum, _, _ = _chunked(hidden, student_head, targets, teacher, options, with_grad=False)
        weighted = _mix(ce_sum, kd_sum, kd_weight)
    total = _normalize(weighted, valid, num_items)
    ce = _normalize(ce_sum, valid, num_items)
    kd = _normalize(kd_sum, valid, num_items)
    return total, ce, kd
