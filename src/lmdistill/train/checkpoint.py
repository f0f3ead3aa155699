"""Atomic checkpoints: model, optimizer, scheduler, RNG states and data position in one directory per step.

A checkpoint is written into a temporary sibling directory and renamed into place, then `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and never a half-written one. Weights and
optimizer state are whole (gathered from FSDP shards), so a checkpoint resumes with or without `--fsdp`, on any
number of processes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedModel

from lmdistill.errors import LmdistillError
from lmdistill.storage import staged

LATEST = "latest"
# Whole tensors, on the CPU of the main process only.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict[str, Any]:
    """The states of every random generator a run touches."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict in the main process (empty in the others); every process must call it."""
    state = get_model_state_dict(model, options=GATHERED)
    # Gathering copies tied parameters apart: alias them again, so that `save_pretrained` writes each once.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(param), name)
        if state and source != name:
            state[name] = state[source]
    return state


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name, in the main process (empty in the others); every
    process must call it."""
    return get_optimizer_state_dict(model, optimizer, options=GATHERED)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a `gathered_optimizer_state` into the optimizer of `model`, sharded or not; every process calls it.

    Checkpoints written before `--fsdp` existed hold `optimizer.state_dict()`, keyed by position in the optimizer's
    parameter order: those keys are mapped to parameter names first.
    """
    if all(isinstance(key, int) for key in state["state"]):
        names = {id(param): name for name, param in model.named_parameters()}
        order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
        state = {
            "state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]
            ],
        }
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    root: Path,
    step: int,
    model: PreTrainedModel,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    training_state: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Write checkpoint `root/step-NNNNNN` atomically and point `root/latest` at it.

    Args:
        root: the run's checkpoint directory.
        step: optimizer steps completed.
        model: the student (saved as a Hugging Face directory, loadable on its own).
        weights: its whole state dict (`gathered_weights`).
        tokenizer: saved beside the model.
        training_state: optimizer, scheduler, RNG and data-position state (`torch.save`d).
        meta: JSON-serializable step, metrics and config.
    """
    final = root / f"step-{step:06d}"
    with staged(final) as staging:
        model.save_pretrained(staging, state_dict=weights)
        tokenizer.save_pretrained(staging)
        torch.save(training_state, staging / "training_state.pt")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    with staged(root / LATEST, directory=False) as pointer:
        pointer.write_text(final.name + "\n")


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` points at, or None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "training_state.pt").is_file():
        raise LmdistillError(f"checkpoint pointer {pointer} names {path}, which is missing or incomplete")
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    """Read the optimizer, scheduler, RNG and data-position state of a checkpoint."""
    try:
        return torch.load(path / "training_state.pt", weights_only=False)
    except Exception as exc:
        raise LmdistillError(f"could not read checkpoint {path}: {exc}".splitlines()[0]) from exc
