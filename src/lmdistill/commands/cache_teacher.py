"""`lmdistill cache-teacher`: run the teacher once over the training blocks and store its top-k distributions (and,
with --hidden-student, its hidden states through the GUIDE projection)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdistill.data.order import DataOrder
from lmdistill.data.packed import prepare_data
from lmdistill.hidden import HiddenSpec, check_student
from lmdistill.models.load import load_teacher, read_config, teacher_source
from lmdistill.models.teacher_dtype import to_teacher_dtype
from lmdistill.teacher_cache import check_out, model_fingerprint, write_cache


def run_cache_teacher(config: Any) -> dict[str, Any]:
    """`lmdistill cache-teacher`: load the teacher and the data, write the cache, return its manifest.

    Args:
        config: a `CacheTeacherConfig`.

    Returns:
        The manifest written to `OUT/manifest.json`.
    """
    check_out(Path(config.out), resume=config.resume, overwrite=config.overwrite)  # before loading anything
    hidden = None
    if config.hidden_student is not None:
        student = Path(config.hidden_student)
        student_config = read_config(student)
        hidden = HiddenSpec.of(student_config)
        shape = {"width": hidden.width, "student_num_layers": hidden.num_layers}
        check_student(student_config, student, shape, teacher_source(config.teacher).name, "--hidden-student")
    teacher = load_teacher(config.teacher)
    fingerprint = model_fingerprint(teacher.model)  # of the weights as loaded, whatever dtype they run in
    teacher_dtype = to_teacher_dtype(teacher.model, config.teacher_dtype, torch.device("cpu"))
    data = prepare_data(
        config.data, teacher.tokenizer, config.seq_len, val_fraction=config.val_fraction, progress=config.progress
    )
    blocks = None
    if config.samples is not None:  # the blocks a run of that many samples reads, in storage order
        blocks = np.unique(DataOrder(len(data.train), config.seed).blocks(0, config.samples))
    return write_cache(
        teacher.model,
        teacher.name,
        teacher.tokenizer,
        data,
        Path(config.out),
        top_k=config.top_k,
        blocks=blocks,
        batch_size=config.batch_size,
        teacher_dtype=teacher_dtype,
        fingerprint=fingerprint,
        progress=config.progress,
        resume=config.resume,
        overwrite=config.overwrite,
        hidden=hidden,
    )
