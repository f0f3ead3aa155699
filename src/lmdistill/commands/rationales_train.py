"""`lmdistill rationales train`: multitask training on labels and rationales (`lmdistill.train.rationale_data`) with the
training engine of `lmdistill train`."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import RationaleTrainConfig, TrainConfig
from lmdistill.rationales.tasks import load_task
from lmdistill.train.loop import check_positions, run_train
from lmdistill.train.rationale_data import RationaleTrainData, build_data, rationale_targets


def run_rationale_train(config: RationaleTrainConfig) -> dict[str, Any]:
    """Train a student on labels (+ λ · rationales) with the training engine; see the module docstring.

    Returns:
        The engine's summary (steps, tokens, held-out label loss, ``final`` directory), plus ``data`` (the manifest).
    """
    examples = load_task(
        config.task, config.split, data=config.data, size=config.size, seed=config.data_seed, limit=config.limit
    )
    rationales = rationale_targets(examples, config)
    built: dict[str, RationaleTrainData] = {}

    def make_data(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, processes: Any) -> RationaleTrainData:
        check_positions(student, config.max_len, "--max-len")
        built["data"] = build_data(config, tokenizer, examples, rationales)
        return built["data"]

    engine: TrainConfig = config.engine_config()
    summary = run_train(engine, data=make_data, settings=config)
    summary["data"] = built["data"].manifest
    return summary
