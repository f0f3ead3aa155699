"""Atomic checkpoints: model, optimizer, scheduler, RNG states and data position in one directory per step.

A checkpoint is written into a temporary sibling directory and renamed into place, then `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and never a half-written one. Weights and
optimizer state are whole (gathered from FSDP shards), so a checkpoint resumes with or without `--fsdp`, on any
number of processes.

The training state is stored without pickle, so reading a checkpoint never runs code: its tensors (optimizer state,
torch and CUDA RNG states) in ``training_state.safetensors``, the rest in ``training_state.json``, where each tensor is
``{"__tensor__": KEY}`` (KEY: its JSON-pointer path, such as ``/optimizer/state/lm_head.weight/exp_avg``) and each
tuple ``{"__tuple__": [...]}``. Checkpoints written before hold one ``training_state.pt``; it is read with
``torch.load(weights_only=True)``, which admits tensors, plain data and the array of numpy's RNG state, and refuses
anything else.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
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
STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"
OLD_STATE = "training_state.pt"  # the pickled training state of checkpoints written before
TENSOR, TUPLE = "__tensor__", "__tuple__"
# What `torch.load` of an old training state may build besides tensors and plain data: the uint32 array of numpy's
# RNG state (its reconstructor is `numpy._core.multiarray._reconstruct`, named `numpy.core...` in files of numpy 1).
_reconstruct = np.zeros(0).__reduce__()[0]
NUMPY_RNG_GLOBALS = [
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
]
# Whole tensors, on the CPU of the main process only.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict[str, Any]:
    """The states of every random generator a run touches."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, key.tolist(), pos, has_gauss, gauss)  # the key array as a list: plain data
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by `rng_state` (numpy's key array may also be an array, as old checkpoints hold
    it)."""
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
        training_state: optimizer, scheduler, RNG and data-position state: tensors and plain data (dicts with string
            keys, lists, tuples, strings, numbers, None).
        meta: JSON-serializable step, metrics and config.
    """
    final = root / f"step-{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(training_state, "", tensors)
    with staged(final) as staging:
        model.save_pretrained(staging, state_dict=weights)
        tokenizer.save_pretrained(staging)
        save_file(tensors, staging / STATE_TENSORS)
        (staging / STATE_JSON).write_text(json.dumps(plain) + "\n")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    with staged(root / LATEST, directory=False) as pointer:
        pointer.write_text(final.name + "\n")


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` points at, or None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not ((path / STATE_JSON).is_file() or (path / OLD_STATE).is_file()):
        raise LmdistillError(f"checkpoint pointer {pointer} names {path}, which is missing or incomplete")
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    """Read the optimizer, scheduler, RNG and data-position state of a checkpoint, in either format.

    Raises:
        LmdistillError: the state cannot be read, or an old ``training_state.pt`` holds other objects than tensors,
            plain data and numpy's RNG state (unpickling them could run code: it is refused, nothing runs).
    """
    try:
        if (path / STATE_JSON).is_file():
            return _decode(json.loads((path / STATE_JSON).read_text()), load_file(path / STATE_TENSORS))
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
            return torch.load(path / OLD_STATE, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LmdistillError(
            f"refused checkpoint {path}: its {OLD_STATE} holds pickled objects other than tensors and plain data, "
            "which loading would run as code"
        ) from exc
    except Exception as exc:
        raise LmdistillError(f"could not read checkpoint {path}: {exc}".splitlines()[0]) from exc


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` (at path `key` of the training state) as JSON data; its tensors go to `tensors`, by path."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"internal error: the training state at {key or '/'} has keys that are not strings")
        return {k: _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}
    return value  # plain data: `json.dumps` refuses anything else


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if value.keys() == {TENSOR}:
            return tensors[value[TENSOR]]
        if value.keys() == {TUPLE}:
            return tuple(_decode(v, tensors) for v in value[TUPLE])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value
