"""Uniform Selection (Xu et al. 2024, "Initializing Models with Larger Ones"): evenly spaced indices, shared by every
tensor that has the same axis, applied per canonical block so whole heads and whole rotary pairs survive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from lmdistill.models.adapters import READ_ROLES, WRITE_ROLES, BlockWeights, ModelShape, Norm


def uniform_indices(n_teacher: int, n_student: int) -> Tensor:
    """Evenly spaced indices `(i * n_teacher) // n_student` for i in [0, n_student).

    Args:
        n_teacher: size of the teacher's axis.
        n_student: size of the student's axis, at most `n_teacher`.

    Returns:
        int64 tensor [n_student], strictly increasing, starting at 0; the identity when the sizes are equal.
    """
    if not 0 < n_student <= n_teacher:
        raise ValueError(f"cannot select {n_student} of {n_teacher}")
    return torch.arange(n_student, dtype=torch.int64) * n_teacher // n_student


@dataclass(frozen=True)
class BlockIndices:
    """Which teacher heads, head dimensions and MLP units a student block keeps."""

    q_heads: Tensor  # [H_S] teacher query-head indices
    kv_heads: Tensor  # [H_kv_S] teacher KV-head indices
    head_dims: Tensor  # [l_S] teacher head-dimension indices, same for q, k, v, o
    units: Tensor  # [f_S] teacher MLP-unit indices, same for up, gate, down


def block_indices(teacher: ModelShape, student: ModelShape, rotary: bool) -> BlockIndices:
    """Uniform Selection indices for one block, consistent across every tensor that shares an axis.

    KV heads are chosen first; each kept KV head then keeps evenly spaced query heads of its own teacher group, so
    every student query head still reads the KV head it was trained with (GQA). With rotary embeddings, dimension j
    is rotated together with j + l/2, so whole pairs are kept: j is selected among the first halves.

    Args:
        teacher: teacher shape.
        student: student shape (validated by `derive_student_shape`).
        rotary: whether the model uses rotary position embeddings.

    Returns:
        The block's indices.
    """
    kv_heads = uniform_indices(teacher.num_kv_heads, student.num_kv_heads)
    teacher_group = teacher.num_heads // teacher.num_kv_heads
    student_group = student.num_heads // student.num_kv_heads
    within_group = uniform_indices(teacher_group, student_group)
    q_heads = (kv_heads[:, None] * teacher_group + within_group[None, :]).flatten()  # [H_kv_S * group_S]
    if rotary:
        half = uniform_indices(teacher.head_dim // 2, student.head_dim // 2)
        head_dims = torch.cat([half, half + teacher.head_dim // 2])
    else:
        head_dims = uniform_indices(teacher.head_dim, student.head_dim)
    units = uniform_indices(teacher.intermediate_size, student.intermediate_size)
    return BlockIndices(q_heads=q_heads, kv_heads=kv_heads, head_dims=head_dims, units=units)


def select_block(block: BlockWeights, idx: BlockIndices) -> BlockWeights:
    """Keep the selected heads, head dimensions and MLP units of a canonical block; the width axis is untouched.

    Args:
        block: canonical teacher block.
        idx: indices from `block_indices`.

    Returns:
        A new block with [d, H_S, l_S] q, [d, H_kv_S, l_S] k/v, [H_S, l_S, d] o, [d, f_S] up/gate, [f_S, d] down.
    """

    def heads(t: Tensor | None, head_axis: int, which: Tensor) -> Tensor | None:
        if t is None:
            return None
        return t.index_select(head_axis, which).index_select(head_axis + 1, idx.head_dims)

    def pick(t: Tensor | None, axis: int, which: Tensor) -> Tensor | None:
        return None if t is None else t.index_select(axis, which)

    return replace(
        block,
        q=heads(block.q, 1, idx.q_heads),
        k=heads(block.k, 1, idx.kv_heads),
        v=heads(block.v, 1, idx.kv_heads),
        o=heads(block.o, 0, idx.q_heads),
        q_bias=heads(block.q_bias, 0, idx.q_heads),
        k_bias=heads(block.k_bias, 0, idx.kv_heads),
        v_bias=heads(block.v_bias, 0, idx.kv_heads),
        q_norm=pick(block.q_norm, 0, idx.head_dims),
        k_norm=pick(block.k_norm, 0, idx.head_dims),
        up=pick(block.up, 1, idx.units),
        gate=pick(block.gate, 1, idx.units),
        down=pick(block.down, 0, idx.units),
        up_bias=pick(block.up_bias, 0, idx.units),
        gate_bias=pick(block.gate_bias, 0, idx.units),
    )


def map_width(
    block: BlockWeights,
    read: Callable[[Tensor, Norm], Tensor],
    read_bias: Callable[[Tensor | None, Tensor, Norm], Tensor | None],
    write: Callable[[Tensor, Norm | None], Tensor],
    norm: Callable[[Norm], Norm],
    post_norm: Callable[[Norm], Norm],
) -> BlockWeights:
    """Change a block's residual width d_T -> d_S, role by role.

    Args:
        block: canonical block (heads and units already selected).
        read: maps a read-side weight [d_T, ...] and the norm in front of it to [d_S, ...].
        read_bias: maps (bias or None, the original read-side weight, its norm) to the new bias.
        write: maps a write-side weight or bias [..., d_T] and the post-norm on its output (or None) to [..., d_S].
        norm: maps a pre-norm's parameters.
        post_norm: maps the parameters of a norm on a write-side output (Gemma 3's post-norms).

    Returns:
        The block at the student's width.
    """
    changes: dict[str, object] = {}
    for weight, (bias, norm_name) in READ_ROLES.items():
        w, n = getattr(block, weight), getattr(block, norm_name)
        if w is not None:
            changes[weight] = read(w, n)
            changes[bias] = read_bias(getattr(block, bias), w, n)
    for weight, (bias, post) in WRITE_ROLES.items():
        changes[weight] = write(getattr(block, weight), getattr(block, post))
        if getattr(block, bias) is not None:
            changes[bias] = write(getattr(block, bias), getattr(block, post))
    changes["attn_norm"] = norm(block.attn_norm)
    changes["mlp_norm"] = norm(block.mlp_norm)
    for name in ("attn_post_norm", "mlp_post_norm"):
        if getattr(block, name) is not None:
            changes[name] = post_norm(getattr(block, name))
    unmapped = {f.name for f in fields(block)} - changes.keys() - {"q_norm", "k_norm"}
    assert all(getattr(block, name) is None for name in unmapped), f"roles without a width rule: {unmapped}"
    return replace(block, **changes)
