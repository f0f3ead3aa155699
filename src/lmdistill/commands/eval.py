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
    precision = resolve_precision(next(model.parameters()).device, config.precision)

    def measure(lm: PreTrainedModel, role: str, name: str) -> dict[str, float]:
        loss = heldout_loss(lm, blocks, batch_size=config.batch_size, precision=config.precision)
        if not math.isfinite(loss):
            raise LmdistillError(
                f"the {role} {name} has a non-finite held-out loss ({loss}) in {precision[0]}: its weights or its "
                "forward pass give NaN or inf"
            )
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    results: dict[str, Any] = {"model": {"path": config.model, **measure(model, "--model", config.model)}}
    if config.teacher is not None:
        teacher = load_teacher(config.teacher)
        check_same_vocabulary(model, tokenizer, teacher.model, teacher.tokenizer)
        results["teacher"] = {"name": teacher.name, **measure(teacher.model, "--teacher", teacher.name)}
    if config.baseline is not None:
        baseline, baseline_tokenizer, _ = load_hf_directory(Path(config.baseline), torch.float32)
        check_same_vocabulary(model, tokenizer, baseline, baseline_tokenizer)
        results["baseline"] = {"path": config.baseline, **measure(baseline, "--baseline", config.baseline)}
    if "teacher" in results and "baseline" in results:
        results.update(gap_closed_forms(results["baseline"], results["model"], results["teacher"]))
    results["data"] = {"fingerprint": data.fingerprint, "tokens": int(blocks.size), "seq_len": config.seq_len}
    results["config"] = vars(config)
    results["environment"] = environment(precision)
    out = Path(config.out) if config.out else Path(config.model) / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    results["written_to"] = str(out)
    return results
