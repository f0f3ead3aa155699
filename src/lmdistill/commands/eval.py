"""`lmdistill eval`: held-out loss and perplexity of a model, its teacher and a baseline, and the gap closed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.data.packed import check_same_vocabulary, prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import gap_closed_forms, heldout_loss, perplexity, spread_blocks
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.models.teacher_dtype import to_teacher_dtype
from lmdistill.precision import resolve_precision
from lmdistill.provenance import environment


def run_eval(config: Any) -> dict[str, Any]:
    """`lmdistill eval`: held-out loss and perplexity of a model, its teacher and a baseline, and the gap closed.

    Args:
        config: an `EvalConfig`.

    Returns:
        The results, also written to `config.out` (default `MODEL/eval.json`).
    """
    model, tokenizer, _ = load_hf_directory(Path(config.model), torch.float32)
    data = prepare_data(config.data, tokenizer, config.seq_len, val_fraction=config.val_fraction)
    blocks = data.val if config.eval_tokens is None else spread_blocks(data.val, config.eval_tokens)
    device = next(model.parameters()).device
    precision, teacher_dtype = resolve_precision(device, config.precision), None

    def measure(lm: PreTrainedModel, role: str, name: str, dtype: str | None = None) -> dict[str, float]:
        # the teacher runs in its own dtype (no autocast), the other models in --precision
        setting = config.precision if dtype is None else "fp32"
        loss = heldout_loss(lm, blocks, batch_size=config.batch_size, precision=setting)
        if not math.isfinite(loss):
            raise LmdistillError(
                f"the {role} {name} has a non-finite held-out loss ({loss}) in {dtype or precision[0]}: its weights or "
                "its forward pass give NaN or inf"
            )
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    results: dict[str, Any] = {"model": {"path": config.model, **measure(model, "--model", config.model)}}
    if config.teacher is not None:
        teacher = load_teacher(config.teacher)
        check_same_vocabulary(model, tokenizer, teacher.model, teacher.tokenizer)
        teacher_dtype = to_teacher_dtype(teacher.model, config.teacher_dtype, device)
        measured = measure(teacher.model, "--teacher", teacher.name, teacher_dtype[0])
        results["teacher"] = {"name": teacher.name, "dtype": teacher_dtype[0], **measured}
    if config.baseline is not None:
        baseline, baseline_tokenizer, _ = load_hf_directory(Path(config.baseline), torch.float32)
        check_same_vocabulary(model, tokenizer, baseline, baseline_tokenizer)
        results["baseline"] = {"path": config.baseline, **measure(baseline, "--baseline", config.baseline)}
    if "teacher" in results and "baseline" in results:
        results.update(gap_closed_forms(results["baseline"], results["model"], results["teacher"]))
    results["data"] = {"fingerprint": data.fingerprint, "tokens": int(blocks.size), "seq_len": config.seq_len}
    results["config"] = vars(config)
    results["environment"] = environment(precision, teacher_dtype)
    out = Path(config.out) if config.out else Path(config.model) / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    results["written_to"] = str(out)
    return results
