"""Student-shape derivation: fill unspecified sizes from the teacher and refuse shapes initialization cannot map."""

from __future__ import annotations

from lmdistill.errors import LmdistillError
from lmdistill.models.adapters import Adapter, ModelShape


def derive_student_shape(
    teacher: ModelShape,
    adapter: Adapter,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    head_dim: int | None = None,
) -> ModelShape:
    """The student's shape: each size given, or else derived from the teacher's.

    Unspecified sizes keep the teacher's value, except where the architecture ties them to others: GPT-2's head
    count follows from `hidden_size / head_dim`, and the KV-head count keeps the teacher's query heads per KV head.

    Args:
        teacher: the teacher's shape.
        adapter: the teacher's architecture adapter (says whether heads are rotary, grouped, tied to the width).
        hidden_size: student width d_S.
        num_layers: student block count.
        num_heads: student query heads.
        num_kv_heads: student key/value heads.
        intermediate_size: student MLP width.
        head_dim: student head width (default: the teacher's).

    Returns:
        The validated student shape (vocabulary always the teacher's).

    Raises:
        LmdistillError: one line saying which size is wrong and what to change.
    """
    hidden = hidden_size or teacher.hidden_size
    head = head_dim or teacher.head_dim
    if num_heads is None:
        num_heads = hidden // head if adapter.head_dim_from_width else teacher.num_heads
    if num_kv_heads is None:
        group = teacher.num_heads // teacher.num_kv_heads
        if num_heads % group:
            raise LmdistillError(
                f"cannot derive --num-kv-heads: {num_heads} heads do not split into the teacher's groups of {group} "
                "query heads per KV head; pass --num-kv-heads"
            )
        num_kv_heads = num_heads // group
    shape = ModelShape(
        hidden_size=hidden,
        num_layers=num_layers or teacher.num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head,
        intermediate_size=intermediate_size or teacher.intermediate_size,
        vocab_size=teacher.vocab_size,
    )
    _validate(shape, teacher, adapter)
    return shape


_FLAGS = {
    "hidden_size": "--hidden-size",
    "num_layers": "--num-layers",
    "num_heads": "--num-heads",
    "num_kv_heads": "--num-kv-heads",
    "head_dim": "--head-dim",
    "intermediate_size": "--intermediate-size",
}


def _validate(s: ModelShape, t: ModelShape, adapter: Adapter) -> None:
    for key, flag in _FLAGS.items():
        value, limit = getattr(s, key), getattr(t, key)
        if value < 1:
            raise LmdistillError(f"{flag} must be at least 1, got {value}")
        if value > limit:
            raise LmdistillError(f"{flag} {value} is larger than the teacher's {limit}; choose {flag} <= {limit}")
    if s.num_heads % s.num_kv_heads:
        raise LmdistillError(
            f"--num-heads {s.num_heads} is not a multiple of --num-kv-heads {s.num_kv_heads}; change one of them"
        )
    if not adapter.grouped_kv and s.num_kv_heads != s.num_heads:
        raise LmdistillError(
            f"this architecture has no grouped KV heads: --num-kv-heads must equal --num-heads ({s.num_heads})"
        )
    student_group, teacher_group = s.num_heads // s.num_kv_heads, t.num_heads // t.num_kv_heads
    if student_group > teacher_group:
        raise LmdistillError(
            f"each student KV head would serve {student_group} query heads but a teacher KV head serves only "
            f"{teacher_group}, so query heads cannot map onto kept KV heads; use --num-kv-heads >= "
            f"{-(-s.num_heads // teacher_group)} or fewer --num-heads"
        )
    if adapter.rotary and s.head_dim % 2:
        raise LmdistillError(f"--head-dim {s.head_dim} must be even: rotary embeddings rotate pairs of dimensions")
    if adapter.head_dim_from_width and s.hidden_size != s.num_heads * s.head_dim:
        raise LmdistillError(
            f"this architecture needs --hidden-size = --num-heads x head width ({s.num_heads} x {s.head_dim} = "
            f"{s.num_heads * s.head_dim}), got {s.hidden_size}; change --hidden-size or --num-heads"
        )
