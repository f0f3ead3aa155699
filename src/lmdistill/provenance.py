"""What a run records about where it ran: package versions, hardware, precision, the git commit of lmdistill."""

from __future__ import annotations

import json
import platform
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers

import lmdistill
from lmdistill.precision import cpu_description


def git_state() -> dict[str, Any]:
    """The commit and dirty flag of the lmdistill checkout this code runs from (None when not run from one)."""
    root = Path(lmdistill.__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def environment(
    precision: tuple[str, str] | None = None, teacher_dtype: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Versions, device and git state, for the files every run writes; with ``precision``, the precision the run's
    forward passes used and why (`lmdistill.precision.resolve_precision`) as ``precision`` and ``precision_reason``;
    with ``teacher_dtype``, the dtype its teacher ran in and why (`lmdistill.models.teacher_dtype.to_teacher_dtype`)
    as ``teacher_dtype`` and ``teacher_dtype_reason``."""
    cuda = torch.cuda.is_available()
    env = {
        "lmdistill": lmdistill.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "git": git_state(),
    }
    if precision is not None:
        env["precision"], env["precision_reason"] = precision
    if teacher_dtype is not None:
        env["teacher_dtype"], env["teacher_dtype_reason"] = teacher_dtype
    return env


def recorded_precision(runs: Iterable[Path]) -> tuple[str, str] | None:
    """The precision and its reason that the runs in these directories recorded in their environment.json (see
    `combined_precision`)."""
    pairs = []
    for run in runs:
        path = run / "environment.json"
        env = json.loads(path.read_text()) if path.is_file() else {}
        if "precision" in env:
            pairs.append((env["precision"], env["precision_reason"]))
    return combined_precision(pairs)


def combined_precision(pairs: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """One (precision, reason) for runs that recorded these; when they differ, "mixed" (or the common precision) with
    each reason and its number of runs; None when there are none."""
    found: Counter[tuple[str, str]] = Counter(pairs)
    if not found:
        return None
    precisions = {precision for precision, _ in found}
    precision = precisions.pop() if len(precisions) == 1 else "mixed"
    if len(found) == 1:
        return precision, next(iter(found))[1]
    return precision, "; ".join(f"{p} in {n} run{'s' * (n > 1)} ({reason})" for (p, reason), n in found.items())
