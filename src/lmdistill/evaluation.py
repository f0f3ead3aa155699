"""Held-out evaluation: cross-entropy per token, perplexity, and the share of the teacher-student gap closed."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import PreTrainedModel

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
