"""Held-out evaluation: cross-entropy per token and perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, token_ids: list[int] | torch.Tensor, seq_len: int = 256, batch_size: int = 4) -> float:
    """Mean cross-entropy (nats per predicted token) of `model` on a token stream cut into windows of `seq_len`.

    Each window predicts its own tokens 2..n from the ones before; the last window may be shorter. Softmax in float32.

    Args:
        model: a causal LM.
        token_ids: the token stream [N], N >= 2.
        seq_len: window length.
        batch_size: windows per forward pass.

    Returns:
        Cross-entropy per predicted token (perplexity is its exponential).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to evaluate a loss")
    windows = [w for w in ids.split(seq_len) if w.numel() >= 2]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(w.numel() for w in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, w in enumerate(batch):
            inputs[row, : w.numel()] = w
            mask[row, : w.numel()] = 1
            labels[row, : w.numel() - 1] = w[1:]  # position t predicts token t + 1
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
        labels = labels.to(device)
        total += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    """Perplexity from a cross-entropy in nats per token."""
    return math.exp(loss)
