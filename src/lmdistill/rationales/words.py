"""From per-token attribution scores to rationale words: pure functions on text, character offsets and scores.

A word is a whitespace-separated piece of the example's own text (the prompt's content spans, see
`lmdistill.rationales.tasks.Prompt`) with punctuation and symbols stripped from both ends; pieces with no letter or
digit are dropped. A word's score is the sum of the scores of the tokens whose character range overlaps it, so
sub-word pieces merge into their word and template text, special tokens and punctuation-only tokens contribute to no
word.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

# A small English stop-word list. Negations ("no", "not", "nor") are left out on purpose: they decide NLI labels.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between both but
    by can could did do does doing down during each few for from further had has have having he her here hers herself
    him himself his how i if in into is it its itself just me more most my myself of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves
    """.split()
)


@dataclass(frozen=True)
class Word:
    """A word of the prompt.

    Attributes:
        text: The word as written.
        start: Its first character in the prompt.
        end: One past its last character.
    """

    text: str
    start: int
    end: int


def _is_edge(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"  # punctuation and symbols


def split_words(text: str, spans: Sequence[tuple[int, int]]) -> list[Word]:
    """The words inside ``spans`` of ``text``, in order.

    Args:
        text: the prompt.
        spans: ``(start, end)`` character ranges to take words from (the example's own text).

    Returns:
        Whitespace-separated pieces with punctuation and symbols stripped from both ends; pieces without a letter or
        digit are dropped.
    """
    words = []
    for span_start, span_end in spans:
        position = span_start
        for piece in text[span_start:span_end].split():
            start = text.index(piece, position)
            position = end = start + len(piece)
            while start < end and _is_edge(text[start]):
                start += 1
            while end > start and _is_edge(text[end - 1]):
                end -= 1
            if any(c.isalnum() for c in text[start:end]):
                words.append(Word(text[start:end], start, end))
    return words


def word_scores(
    words: Sequence[Word],
    offsets: Sequence[tuple[int, int]],
    scores: Sequence[float],
    special: Sequence[bool] | None = None,
) -> list[float]:
    """Each word's score: the sum of the scores of the tokens overlapping it.

    Args:
        words: from `split_words`.
        offsets: ``[T]`` character range of each token (a fast tokenizer's offsets mapping; ``(0, 0)`` for tokens with
            no text).
        scores: ``[T]`` token scores.
        special: ``[T]`` True for special tokens, which count for no word.

    Returns:
        ``[len(words)]`` scores.
    """
    totals = [0.0] * len(words)
    for t, ((token_start, token_end), score) in enumerate(zip(offsets, scores)):
        if token_end <= token_start or (special is not None and special[t]):
            continue
        for i, word in enumerate(words):
            if word.start < token_end and token_start < word.end:
                totals[i] += float(score)
    return totals


def _candidates(words: Sequence[Word], scores: Sequence[float], drop_stop_words: bool) -> list[int]:
    """The indices of the words a rationale is chosen from: stop words dropped (optional); of a word occurring several
    times (compared case-insensitively) its highest-scoring occurrence (the earliest on ties)."""
    best: dict[str, int] = {}
    for i, word in enumerate(words):
        key = word.text.lower()
        if drop_stop_words and key in STOP_WORDS:
            continue
        if key not in best or scores[i] > scores[best[key]]:
            best[key] = i
    return list(best.values())


def select_words(
    words: Sequence[Word],
    scores: Sequence[float],
    k: int,
    *,
    order: str = "score",
    drop_stop_words: bool = True,
) -> list[tuple[str, float]]:
    """The rationale: the top-k distinct words.

    Stop words are dropped (optional); a word occurring several times (compared case-insensitively) keeps its
    highest-scoring occurrence (the earliest on ties); the k best remain.

    Args:
        words: from `split_words`, in input order.
        scores: ``[len(words)]`` from `word_scores`.
        k: words to keep.
        order: ``score`` (highest first; ties in input order) or ``input`` (the kept words in input order).
        drop_stop_words: leave out `STOP_WORDS`.

    Returns:
        ``[(word, score)]``, at most k of them.
    """
    top = sorted(_candidates(words, scores, drop_stop_words), key=lambda i: (-scores[i], i))[:k]
    if order == "input":
        top.sort()
    return [(words[i].text, float(scores[i])) for i in top]


def random_words(
    words: Sequence[Word], k: int, rng: random.Random, *, drop_stop_words: bool = True
) -> list[tuple[str, None]]:
    """The random control of `select_words`: k of the same candidate words (each distinct word, as first written),
    drawn uniformly without replacement: ``rng`` shuffles them in input order and the first k remain, so that a
    smaller k gives a prefix.

    Returns:
        ``[(word, None)]`` (no score), at most k of them.
    """
    order = sorted(_candidates(words, [0.0] * len(words), drop_stop_words))
    rng.shuffle(order)
    return [(words[i].text, None) for i in order[:k]]


def rationale_text(selected: Sequence[tuple[str, float | None]]) -> str:
    """The rationale as the student's target text: the selected words joined by spaces."""
    return " ".join(word for word, _ in selected)
