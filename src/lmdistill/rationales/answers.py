"""A model's answers to task prompts: its best choice for multiple-choice examples, else its greedy answer."""

from __future__ import annotations

from typing import Literal, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.rationales.attribution import choose, generate
from lmdistill.rationales.tasks import Example, continuation


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """The token ids of an answer as the teacher's continuation (`continuation`) after the prompt; an empty answer (the
    model produced no text) is attributed through the end-of-sequence token it chose."""
    return (
        tokenizer(continuation(answer), add_special_tokens=False)["input_ids"] if answer else [tokenizer.eos_token_id]
    )


class AnswerSettings(Protocol):
    """How answers are produced (fields of `RationaleExtractConfig` and `RationaleEvalConfig`)."""

    batch_size: int  # prompts per forward pass
    choice_score: Literal["sum", "mean"]  # a choice's log-probability, summed or per token
    max_new_tokens: int  # the length limit of a greedy answer


def teacher_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    prompt_ids: list[list[int]],
    config: AnswerSettings,
    pad_id: int,
) -> list[str]:
    """The model's answer to each prompt: its best choice for multiple-choice examples (``config.choice_score``),
    else its greedy answer (at most ``config.max_new_tokens``); used for the teacher (extract) and students (eval)."""
    answers = [""] * len(examples)
    picked = [i for i, e in enumerate(examples) if e.choices]
    if picked:
        options = [[encode_answer(tokenizer, c) for c in examples[i].choices] for i in picked]
        picks = choose(
            model,
            [prompt_ids[i] for i in picked],
            options,
            batch_size=config.batch_size,
            pad_id=pad_id,
            per_token=config.choice_score == "mean",
        )
        for i, pick in zip(picked, picks):
            answers[i] = examples[i].choices[pick]
    free = [i for i, e in enumerate(examples) if not e.choices]
    if free:
        texts = generate(
            model, tokenizer, [prompt_ids[i] for i in free], max_new_tokens=config.max_new_tokens, pad_id=pad_id
        )
        for i, text in zip(free, texts):
            answers[i] = text
    return answers
