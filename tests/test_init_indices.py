"""Which teacher coordinates, heads, units and layers each initialization keeps, read off tagged weights.

The identities in test_init.py hold with nothing cut, where every selection is the identity; these tests cut every
axis, so a selection that used other indices for one tensor, or other heads, scales or layers, would show here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_teacher

from lmdistill.init.build import build_student
from lmdistill.init.select import block_indices, uniform_indices
from lmdistill.models.adapters import ModelShape, adapter_for

# family -> {canonical role: the axis of that family}; roles absent from a model are skipped
BLOCK_AXES: dict[str, dict[str, int]] = {
    "width": {
        "q": 0,
        "k": 0,
        "v": 0,
        "up": 0,
        "gate": 0,
        "o": 2,
        "down": 1,
        "o_bias": 0,
        "down_bias": 0,
        "attn_norm": 0,
        "mlp_norm": 0,
        "attn_post_norm": 0,
        "mlp_post_norm": 0,
    },
    "q_heads": {"q": 1, "o": 0, "q_bias": 0},
    "kv_heads": {"k": 1, "v": 1, "k_bias": 0, "v_bias": 0},
    "head_dims": {"q": 2, "k": 2, "v": 2, "o": 1, "q_bias": 1, "k_bias": 1, "v_bias": 1, "q_norm": 0, "k_norm": 0},
    "units": {"up": 1, "gate": 1, "down": 0, "up_bias": 0, "gate_bias": 0},
}
MODEL_AXES = {"embed": 1, "head": 0, "final_norm": 0}  # the width family outside the blocks


def counting(t: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor of t's shape whose every element is its index along `axis`."""
    shape = [1] * t.dim()
    shape[axis] = t.shape[axis]
    return torch.arange(t.shape[axis], dtype=t.dtype).reshape(shape).expand_as(t).clone()


def read_tag(t: torch.Tensor, axis: int) -> list[int]:
    """The index a `counting` tensor's slices came from, checking that each slice is one index throughout."""
    moved = t.movedim(axis, 0).reshape(t.shape[axis], -1)
    assert torch.equal(moved, moved[:, :1].expand_as(moved)), "one slice mixes teacher indices"
    return moved[:, 0].long().tolist()


def tensor_of(holder, role: str) -> torch.Tensor | None:
    value = getattr(holder, role)
    return value.weight if hasattr(value, "weight") else value


def set_tensor(holder, role: str, t: torch.Tensor) -> None:
    value = getattr(holder, role)
    if hasattr(value, "weight"):
        value.weight = t
    else:
        setattr(holder, role, t)


def tag_teacher(teacher, family: str) -> None:
    """Give every tensor that has an axis of `family` the index along it as its values, in place."""
    adapter = adapter_for(teacher.config)
    weights = adapter.read(teacher)
    for block in weights.blocks:
        for role, axis in BLOCK_AXES[family].items():
            if (t := tensor_of(block, role)) is not None:
                set_tensor(block, role, counting(t, axis))
    if family == "width":
        for role, axis in MODEL_AXES.items():
            if (t := tensor_of(weights, role)) is not None:
                set_tensor(weights, role, counting(t, axis))
    adapter.write(teacher, weights)


@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", True), ("qwen3", False), ("gemma3", False)])
@pytest.mark.parametrize("family", list(BLOCK_AXES))
def test_weight_selection_keeps_one_set_of_indices_per_axis_in_every_tensor(kind, tied, family):
    # Sizes chosen so that no two axes of the teacher or the student have the same length.
    teacher = tiny_teacher(
        kind,
        tie_word_embeddings=tied,
        hidden_size=40,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=72,
    )
    tag_teacher(teacher, family)
    adapter = adapter_for(teacher.config)
    t_shape = adapter.shape(teacher.config)
    shape = ModelShape(20, 2, 4, 2, head_dim=6, intermediate_size=24, vocab_size=t_shape.vocab_size)
    student = adapter.read(build_student(teacher, shape, "weight-selection").student)
    # Gemma's embeddings are scaled by sqrt(d): selection multiplies them by sqrt(d_T / d_S) (see there)
    student.embed = torch.round(student.embed * (student.embed_scale / adapter.read(teacher).embed_scale))
    idx = block_indices(t_shape, shape, adapter.rotary)
    expected = {
        "width": uniform_indices(40, 20),
        "q_heads": idx.q_heads,
        "kv_heads": idx.kv_heads,
        "head_dims": idx.head_dims,
        "units": idx.units,
    }[family].tolist()
    roles = [(block, role, axis) for block in student.blocks for role, axis in BLOCK_AXES[family].items()]
    if family == "width":
        roles += [(student, role, axis) for role, axis in MODEL_AXES.items()]
    checked = 0
    for holder, role, axis in roles:
        if (t := tensor_of(holder, role)) is not None:
            assert read_tag(t, axis) == expected, f"{family}: {role} kept other indices"
            checked += 1
    assert checked >= len(student.blocks) * 2


def test_query_heads_are_evenly_spaced_inside_each_kept_kv_group():
    t = ModelShape(64, 2, 8, 2, head_dim=16, intermediate_size=32, vocab_size=10)
    s = ModelShape(32, 1, 4, 2, head_dim=8, intermediate_size=16, vocab_size=10)
    assert block_indices(t, s, rotary=True).q_heads.tolist() == [0, 2, 4, 6]  # groups {0..3}, {4..7}: 2 of 4 each
    t = ModelShape(64, 2, 12, 2, head_dim=16, intermediate_size=32, vocab_size=10)
    s = ModelShape(32, 1, 3, 1, head_dim=8, intermediate_size=16, vocab_size=10)
    assert block_indices(t, s, rotary=True).q_heads.tolist() == [0, 2, 4]  # KV head 0's group {0..5}, 3 of 6


@pytest.mark.parametrize("method", ["guide", "guide-all"])
def test_guide_untied_head_gives_the_teacher_logits_on_the_projected_stream(method):
    # For x in span(M) with y = x M: head_S(norm_S(y)) = head_T(norm_T(x)), which needs c = sqrt(d_T / d_S).
    teacher = tiny_teacher("llama", tie_word_embeddings=False)
    vocab = adapter_for(teacher.config).shape(teacher.config).vocab_size
    shape = ModelShape(16, 2, 2, 1, head_dim=8, intermediate_size=32, vocab_size=vocab)
    result = build_student(teacher, shape, method)
    y = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        teacher_logits = teacher.lm_head(teacher.model.norm(y @ result.projection.T))
        student_logits = result.student.lm_head(result.student.model.norm(y))
    torch.testing.assert_close(student_logits, teacher_logits, rtol=1e-4, atol=1e-5)


def test_guide_all_folds_the_teacher_blocks_of_uniform_layer_selection():
    # Qwen3's per-head q/k norms are copied, not folded: they name the teacher block each student block came from.
    teacher = tiny_teacher("qwen3", num_hidden_layers=6)
    adapter = adapter_for(teacher.config)
    t_shape = adapter.shape(teacher.config)
    shape = ModelShape(16, 3, 4, 2, head_dim=8, intermediate_size=64, vocab_size=t_shape.vocab_size)
    student = build_student(teacher, shape, "guide-all").student
    for j, i in enumerate([0, 2, 4]):  # (j * 6) // 3
        for name in ("q_norm", "k_norm"):
            kept = getattr(student.model.layers[j].self_attn, name).weight
            assert torch.equal(kept, getattr(teacher.model.layers[i].self_attn, name).weight), (j, i, name)
