"""The precision policy: bf16 autocast where bf16 products are fast, fp32 elsewhere, and a record of the choice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch


def fast_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether bf16 matrix products are fast here: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX.

    Without those instructions (AVX2-only CPUs) PyTorch emulates bf16 products, measured 10-100x slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the CPU flags that decide fp32 and bf16 speed


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """The CPU's model name and which of `SPEED_FLAGS` it has (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"model": None, "flags": []}
    fields = {
        name.strip(): value.strip() for name, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)
    }
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name") or None, "flags": [flag for flag in SPEED_FLAGS if flag in flags]}


def resolve_precision(device: torch.device, precision: str) -> tuple[str, str]:
    """The precision a setting ("auto", "bf16" or "fp32") runs in on `device`, "bf16" or "fp32", and why.

    "auto" is bf16 where bf16 products are fast (see `fast_bf16`), else fp32. Runs record both in environment.json:
    results differ between machines with and without native bf16.
    """
    if precision != "auto":
        return precision, f"set to {precision}"
    fast = fast_bf16(device)
    if device.type == "cuda":
        return ("bf16", "auto: CUDA GPU with bf16") if fast else ("fp32", "auto: CUDA GPU without bf16")
    if fast:
        return "bf16", "auto: CPU with AVX512-BF16/AMX"
    return "fp32", "auto: CPU without AVX512-BF16/AMX, bf16 would be emulated"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where the setting `precision` resolves to bf16 (see `resolve_precision`), else nothing."""
    if resolve_precision(device, precision)[0] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def study_precision(setting: str, recorded: Iterable[str]) -> str:
    """The precision setting for a study's new runs: "auto" with recorded runs that all used one precision becomes
    that precision, so that a study resumed on a machine with other CPU flags (or a GPU) stays comparable; any other
    case keeps ``setting``.

    Args:
        setting: the study's ``precision`` ("auto", "bf16" or "fp32").
        recorded: the precision ("bf16" or "fp32") each of its finished runs recorded.
    """
    found = set(recorded)
    return found.pop() if setting == "auto" and len(found) == 1 else setting
