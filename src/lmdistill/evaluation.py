"""Held-out evaluation: cross-entropy per token, perplexity, and the share of the teacher-student gap closed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from lmdistill.data.packed import PackedData
from lmdistill.distributed import Processes, all_reduce_sum
from lmdistill.objective import LMLoss, shifted_labels
from lmdistill.precision import autocast


def token_blocks(token_ids: list[int] | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks, dropping the partial tail.

    Args:
        token_ids: the stream [N].
        seq_len: block length L.

    Returns:
        int64 [N // L, L].
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < seq_len:
        raise ValueError(f"need at least {seq_len} tokens, got {ids.numel()}")
    return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)


def spread_blocks(blocks: np.ndarray, tokens: int) -> np.ndarray:
    """The evaluation blocks of a held-out split: ``max(1, tokens // L)`` blocks spaced evenly over it (all when it has
    fewer), so that a small budget samples every held-out document, not the first few.

    Args:
        blocks: held-out token ids [N, L].
        tokens: the evaluation's token budget.

    Returns:
        [min(N, max(1, tokens // L)), L], in the split's order.
    """
    count = max(1, tokens // blocks.shape[1])
    if count >= len(blocks):
        return np.asarray(blocks)
    return np.asarray(blocks[np.linspace(0, len(blocks) - 1, count).round().astype(np.int64)])


def heldout_sets(data: PackedData, tokens: dict[str, int]) -> dict[str, np.ndarray]:
    """Per source named in ``tokens``, `spread_blocks` of its own held-out blocks (those holding only its text) for
    its token budget there."""
    ranges = data.manifest.get("val_blocks_by_source", {})
    return {source: spread_blocks(data.val[ranges[source][0] : ranges[source][1]], n) for source, n in tokens.items()}


def mixture_weights(data: PackedData, sources: list[str]) -> dict[str, float]:
    """Each of ``sources``' share of the training tokens, renormalized over ``sources``: weights under which the mean
    of per-source held-out losses is the expected loss on held-out text of the training mixture."""
    tokens = {source: data.manifest["per_source"][source].get("train", {}).get("tokens", 0) for source in sources}
    total = sum(tokens.values())
    return {source: count / total for source, count in tokens.items()}


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel | LMLoss,
    blocks: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    chunk_size: int = 256,
    processes: Processes | None = None,
) -> float:
    """Mean cross-entropy (nats per predicted token) of a causal LM on held-out blocks.

    Each block predicts its tokens 2..L from the ones before. Softmax in float32, computed in chunks so the full
    [B, L, V] logits are never materialized. Under `torchrun` each process takes every world-th batch and the sums
    are reduced, so every process returns the same number. Every process runs the same number of forward passes
    (those of an FSDP-sharded model are collective): one past the last batch repeats it and is not counted.

    Args:
        model: a causal LM (a Hugging Face `PreTrainedModel`), or an `LMLoss` around one, possibly FSDP-sharded.
        blocks: token ids [N, L].
        batch_size: blocks per forward pass.
        precision: "fp32", "bf16" or "auto" (autocast of the forward pass, see `autocast`).
        chunk_size: positions per chunk of the loss.
        processes: the process group (None: alone, on the model's device).

    Returns:
        Cross-entropy per predicted token; its exponential is the perplexity.
    """
    lm_loss = model if isinstance(model, LMLoss) else LMLoss(model)
    device = processes.device if processes else next(model.parameters()).device
    rank, world = (processes.rank, processes.world) if processes else (0, 1)
    starts = range(0, len(blocks), batch_size)
    was_training = lm_loss.training
    lm_loss.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count]
    for batch in range(rank, math.ceil(len(starts) / world) * world, world):
        start = starts[min(batch, len(starts) - 1)]
        ids = torch.as_tensor(np.asarray(blocks[start : start + batch_size]), dtype=torch.long, device=device)
        labels = shifted_labels(ids)
        with autocast(device, precision):
            loss, _, _ = lm_loss(ids, labels, chunk_size=chunk_size)
        if batch < len(starts):
            count = int((labels != -100).sum())
            total += torch.tensor([loss.item() * count, count], dtype=torch.float64, device=device)
    all_reduce_sum(total)
    lm_loss.train(was_training)
    return (total[0] / total[1]).item()


def mixture_scores(
    model: PreTrainedModel, sets: dict[str, np.ndarray], weights: dict[str, float], **options: Any
) -> dict[str, float]:
    """Held-out loss of a model on each set of `heldout_sets` and on the training mixture.

    Args:
        model: a causal LM.
        sets: source -> its held-out blocks [N_s, L].
        weights: source -> its `mixture_weights` weight.
        options: `heldout_loss` options (batch_size, precision, chunk_size).

    Returns:
        ``mixture`` (the weighted mean of the sources' losses), then each source's loss, in nats per token.
    """
    losses = {source: heldout_loss(model, blocks, **options) for source, blocks in sets.items()}
    return {"mixture": sum(weights[source] * loss for source, loss in losses.items()), **losses}


def token_multiplier(
    budgets: Sequence[int], base_losses: Sequence[float], loss: float, budget: int
) -> tuple[float, str]:
    """How many times ``budget`` tokens a baseline needs to reach ``loss``: the baseline's final losses of runs at
    ``budgets`` interpolated linearly in log-tokens (a run's own curve under a decaying schedule would understate
    what a longer run reaches).

    Args:
        budgets: the baseline's token budgets, ascending.
        base_losses: its final loss at each budget.
        loss: the loss to reach.
        budget: the tokens the loss was reached with.

    Returns:
        ``(multiplier, "within")``; ``(largest / budget, "above")`` when ``loss`` is below the baseline's loss at its
        largest budget (the multiplier is larger than that), ``(smallest / budget, "below")`` when it is above the
        baseline's loss at its smallest budget (the multiplier is smaller).
    """
    if loss > base_losses[0]:
        return budgets[0] / budget, "below"
    for (b0, l0), (b1, l1) in zip(zip(budgets, base_losses), zip(budgets[1:], base_losses[1:])):
        if l0 >= loss >= l1:
            reached = math.log(b0) + (l0 - loss) / (l0 - l1) * (math.log(b1) - math.log(b0))
            return math.exp(reached) / budget, "within"
    return budgets[-1] / budget, "above"


def perplexity(loss: float) -> float:
    """Perplexity from a cross-entropy in nats per token."""
    return math.exp(loss)


GAP_UNDEFINED = "undefined: the teacher is not better than the baseline"


def gap_closed(base: float, method: float, teacher: float) -> float:
    """Share of the teacher-student gap a method closes: (base - method) / (base - teacher).

    Works for losses and for perplexities alike. 0 means no better than the baseline, 1 means as good as the
    teacher, negative means worse than the baseline.

    Args:
        base: the baseline student's value (random init, same data and budget).
        method: the evaluated student's value.
        teacher: the teacher's value.

    Returns:
        The share (a fraction, not a percentage); NaN (undefined) unless the teacher is better than the baseline
        (base > teacher): otherwise the ratio would turn a method worse than the baseline into a positive share.
    """
    gap = base - teacher
    return (base - method) / gap if gap > 0 else float("nan")


def gap_closed_forms(
    base: dict[str, float], method: dict[str, float], teacher: dict[str, float]
) -> dict[str, float | None]:
    """`gap_closed` in the loss and the perplexity form of results holding ``val_loss`` and ``val_ppl``.

    Returns:
        ``gap_closed_loss`` and ``gap_closed_ppl``, each None (JSON null) where undefined (see `GAP_UNDEFINED`).
    """
    shares: dict[str, float | None] = {}
    for form in ("loss", "ppl"):
        share = gap_closed(base[f"val_{form}"], method[f"val_{form}"], teacher[f"val_{form}"])
        shares[f"gap_closed_{form}"] = None if math.isnan(share) else share
    return shares
