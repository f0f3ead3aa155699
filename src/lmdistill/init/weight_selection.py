"""Weight Selection (Xu et al., ICLR 2024, "Initializing Models with Larger Ones", arXiv 2311.18823).

The student takes the teacher's first N blocks and, in every tensor, evenly spaced elements along every axis, with
the same indices wherever two tensors share an axis: one set of width indices for the whole model, one set of heads,
head dimensions and MLP units per block. Nothing is folded, so with nothing cut the student is the teacher.

Launch: `lmdistill init --teacher default --method weight-selection --hidden-size 288 --num-layers 6 --num-heads 3
--num-kv-heads 1 --intermediate-size 768 --out runs/student-ws`
"""

from __future__ import annotations

from torch import Tensor

from lmdistill.init.select import map_width
from lmdistill.models.adapters import BlockWeights, ModelWeights, Norm


def select_width(block: BlockWeights, width: Tensor) -> BlockWeights:
    """Keep the residual-stream coordinates `width` in every read-side, write-side and norm tensor of a block.

    Args:
        block: canonical block at teacher width d_T (heads and units already selected).
        width: int64 indices [d_S] into the teacher's width.

    Returns:
        The block at width d_S.
    """

    def norm(n: Norm) -> Norm:
        return Norm(n.weight[width], None if n.bias is None else n.bias[width], n.offset)

    return map_width(
        block,
        read=lambda w, _norm: w[width],
        read_bias=lambda bias, _w, _norm: bias,
        write=lambda w, _post: w[..., width],
        norm=norm,
        post_norm=norm,
    )


def select_embeddings_and_head(teacher: ModelWeights, student: ModelWeights, width: Tensor) -> None:
    """Set the student's embeddings, positions, final norm and untied head by width selection, in place.

    A model that scales its embeddings (Gemma 3: by sqrt(d)) gets them times `teacher.embed_scale /
    student.embed_scale`, so that block 1 reads the teacher's input at the kept coordinates (a factor of 1 with
    nothing cut).

    Args:
        teacher: canonical teacher weights.
        student: canonical student weights; `embed`, `positions`, `final_norm` and `head` are replaced.
        width: int64 indices [d_S] into the teacher's width.
    """
    student.embed = teacher.embed[:, width] * (teacher.embed_scale / student.embed_scale)  # [V, d_S]
    if student.positions is not None:
        student.positions = teacher.positions[: student.positions.shape[0], width]  # [L_S, d_S]
    final = teacher.final_norm
    student.final_norm = Norm(final.weight[width], None if final.bias is None else final.bias[width], final.offset)
    if student.head is not None:
        student.head = teacher.head[width]  # [d_S, V]
