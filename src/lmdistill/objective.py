"""The training objective as a module: a causal LM whose forward ends in the chunked loss on its hidden states."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lmdistill.hidden import block_outputs
from lmdistill.losses import chunked_distill_loss, hidden_loss
from lmdistill.models.teacher_dtype import head_weight


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of a batch of blocks: position t predicts token t + 1; the last position is ignored.

    Args:
        ids: int64 [B, L].

    Returns:
        int64 [B, L] with -100 in the last column.
    """
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


class LMLoss(nn.Module):
    """A causal LM whose forward ends in `chunked_distill_loss` on its final hidden states and output head.

    Whatever wraps it (DDP, FSDP) thus wraps every use of the parameters: under FSDP the output head is whole only
    inside this forward.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        teacher_states: torch.Tensor | None = None,
        hidden_weight: float = 0.0,
        hidden_blocks: tuple[int, ...] = (),
        **loss_options: Any,
    ) -> tuple[torch.Tensor, ...]:
        """The student's forward pass and its loss: (total, ce, kd) of `chunked_distill_loss` on its final hidden
        states [B, L, d] and output head (an int8 head's dequantized weights), for ids [B, L] and labels [B, L];
        with a hidden weight w > 0, (total + w · hkd, ce, kd, hkd), hkd the mean over `hidden_blocks` of
        `hidden_loss` against `teacher_states`.

        Args:
            input_ids: int64 [B, L].
            labels: int64 [B, L], aligned (position t predicts labels[t]); -100 where nothing is predicted.
            teacher_states: [B, L, H, d_S], the targets of the residual stream after the H `hidden_blocks`.
            hidden_weight: w, the weight of hkd (0: not computed).
            hidden_blocks: the student's blocks (1-based) whose residual stream hkd reads.
            loss_options: keyword arguments of `chunked_distill_loss`: the teacher's targets (``teacher_hidden`` and
                ``teacher_head``, or ``teacher_ids`` and ``teacher_logprobs``; none for CE only) and the loss
                settings (``kd_weight``, ``kind``, ``temperature``, ``beta``, ``alpha``, ``num_items``,
                ``chunk_size``).
        """
        if hidden_weight == 0:
            hidden = self.lm.base_model(input_ids=input_ids).last_hidden_state  # [B, L, d]
            return chunked_distill_loss(hidden, head_weight(self.lm), labels, **loss_options)
        with block_outputs(self.lm, hidden_blocks) as states:
            hidden = self.lm.base_model(input_ids=input_ids).last_hidden_state  # [B, L, d]
        total, ce, kd = chunked_distill_loss(hidden, head_weight(self.lm), labels, **loss_options)
        valid, num_items = labels != -100, loss_options.get("num_items")
        hkd = sum(
            hidden_loss(states[block], teacher_states[:, :, i], valid, num_items)
            for i, block in enumerate(hidden_blocks)
        ) / len(hidden_blocks)
        return total + hidden_weight * hkd, ce, kd, hkd.detach()
