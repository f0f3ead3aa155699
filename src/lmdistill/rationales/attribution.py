"""The teacher's answers and the gradient attribution of each answer over the prompt's token embeddings.

Ballout et al. 2024 (arXiv 2409.12586): the attribution target is the log-probability of the teacher's own answer,
log p(a | x) = Σ_j log p(a_j | x, a_<j); its gradient with respect to the input token embeddings e_t ∈ R^d is reduced
over d to one score per token, ‖·‖₁ (default) or ‖·‖₂, of

- ``saliency``: ∂ log p / ∂e_t (Simonyan et al. 2014);
- ``input-x-gradient``: e_t ⊙ ∂ log p / ∂e_t;
- ``integrated-gradients``: (e_t − b_t) ⊙ ∫₀¹ ∂ log p / ∂e_t (b + α (e − b)) dα over the prompt tokens, the answer
  tokens held fixed (Sundararajan et al. 2017; Captum's Gauss-Legendre quadrature). The baseline b_t of a prompt
  token is the embedding of a neutral token (``token``, default: the pad token, else EOS) or 0 (``zero``). Zero is a
  poor baseline for pre-norm transformers: RMSNorm/LayerNorm(α e) hardly depends on α except within its eps of
  α = 0, so log p jumps right next to 0; the quadrature samples the jump erratically and the attributions do not
  sum to log p(e) − log p(b) (completeness) at any step count. A token's path avoids 0 (and is exact on smooth
  models), but on real teachers it is still rough: completeness then holds only roughly, better with more steps.

The three methods are Captum's ``Saliency``, ``InputXGradient`` and ``IntegratedGradients`` applied to the embedding
output. Sequences are left-padded, the answer right-aligned, so that the output head runs only on the last
``max answer length + 1`` positions (``logits_to_keep``); position ids follow the attention mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial

import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.errors import LmdistillError

NAN_SCORES = "the model's log-probabilities are NaN: its weights or its forward pass give NaN"


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align token rows.

    Args:
        rows: B lists of token ids.
        pad_id: id of the filler (masked out).

    Returns:
        ids int64 ``[B, T]`` and attention mask bool ``[B, T]``, T the longest row.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = True
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: int64 ``[B, T]``, 0 at each row's first real token (and on its padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def continuation_logprob(
    model: PreTrainedModel,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """log p(continuation | prefix) per row, for right-aligned continuations.

    Args:
        model: a causal LM.
        embeds: ``[B, T, d]`` input embeddings of prefix + continuation, left-padded.
        attention_mask: bool ``[B, T]``.
        targets: int64 ``[B, A]``, the last A token ids of each row.
        target_mask: bool ``[B, A]``, True at continuation tokens (a row's continuation may be shorter than A).

    Returns:
        float32 ``[B]``: Σ over continuation tokens of log p(token | everything before it).
    """
    width = targets.shape[1]
    logits = model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions_of(attention_mask),
        logits_to_keep=width + 1,
    ).logits[:, :-1]  # [B, A, V]: position T-A-1+j predicts token T-A+j
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, A]
    return torch.where(target_mask, logprobs, 0.0).sum(-1)


def _layout(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids ``[B, T]``, attention mask ``[B, T]``, prompt mask ``[B, T]`` and answer mask ``[B, T]`` of the rows
    prompt + answer, left-padded, on ``device``."""
    ids, mask = pad_left([list(p) + list(a) for p, a in zip(prompts, answers)], pad_id)
    width = ids.shape[1]
    answer_mask = torch.zeros_like(mask)
    for i, answer in enumerate(answers):
        answer_mask[i, width - len(answer) :] = len(answer) > 0
    return ids.to(device), mask.to(device), (mask & ~answer_mask).to(device), answer_mask.to(device)


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int,
    pad_id: int,
) -> list[torch.Tensor]:
    """log p(choice | prompt) of every choice of every prompt, each prompt run once: its choices continue from its
    key-value cache (CQA's five choices of 2-3 tokens then cost about one prompt pass, not five).

    Args:
        model: a causal LM.
        prompts: N non-empty token-id lists.
        choices: per prompt, C_i non-empty token-id lists.
        batch_size: prompts per forward pass (the choice pass runs Σ C_i rows).
        pad_id: filler id.

    Returns:
        N float32 tensors, ``[C_i]`` each.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        batch, options = prompts[start : start + batch_size], choices[start : start + batch_size]
        ids, mask = (t.to(model.device) for t in pad_left(batch, pad_id))  # [B, T]
        result = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_of(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        owner = torch.tensor([i for i, cs in enumerate(options) for _ in cs], device=ids.device)  # [R]: row's prompt
        rows = [list(c) for cs in options for c in cs]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long, device=ids.device)  # [R, W], right-padded
        real = torch.zeros((len(rows), width), dtype=torch.bool, device=ids.device)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
            real[r, : len(row)] = True
        first = torch.log_softmax(result.logits[:, -1].float(), dim=-1)[owner]  # [R, V]: predicts each choice's 1st
        scores = first.gather(-1, tokens[:, :1]).squeeze(-1)  # [R]
        if width > 1:
            # transformers 5.x renamed past_key_values (deprecated) to cache, in the arguments and the output
            cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            cache = getattr(result, cache_argument)
            cache.reorder_cache(owner)  # row r continues prompt owner[r]
            logits = model(
                input_ids=tokens[:, :-1],
                attention_mask=torch.cat([mask[owner], real[:, :-1]], dim=-1),
                position_ids=mask.sum(-1)[owner, None] + torch.arange(width - 1, device=ids.device),
                **{cache_argument: cache},
            ).logits  # [R, W-1, V]: position j predicts token j+1
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            scores = scores + torch.where(real[:, 1:], logprobs, 0.0).sum(-1)
        out += list(scores.split([len(cs) for cs in options]))
    return out


def choose(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int,
    pad_id: int,
    per_token: bool = False,
) -> list[int]:
    """The teacher's choice for multiple-choice prompts: the choice continuation of highest log-probability.

    Args:
        model: a causal LM.
        prompts: B token-id lists.
        choices: per prompt, the token ids of each choice's continuation (non-empty).
        batch_size: prompts per forward pass.
        pad_id: filler id.
        per_token: compare the mean log-probability per token instead of the sum.

    Returns:
        B indices into each prompt's choices (the first on ties).
    """
    picks = []
    for scores, options in zip(choice_logprobs(model, prompts, choices, batch_size=batch_size, pad_id=pad_id), choices):
        if scores.isnan().any():
            raise LmdistillError(NAN_SCORES)
        if per_token:
            scores = scores / torch.tensor([len(c) for c in options], dtype=scores.dtype, device=scores.device)
        picks.append(int(scores.argmax()))
    return picks


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
) -> list[str]:
    """Greedy answers of free-form prompts: the first non-empty line of each generation, stripped.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (for EOS and decoding).
        prompts: B token-id lists.
        max_new_tokens: generation length limit.
        pad_id: filler id.

    Returns:
        B answers ("" when the model produced no text).
    """
    ids, mask = (t.to(model.device) for t in pad_left(prompts, pad_id))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        generation_config=config,
        output_scores=True,
        return_dict_in_generate=True,
    )
    if any(step.isnan().any() for step in out.scores):
        raise LmdistillError(NAN_SCORES)
    texts = tokenizer.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
    return [next((line.strip() for line in text.splitlines() if line.strip()), "") for text in texts]


def attribute(
    forward: Callable[..., torch.Tensor],
    embeds: torch.Tensor,
    attributed: torch.Tensor,
    *,
    method: str,
    reduction: str = "l1",
    ig_steps: int = 20,
    ig_baseline: torch.Tensor | None = None,
    forward_args: tuple = (),
) -> torch.Tensor:
    """Per-token attribution scores of a scalar-per-row function of embeddings.

    Args:
        forward: ``forward(embeds, *forward_args)`` -> ``[B]``.
        embeds: ``[B, T, d]`` the input embeddings.
        attributed: bool ``[B, T]``, the positions to attribute; integrated gradients moves only these (from
            ``ig_baseline``), the others stay at their embeddings.
        method: ``saliency``, ``input-x-gradient`` or ``integrated-gradients``.
        reduction: ``l1`` or ``l2`` over the embedding dimension, or ``sum``: the plain sum (for integrated
            gradients the token's signed share of ``forward(embeds) − forward(baseline)``, as completeness checks
            need; saliency's gradients are absolute values already).
        ig_steps: integration steps of integrated gradients.
        ig_baseline: where integrated gradients starts the attributed positions, broadcastable to ``embeds`` (``[d]``:
            one embedding everywhere, ``[B, T, d]``: per position); None: 0.
        forward_args: further arguments of ``forward``, batch-first tensors (repeated per integration step).

    Returns:
        float32 ``[B, T]``, 0 where not attributed.
    """
    embeds = embeds.detach()
    if method == "saliency":
        attr = Saliency(forward).attribute(embeds.requires_grad_(), abs=True, additional_forward_args=forward_args)
    elif method == "input-x-gradient":
        attr = InputXGradient(forward).attribute(embeds.requires_grad_(), additional_forward_args=forward_args)
    elif method == "integrated-gradients":
        start = 0.0 if ig_baseline is None else ig_baseline.detach().to(embeds.dtype)
        baselines = torch.where(attributed.unsqueeze(-1), start, embeds)
        attr = IntegratedGradients(forward).attribute(
            embeds,
            baselines=baselines,
            additional_forward_args=forward_args,
            n_steps=ig_steps,
            internal_batch_size=embeds.shape[0],  # one forward/backward of B rows per step
        )
    else:
        raise ValueError(f"unknown attribution method {method!r}")
    if reduction == "l1":
        scores = attr.abs().sum(-1)
    elif reduction == "l2":
        scores = attr.norm(dim=-1)
    elif reduction == "sum":
        scores = attr.sum(-1)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return torch.where(attributed, scores.float(), 0.0)  # [B, T]


def answer_attributions(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    method: str,
    reduction: str = "l1",
    ig_steps: int = 20,
    ig_baseline: str = "token",
    pad_id: int,
) -> list[torch.Tensor]:
    """Attribution of log p(answer | prompt) to each prompt token, for a batch.

    Args:
        model: a causal LM (its parameters need no gradient).
        prompts: B token-id lists.
        answers: B non-empty token-id lists, the continuations whose log-probability is attributed.
        method: ``saliency``, ``input-x-gradient`` or ``integrated-gradients``.
        reduction: ``l1`` or ``l2`` over the embedding dimension (``sum``: signed, see `attribute`).
        ig_steps: integration steps of integrated gradients.
        ig_baseline: where integrated gradients starts the prompt tokens: ``token``, the embedding of ``pad_id`` at
            every prompt position, or ``zero``.
        pad_id: filler id (the pad token, else EOS), also the ``token`` baseline.

    Returns:
        B float32 tensors, ``[len(prompts[i])]`` each.
    """
    if ig_baseline not in ("token", "zero"):
        raise ValueError(f"unknown integrated-gradients baseline {ig_baseline!r}")
    ids, mask, prompt_mask, answer_mask = _layout(prompts, answers, pad_id, model.device)
    width = max(len(a) for a in answers)
    embedding = model.get_input_embeddings()
    embeds = embedding(ids)  # [B, T, d]
    baseline = None
    if method == "integrated-gradients" and ig_baseline == "token":
        baseline = embedding(torch.tensor(pad_id, device=ids.device)).detach()  # [d]
    scores = attribute(
        partial(continuation_logprob, model),
        embeds,
        prompt_mask,
        method=method,
        reduction=reduction,
        ig_steps=ig_steps,
        ig_baseline=baseline,
        forward_args=(mask, ids[:, -width:], answer_mask[:, -width:]),
    )
    end = ids.shape[1]
    return [scores[i, end - len(a) - len(p) : end - len(a)] for i, (p, a) in enumerate(zip(prompts, answers))]
