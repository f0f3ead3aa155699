"""Build a student from a teacher with one of the initialization methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmdistill.init.guide import PCAMode, explained_energy, fold_block, fold_embeddings_and_head, pca_projection
from lmdistill.init.select import block_indices, select_block, uniform_indices
from lmdistill.init.weight_selection import select_embeddings_and_head, select_width
from lmdistill.models.adapters import ModelShape, adapter_for

InitMethod = Literal["random", "weight-selection", "guide", "guide-all"]
INIT_METHODS: tuple[str, ...] = InitMethod.__args__
GUIDE_METHODS = ("guide", "guide-all")  # the methods with a projection M


@dataclass
class InitResult:
    """A freshly initialized student and what its initialization measured."""

    student: PreTrainedModel
    projection: Tensor | None  # M [d_T, d_S] for guide and guide-all
    explained_variance: float | None  # ||E_T M||^2 / ||E_T||^2 (see `Projection`) for guide methods
    energy: dict[str, dict[str, float]] | None = None  # `explained_energy` for guide methods given token frequencies


@torch.no_grad()
def build_student(
    teacher: PreTrainedModel,
    shape: ModelShape,
    method: InitMethod,
    *,
    pca: PCAMode = "uncentered",
    seed: int = 0,
    frequencies: Tensor | None = None,
) -> InitResult:
    """Initialize a student of `shape` from `teacher`.

    Methods:
        random: the architecture's own initialization (seeded).
        weight-selection: the teacher's first N blocks, uniform selection on every axis (Xu et al. 2024).
        guide: GUIDE (Trinh et al. 2025; `lmdistill.init.guide`): PCA embeddings, block 1 folded through M, blocks 2..N
            random.
        guide-all: every block folded through M from teacher blocks chosen by uniform layer selection.

    Each student block keeps the attention kind (sliding window or full) of the teacher block it comes from.

    Args:
        teacher: a supported Hugging Face causal LM in float32.
        shape: the student's shape (from `derive_student_shape`).
        method: one of `INIT_METHODS`.
        pca: "uncentered", "centered", "random" or "frequency" projection (guide methods only).
        seed: seeds the random initialization of everything the method does not transfer.
        frequencies: the tokens' shares in the training data (`token_distribution`): needed by the "frequency"
            projection; given, guide methods also measure `explained_energy`.

    Returns:
        The student (float32, eval mode) with the projection, its explained variance and (given frequencies) the
        energy every PCA mode keeps, for guide methods.
    """
    adapter = adapter_for(teacher.config)
    teacher_shape = adapter.shape(teacher.config)
    if method not in INIT_METHODS:
        raise ValueError(f"unknown initialization method {method!r}; choose one of {', '.join(INIT_METHODS)}")
    # The teacher block each student block comes from: its attention kind (sliding window or full) goes with it.
    layers = uniform_indices(teacher_shape.num_layers, shape.num_layers).tolist() if method == "guide-all" else None
    torch.manual_seed(seed)
    config = adapter.student_config(teacher.config, shape, layers)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.eval()
    if method == "random":
        return InitResult(student, None, None)

    source = adapter.read(teacher)
    target = adapter.read(student)
    indices = block_indices(teacher_shape, shape, adapter.rotary)
    m, variance, energy = None, None, None
    if method == "weight-selection":
        width = uniform_indices(teacher_shape.hidden_size, shape.hidden_size)
        select_embeddings_and_head(source, target, width)
        target.blocks = [select_width(select_block(source.blocks[i], indices), width) for i in range(shape.num_layers)]
    elif method in GUIDE_METHODS:
        layer_norm = adapter.norm == "layer"
        projection = pca_projection(source.embed, shape.hidden_size, pca, layer_norm, seed, frequencies)
        m, variance = projection.matrix, projection.explained_variance
        if frequencies is not None:
            energy = explained_energy(source.embed, shape.hidden_size, frequencies, layer_norm, seed)
        fold_embeddings_and_head(source, target, m)
        for j, i in enumerate(layers or [0]):
            target.blocks[j] = fold_block(select_block(source.blocks[i], indices), m)
    adapter.write(student, target)
    return InitResult(student, m, variance, energy)
