"""Hidden-state distillation through the GUIDE projection (`--loss kd+hkd`, the `guide+hkd` study arm).

GUIDE makes the student's residual stream the teacher's rotated by M [d_T, d_S] (x_S = x_T M, `lmdistill.init.guide`),
so the teacher's residual stream after one of its blocks, times M, is a target for the student's after the block
mapped to it, with no learned projector. The targets: the residual stream (before the final norm) after student
block l, for l in {L_S // 2, L_S} (its middle and last blocks), against the teacher's after block
round(l · L_T / L_S) (halves up; at least 1), times the "uncentered" M that `lmdistill init --method guide` uses
(seed-independent: it depends only on the teacher's embeddings and d_S). The loss is `losses.hidden_loss`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from lmdistill.errors import LmdistillError
from lmdistill.init.build import GUIDE_METHODS
from lmdistill.init.guide import pca_projection
from lmdistill.models.adapters import adapter_for

PROJECTION = "uncentered"  # the GUIDE projection whose rotation the targets assume (`pca_projection`'s mode)


def decoder_layers(lm: PreTrainedModel) -> list[nn.Module]:
    """The model's blocks in order: the modules of the classes named in its `_no_split_modules` (or subclasses,
    such as FSDP's wrapped classes)."""
    names = set(lm._no_split_modules or ())
    layers = [module for module in lm.modules() if any(c.__name__ in names for c in type(module).__mro__)]
    if not layers:
        raise LmdistillError(f"{type(lm).__name__} names no decoder layer class (_no_split_modules)")
    return layers


@dataclass(frozen=True)
class HiddenSpec:
    """The student whose hidden states a teacher cache holds targets for: its width d_S and number of blocks L_S."""

    width: int
    num_layers: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> HiddenSpec:
        return cls(config.hidden_size, config.num_hidden_layers)


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, 1-based: blocks L_S // 2 and L_S, each against teacher block
    round(l · L_T / L_S), halves rounded up, at least 1."""
    blocks = sorted({block for block in (student_layers // 2, student_layers) if block >= 1})
    return [(b, max(1, (2 * b * teacher_layers + student_layers) // (2 * student_layers))) for b in blocks]


def projection(teacher: PreTrainedModel, width: int) -> Tensor:
    """The "uncentered" GUIDE projection M [d_T, width] of `teacher`, as `lmdistill init` computes it."""
    embed = teacher.get_input_embeddings().weight
    if not 1 <= width <= embed.shape[1]:
        raise LmdistillError(f"the student width {width} must be between 1 and the teacher's width {embed.shape[1]}")
    layer_norm = adapter_for(teacher.config).norm == "layer"
    return pca_projection(embed, width, PROJECTION, layer_norm).matrix


def fingerprint(m: Tensor) -> str:
    """sha256 of M's float32 bytes."""
    return hashlib.sha256(m.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@contextmanager
def block_outputs(lm: PreTrainedModel, blocks: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Within the block, each forward pass of `lm` puts the residual stream after block b (1-based) of `blocks`, [B,
    L, d], in the yielded dict at key b (forward hooks, removed on exit)."""
    layers, outputs = decoder_layers(lm), {}

    def keep(block: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[block] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[block - 1].register_forward_hook(keep(block)) for block in blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def teacher_states(teacher: PreTrainedModel, ids: Tensor, blocks: Sequence[int], m: Tensor) -> tuple[Any, Tensor]:
    """The teacher's forward pass on `ids` [B, L] and its residual stream after `blocks`, times M: ``(its output,
    float32 [B, L, H, d_S])``."""
    with block_outputs(teacher, blocks) as outputs:
        output = teacher(input_ids=ids)
    states = torch.stack([outputs[block].float() for block in blocks], dim=2)  # [B, L, H, d_T]
    return output, states @ m.to(states.device)


def check_student(config: PretrainedConfig, student: Path, record: dict[str, Any], teacher: str, source: str) -> None:
    """Refuse hidden-state targets for another student than they were made for: another width or depth, or a student
    that `lmdistill init` did not make with the same teacher's GUIDE projection (its `init_report.json`).

    Args:
        config: the student's config.
        student: the student's directory.
        record: the targets (a teacher cache's `hidden`): `width`, `student_num_layers`.
        teacher: the teacher's name (as `load_teacher` gives it).
        source: the targets' origin, for the message (e.g. "teacher cache DIR").
    """
    shape = HiddenSpec.of(config)
    if (shape.width, shape.num_layers) != (record["width"], record["student_num_layers"]):
        raise LmdistillError(
            f"{source} holds hidden states for a student of width {record['width']} with "
            f"{record['student_num_layers']} blocks, but {student} has width {shape.width} and {shape.num_layers} "
            "blocks: build it with cache-teacher --hidden-student STUDENT"
        )
    report_path = student / "init_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    made = (report.get("method"), report.get("pca"), (report.get("teacher") or {}).get("name"))
    if made[0] not in GUIDE_METHODS or made[1:] != (PROJECTION, teacher):
        found = "no init_report.json" if not report else f"method {made[0]}, pca {made[1]}, teacher {made[2]!r}"
        raise LmdistillError(
            f"hidden-state distillation targets the teacher's states times {teacher!r}'s GUIDE projection (--pca "
            f"{PROJECTION}), but the student {student} was not initialized with it ({found}): use a student of "
            f"lmdistill init --method guide or guide-all --pca {PROJECTION} from that teacher"
        )
