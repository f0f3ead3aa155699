"""`--dry-run` of `lmdistill train` and `study`: the expected peak memory by component, and the warning of a run
whose estimate exceeds the memory available (`lmdistill.estimate`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from lmdistill.config import STUDY_ARMS, StudyConfig, TrainConfig
from lmdistill.config.study import STUDY_SHAPE
from lmdistill.distributed import local_device
from lmdistill.estimate import Estimate, cache_bytes, exceeds_available, training_estimate
from lmdistill.hidden import layer_pairs
from lmdistill.models.adapters import adapter_for
from lmdistill.models.load import read_config, teacher_config
from lmdistill.models.shape import derive_student_shape
from lmdistill.models.teacher_dtype import resolve_teacher_dtype
from lmdistill.teacher_cache import read_manifest

log = logging.getLogger(__name__)


def estimate_train(config: TrainConfig) -> Estimate:
    """The estimate of a `lmdistill train` process, from the student's and teacher's configs and the cache's
    manifest (processes: torchrun's WORLD_SIZE)."""
    online = config.teacher is not None and config.needs_teacher
    cached = config.teacher_cache is not None and config.needs_teacher
    top_k = None
    if cached:
        cache = Path(config.teacher_cache)
        top_k = read_manifest(cache)["top_k"]
    device = local_device()
    estimate = training_estimate(
        read_config(Path(config.student)),
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        chunk_size=config.chunk_size,
        teacher=teacher_config(config.teacher) if online else None,
        teacher_dtype=resolve_teacher_dtype(device, config.teacher_dtype)[0],
        kd_loss=config.kd_loss,
        beta=config.beta,
        top_k=top_k,
        processes=int(os.environ.get("WORLD_SIZE", "1")),
        fsdp=config.fsdp,
    )
    if cached:
        disk = sum(path.stat().st_size for path in cache.iterdir() if path.is_file())
        return dataclasses.replace(estimate, cache_disk=disk, cache_how=f"the files of {cache}")
    return estimate


def estimate_study(config: StudyConfig) -> Estimate:
    """The estimate of a study's largest moment: a kd run training from the cache while the study holds the
    teacher (at its largest budget), and the disk of its caches, one per budget (blocks: at most the samples of a run,
    max-steps x batch-size)."""
    teacher = teacher_config(config.teacher)
    adapter = adapter_for(teacher)
    sizes = {name: getattr(config, name) for name in STUDY_SHAPE}  # as `StudyConfig.init_config` gives them
    shape = derive_student_shape(adapter.shape(teacher), adapter, **sizes)
    kd = any(STUDY_ARMS[arm].loss != "ce" for arm in config.arms + config.ablations)
    budget = max(config.train_tokens)
    run = config.train_config(STUDY_ARMS["kd"], budget, student="student", out="out", teacher_cache="cache")
    estimate = training_estimate(
        adapter.student_config(teacher, shape),
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        chunk_size=run.chunk_size,
        held_teacher=teacher,
        top_k=config.top_k if kd else None,
    )
    if not kd:
        return estimate
    samples = sum(config.steps(budget) for budget in config.train_tokens) * config.batch_size
    how = (
        f"at most {samples:,} blocks (max-steps x batch-size, over the budgets) x {config.seq_len} x top-{config.top_k}"
    )
    hidden = 0
    if config.hidden_arms:
        hidden = len(layer_pairs(config.num_layers, adapter.shape(teacher).num_layers)) * config.hidden_size
        how += f", with hidden states {hidden // config.hidden_size} x {config.hidden_size} float16"
    return dataclasses.replace(
        estimate, cache_disk=cache_bytes(samples, config.seq_len, config.top_k, hidden), cache_how=how
    )


def warn_if_too_big(estimate: Estimate) -> None:
    """Log a one-line warning when the estimate exceeds the memory available."""
    warning = exceeds_available(estimate)
    if warning:
        log.warning("warning: %s", warning)
