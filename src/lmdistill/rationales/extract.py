"""`lmdistill rationales extract`: the teacher answers each example, the gradient attribution of its answer picks the
top-k input words, and each example becomes one JSON line of ``--out``.

    lmdistill rationales extract --teacher default --task cqa --split train --k 5 --method saliency --out cqa.jsonl

A line holds ``id``, ``answer`` (the teacher's), ``label``, ``correct``, ``words`` (``[[word, score], ...]`` in the
rationale's order) and ``rationale`` (the words joined by spaces). The run appends to ``--out`` and skips the ids
already there, so an interrupted or extended run (a larger ``--limit``) continues where it stopped; the settings
that shape the lines are kept beside it in ``OUT.config.yaml`` and a run with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import RationaleEvalConfig, RationaleExtractConfig, to_yaml
from lmdistill.errors import LmdistillError
from lmdistill.models.load import load_teacher
from lmdistill.rationales.attribution import answer_attributions, choose, generate
from lmdistill.rationales.tasks import Example, continuation, is_correct, load_task, render_prompt
from lmdistill.rationales.words import rationale_text, select_words, split_words, word_scores
from lmdistill.storage import staged

log = logging.getLogger(__name__)

# Config fields that shape the output lines: a resumed run must agree with the first on all of them (on the IG ones
# only with --method integrated-gradients).
RECORD_SETTINGS = (
    "teacher", "task", "split", "data", "size", "seed", "template", "k", "method", "reduction", "order", "stop_words",
    "max_new_tokens", "choice_score", "ig_steps", "ig_baseline",
)  # fmt: skip
IG_SETTINGS = ("ig_steps", "ig_baseline")
# Settings added since the first rationale files: the value those files were written with.
SETTINGS_BEFORE = {"ig_baseline": "zero"}


def settings_path(out: Path) -> Path:
    """Where the settings of a rationale file are kept: ``OUT.config.yaml``."""
    return out.with_name(out.name + ".config.yaml")


def read_records(out: Path) -> list[dict[str, Any]]:
    """The records of the rationale file ``--out`` (none if it does not exist).

    An incomplete last line (a write cut short) is removed from the file with a warning.

    Raises:
        LmdistillError: a line that is not a rationale record (see `parse_records`).
    """
    if not out.exists():
        return []
    data = out.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        log.warning("%s: removing an incomplete last line (an interrupted write)", out)
        with out.open("r+b") as f:
            f.truncate(whole)
    return parse_records(out, "--out")


def parse_records(path: Path, flag: str, fields: tuple[str, ...] = ("id",)) -> list[dict[str, Any]]:
    """The records of a rationale file, one JSON object per line (blank lines skipped), each with string ``fields``.

    Args:
        path: the file, which exists.
        flag: the option that gave it, named in errors.
        fields: the fields every record must have as strings.

    Raises:
        LmdistillError: a line that is not such a record, named by file and line.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmdistillError(f"{flag} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = _record_problem(record, fields)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON ({exc.msg})"
        if problem:
            raise LmdistillError(
                f"{flag} {path} line {line_no} is not a rationale record: {problem}; give another {flag}"
            )
        records.append(record)
    return records


def _record_problem(record: Any, fields: tuple[str, ...]) -> str | None:
    """What keeps a parsed JSON line from being a record with string ``fields``; None if nothing."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [f for f in fields if not isinstance(record.get(f), str)]
    return f"no string field {missing[0]!r}" if missing else None


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a rationale file: a directory, a path below a file, or one whose settings
    file (`settings_path`) is a directory."""
    if out.is_dir():
        raise LmdistillError(
            f"--out {out} is a directory: give the file to write, e.g. --out {out / 'rationales.jsonl'}"
        )
    above = next(p for p in out.parents if p.exists())  # the nearest existing folder above, "." at the latest
    if not above.is_dir():
        raise LmdistillError(f"--out {out}: {above} is a file, not a directory")
    if settings_path(out).is_dir():
        raise LmdistillError(
            f"{settings_path(out)}, where the settings of --out {out} are kept, is a directory: move it or give "
            "another --out"
        )


def _resolved(config: RationaleExtractConfig) -> RationaleExtractConfig:
    return dataclasses.replace(config, template=config.prompt_template)


def _check_settings(out: Path, config: RationaleExtractConfig, resuming: bool) -> None:
    """Write the settings of a new rationale file; for an existing one, refuse settings that differ."""
    path, resolved = settings_path(out), _resolved(config)
    if not resuming:
        out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_yaml(resolved))
        return
    if not path.is_file():
        raise LmdistillError(f"{out} exists but {path} (its settings) does not: give another --out")
    saved = {**SETTINGS_BEFORE, **yaml.safe_load(path.read_text())}
    compared = [n for n in RECORD_SETTINGS if resolved.method == "integrated-gradients" or n not in IG_SETTINGS]
    differ = [n for n in compared if saved.get(n) != getattr(resolved, n)]
    if differ:
        shown = ", ".join(f"--{n.replace('_', '-')} {saved.get(n)!r} (now {getattr(resolved, n)!r})" for n in differ)
        raise LmdistillError(f"{out} was written with {shown}: resume with the same settings or give another --out")


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """The token ids of an answer as the teacher's continuation (`continuation`) after the prompt; an empty answer (the
    model produced no text) is attributed through the end-of-sequence token it chose."""
    return (
        tokenizer(continuation(answer), add_special_tokens=False)["input_ids"] if answer else [tokenizer.eos_token_id]
    )


def teacher_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    prompt_ids: list[list[int]],
    config: RationaleExtractConfig | RationaleEvalConfig,
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


def extract_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], config: RationaleExtractConfig
) -> list[dict[str, Any]]:
    """Answer, attribute and select the rationale words of a batch of examples; one record per example."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [render_prompt(e, config.prompt_template) for e in examples]
    encoded = tokenizer([p.text for p in prompts], return_offsets_mapping=True, return_special_tokens_mask=True)
    prompt_ids = encoded["input_ids"]
    answers = teacher_answers(model, tokenizer, examples, prompt_ids, config, pad_id)
    scores = answer_attributions(
        model,
        prompt_ids,
        [encode_answer(tokenizer, a) for a in answers],
        method=config.method,
        reduction=config.reduction,
        ig_steps=config.ig_steps,
        ig_baseline=config.ig_baseline,
        pad_id=pad_id,
    )
    records = []
    for i, (example, prompt, answer) in enumerate(zip(examples, prompts, answers)):
        words = split_words(prompt.text, prompt.spans)
        totals = word_scores(words, encoded["offset_mapping"][i], scores[i].tolist(), encoded["special_tokens_mask"][i])
        selected = select_words(words, totals, config.k, order=config.order, drop_stop_words=config.stop_words)
        records.append(
            {
                "id": example.id,
                "answer": answer,
                "label": example.label,
                "correct": is_correct(answer, example),
                "words": [[word, score] for word, score in selected],
                "rationale": rationale_text(selected),
            }
        )
    return records


def first_words(record: dict[str, Any], k: int) -> dict[str, Any]:
    """A record cut to its first ``k`` rationale words, ``rationale`` rebuilt from them.

    For records extracted with ``--order score`` this is exactly the record an extraction with ``--k k`` writes: the
    selection sorts every candidate word by score before keeping the best ones, so smaller k give prefixes.
    """
    words = record["words"][:k]
    return {**record, "words": words, "rationale": rationale_text([(word, score) for word, score in words])}


def write_first_words(source: Path, out: Path, k: int) -> int:
    """Write the records of the rationale file ``source`` cut to their first ``k`` words (`first_words`) to ``out``,
    atomically, with the settings file an extraction with ``--k k`` would have written beside it.

    Returns:
        The number of records written.

    Raises:
        LmdistillError: ``source`` has no settings file, was extracted with ``--order input`` (its words are not in
            score order) or with fewer than ``k`` words per record.
    """
    path = settings_path(source)
    if not path.is_file():
        raise LmdistillError(f"{source} has no settings file {path}: cannot tell how it was extracted")
    settings = yaml.safe_load(path.read_text())
    if settings.get("order") != "score" or settings.get("k", 0) < k:
        raise LmdistillError(
            f"{source} was extracted with --order {settings.get('order')} --k {settings.get('k')}: its first {k} words "
            f"are the top-{k} rationale only with --order score and --k {k} or more"
        )
    records = [first_words(r, k) for r in read_records(source)]
    with staged(settings_path(out), directory=False) as staging:  # first: records never lack their settings
        staging.write_text(yaml.safe_dump({**settings, "out": str(out), "k": k}, sort_keys=False))
    with staged(out, directory=False) as staging:
        staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return len(records)


def run_extract(config: RationaleExtractConfig) -> dict[str, Any]:
    """Extract the rationales of a task split into ``config.out``, skipping the ids already there.

    Returns:
        ``out``, ``new`` (records written now), ``total`` (records in the file), ``accuracy`` (teacher accuracy over
        the file's records), ``seconds`` and ``examples_per_s`` of this run's extraction (teacher loading excluded).
    """
    out = Path(config.out)
    _check_out(out)
    examples = load_task(
        config.task, config.split, data=config.data, size=config.size, seed=config.seed, limit=config.limit
    )
    records = read_records(out)
    _check_settings(out, config, resuming=bool(records))
    done = {r["id"] for r in records}
    todo = [e for e in examples if e.id not in done]
    seconds = 0.0
    if todo:
        teacher = load_teacher(config.teacher)
        model, tokenizer = teacher.model, teacher.tokenizer
        if not tokenizer.is_fast:
            raise LmdistillError(
                f"the tokenizer of {teacher.name} is not a fast tokenizer: rationale words need its offsets mapping"
            )
        if tokenizer.eos_token_id is None:
            raise LmdistillError(f"the tokenizer of {teacher.name} has no end-of-sequence token")
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        log.info("%d of %d examples to do (%d already in %s)", len(todo), len(examples), len(examples) - len(todo), out)
        start = time.perf_counter()
        with (
            out.open("a", encoding="utf-8") as f,
            tqdm(total=len(todo), unit="ex", desc=f"{config.method} rationales", disable=not config.progress) as bar,
        ):
            for first in range(0, len(todo), config.batch_size):
                batch = todo[first : first + config.batch_size]
                for record in extract_batch(model, tokenizer, batch, config):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one whole line per write
                    f.flush()
                    records.append(record)
                bar.update(len(batch))
        seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "new": len(todo),
        "total": len(records),
        "accuracy": sum(bool(r.get("correct")) for r in records) / max(len(records), 1),
        "seconds": seconds,
        "examples_per_s": len(todo) / seconds if seconds else None,
    }
