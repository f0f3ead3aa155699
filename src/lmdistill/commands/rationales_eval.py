"""`lmdistill rationales eval`: a model's accuracy on a task from the `predict:` prompt alone.

The model answers as the teacher does in `lmdistill rationales extract` (the same code): multiple-choice examples by
the choice of highest log-probability, the others by greedy decoding (the first line of the generation). An answer
is right as `is_correct` says: the label's choice; for SVAMP and gsm-symbolic the same number (an equation is
evaluated); else the same text up to case and spacing. Inference therefore costs what plain fine-tuning's does:
the `explain:` task is never run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmdistill.config import RationaleEvalConfig
from lmdistill.distributed import local_device
from lmdistill.errors import LmdistillError
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.provenance import environment
from lmdistill.rationales.answers import teacher_answers
from lmdistill.rationales.tasks import is_correct, load_task, render_prompt


def run_rationale_eval(config: RationaleEvalConfig) -> dict[str, Any]:
    """Answer every example of a task split with ``config.model`` and score the answers.

    ``config.model`` is a Hugging Face directory, or a teacher spec loaded with `load_teacher` (``default``, a
    ``.gguf`` file): the teacher's accuracy on the same prompts.

    Returns:
        ``accuracy``, ``correct``, ``total``, ``model_name``, ``predictions`` (``id``, ``answer``, ``label``,
        ``correct`` per example), ``seconds``, the config and the environment; also written to ``config.out`` (default
        ``MODEL/rationales_eval.json``), whose path is added as ``written_to``.
    """
    examples = load_task(
        config.task, config.split, data=config.data, size=config.size, seed=config.seed, limit=config.limit
    )
    path = Path(config.model).expanduser()
    if path.is_dir():
        model, tokenizer, _ = load_hf_directory(path, torch.float32)
        name = config.model
    else:  # a teacher spec: 'default', a .gguf file (converted once), a hub id
        teacher = load_teacher(config.model)
        model, tokenizer, name = teacher.model, teacher.tokenizer, teacher.name
    if tokenizer.eos_token_id is None:
        raise LmdistillError(f"the tokenizer of {name} has no end-of-sequence token")
    model.to(local_device()).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    predictions = []
    start = time.perf_counter()
    with tqdm(total=len(examples), unit="ex", desc="rationales eval", disable=not config.progress) as bar:
        for first in range(0, len(examples), config.batch_size):
            batch = examples[first : first + config.batch_size]
            prompt_ids = tokenizer([render_prompt(e, config.prompt_template, "predict").text for e in batch])[
                "input_ids"
            ]
            for example, answer in zip(batch, teacher_answers(model, tokenizer, batch, prompt_ids, config, pad_id)):
                predictions.append(
                    {"id": example.id, "answer": answer, "label": example.label, "correct": is_correct(answer, example)}
                )
            bar.update(len(batch))
    correct = sum(p["correct"] for p in predictions)
    results: dict[str, Any] = {
        "model": config.model,
        "model_name": name,
        "task": config.task,
        "split": config.split,
        "accuracy": correct / len(predictions),
        "correct": correct,
        "total": len(predictions),
        "seconds": time.perf_counter() - start,
        "predictions": predictions,
        "config": vars(config),
        "environment": environment(("fp32", "rationales eval always runs in fp32")),
    }
    out = Path(config.out) if config.out else Path(config.model) / "rationales_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    results["written_to"] = str(out)
    return results
