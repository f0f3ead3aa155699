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

from lmdistill.config import RationaleExtractConfig, to_yaml
from lmdistill.distributed import local_device
from lmdistill.errors import LmdistillError
from lmdistill.models.load import load_teacher
from lmdistill.models.teacher_dtype import resolve_teacher_dtype, to_teacher_dtype
from lmdistill.rationales.answers import encode_answer, teacher_answers
from lmdistill.rationales.attribution import answer_attributions
from lmdistill.rationales.records import read_records, settings_path
from lmdistill.rationales.tasks import Example, is_correct, load_task, render_prompt
from lmdistill.rationales.words import rationale_text, select_words, split_words, word_scores

log = logging.getLogger(__name__)

# Config fields that shape the output lines: a resumed run must agree with the first on all of them (on the IG ones
# only with --method integrated-gradients).
RECORD_SETTINGS = (
    "teacher", "teacher_dtype", "task", "split", "data", "size", "seed", "template", "k", "method", "reduction",
    "order", "stop_words", "max_new_tokens", "choice_score", "ig_steps", "ig_baseline",
)  # fmt: skip
IG_SETTINGS = ("ig_steps", "ig_baseline")
# Settings added since the first rationale files: the value those files were written with.
SETTINGS_BEFORE = {"ig_baseline": "zero", "teacher_dtype": "fp32"}


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


def _resolved(config: RationaleExtractConfig, device: torch.device) -> RationaleExtractConfig:
    """The settings as they shape the lines: the template used, and the dtype the teacher runs in on `device`."""
    dtype = resolve_teacher_dtype(device, config.teacher_dtype)[0]
    return dataclasses.replace(config, template=config.prompt_template, teacher_dtype=dtype)


def _check_settings(out: Path, config: RationaleExtractConfig, resuming: bool, device: torch.device) -> None:
    """Write the settings of a new rationale file; for an existing one, refuse settings that differ."""
    path, resolved = settings_path(out), _resolved(config, device)
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


def run_extract(config: RationaleExtractConfig) -> dict[str, Any]:
    """Extract the rationales of a task split into ``config.out``, skipping the ids already there.

    Returns:
        ``out``, ``new`` (records written now), ``total`` (records in the file), ``accuracy`` (teacher accuracy over
        the file's records), ``seconds`` and ``examples_per_s`` of this run's extraction (teacher loading excluded),
        ``teacher_dtype`` and ``teacher_dtype_reason`` (what the teacher runs in here, and why).
    """
    out = Path(config.out)
    _check_out(out)
    device = local_device()
    teacher_dtype = resolve_teacher_dtype(device, config.teacher_dtype)
    examples = load_task(
        config.task, config.split, data=config.data, size=config.size, seed=config.seed, limit=config.limit
    )
    records = read_records(out)
    _check_settings(out, config, resuming=bool(records), device=device)
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
        to_teacher_dtype(model, config.teacher_dtype, device)
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
        "teacher_dtype": teacher_dtype[0],
        "teacher_dtype_reason": teacher_dtype[1],
    }
