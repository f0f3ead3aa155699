"""GUIDE: Guided Initialization and Distillation of Embeddings (Trinh, Menghani, Vee, 2025, arXiv 2510.06502).

The student's residual stream is the teacher's projected onto the top-d_S right singular subspace of the teacher's
embedding table, x_S = x_T M with M [d_T, d_S] orthonormal columns. Every weight that reads the residual stream is
folded through the same projection, every weight that writes it is projected, and heads, head dimensions and MLP
units are cut by Uniform Selection. Derivation for a read-side weight behind an RMSNorm with gain g (row vectors):

    teacher:  rms_norm(x) g W          = sqrt(d_T) x diag(g) W / ||x||
    student:  rms_norm(x M) (c M^T diag(g) W) = sqrt(d_S) c x M M^T diag(g) W / ||x M||

which agree when x lies in span(M) (then x M M^T = x and ||x M|| = ||x||) and c = sqrt(d_T / d_S); the student's
norm gain becomes 1. LayerNorm also subtracts the mean over the d coordinates; `pca_projection` chooses M so that
the student's residual stream has zero mean, which makes the same fold exact (see there). A LayerNorm bias b is
folded exactly into the weight's bias (b W). The untied output head
reads the residual through the final norm and gets the same rule; a tied head follows the embeddings.

Gemma 3 (`lmdistill.models.adapters.Gemma3Adapter`): the gain of its RMSNorms is 1 + w (`Norm.gain`), which the
folds use. Block 1 reads sqrt(d) E[t], so E_S = sqrt(d_T / d_S) E_T M makes the student's scaled embeddings the
teacher's times M exactly; the tied head then gives logits rms_norm(x M) E_S^T = rms_norm(x) E_T^T for x in span(M)
(gain 1, the final gain cannot be folded into a tied head). Its post-norms normalize a block output a = z W at the
width of the residual stream, with no weight after them to take their gain g:

    teacher:  rms_norm(a) diag(g) M                    = sqrt(d_T) (a ⊙ g) M / ||a||
    student:  rms_norm(z W diag(g) M) (c rms(g))       = sqrt(d_T) rms(g) (a ⊙ g) M / ||(a ⊙ g) M||

with the gain moved in front of M into the write weight and the student's gain the constant c rms(g),
c = sqrt(d_T / d_S) (`fold_block`). These agree up to one factor per token, rms(g) ||a|| / ||(a ⊙ g) M||, which
is 1 for a constant g on outputs a in span(M) (with nothing cut M is a rotation and every a is in its span). No
diagonal student gain is exact for a per-coordinate g: diag(g) does not commute with M.

Launch: `lmdistill init --teacher default --method guide --hidden-size 288 --num-layers 6 --num-heads 3
--num-kv-heads 1 --intermediate-size 768 --out runs/student-guide`
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lmdistill.errors import LmdistillError
from lmdistill.init.select import map_width
from lmdistill.models.adapters import BlockWeights, ModelWeights, Norm

PCAMode = Literal["uncentered", "centered", "random", "frequency"]
PCA_MODES: tuple[str, ...] = PCAMode.__args__
FREQUENCY_FLOOR = 0.01  # share of the "frequency" weights spread evenly over the vocabulary (see `pca_projection`)


@dataclass(frozen=True)
class Projection:
    """The GUIDE projection and how much of the embedding table it keeps."""

    matrix: Tensor  # M [d_T, d_S] float32
    explained_variance: float  # ||E M||^2 / ||E||^2; for LayerNorm models over ||E C||^2, the part the model sees


def token_distribution(train: np.ndarray, rows: int) -> Tensor:
    """The share f_v of each token id v among the training blocks' tokens.

    Args:
        train: the training blocks [N, L] of `PackedData.train` (never the validation blocks).
        rows: rows V of the teacher's embedding table.

    Returns:
        f [V] float64, summing to 1; 0 for a token the blocks never use.

    Raises:
        LmdistillError: a block holds a token id without an embedding row.
    """
    counts = np.bincount(np.asarray(train).ravel(), minlength=rows)
    if len(counts) > rows:
        raise LmdistillError(
            f"the training data holds token id {len(counts) - 1}, beyond the teacher's embedding table of {rows} rows: "
            "its tokenizer and embeddings do not share a vocabulary"
        )
    return torch.from_numpy(counts / counts.sum())


def second_moment(embed: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum_v w_v e_v^T e_v = E^T diag(w) E [d_T, d_T] in float64 from one float32 pass over the table (w = 1: None)."""
    e = embed.detach().float()
    return (e.T @ (e if weights is None else weights.float()[:, None] * e)).double()


def _visible(gram: Tensor, layer_norm: bool) -> Tensor:
    """C G C (C = I - 11^T/d_T) for LayerNorm models, which never see the all-ones component; else G."""
    if not layer_norm:
        return gram
    centering = torch.eye(gram.shape[0], dtype=torch.float64) - 1.0 / gram.shape[0]
    return centering @ gram @ centering


def kept_energy(gram: Tensor, m: Tensor, layer_norm: bool = False) -> float:
    """The share tr(M^T G M) / tr(G) of a second moment G that the projection M keeps (LayerNorm: over tr(C G C))."""
    m = m.double()
    return float(torch.trace(m.T @ gram @ m) / torch.trace(_visible(gram, layer_norm)))


def pca_projection(
    embed: Tensor,
    width: int,
    mode: PCAMode = "uncentered",
    layer_norm: bool = False,
    seed: int = 0,
    frequencies: Tensor | None = None,
) -> Projection:
    """The projection M: top right singular vectors of the (optionally centered or frequency-weighted) table.

    Everything is computed from the d_T x d_T Gram matrix E^T E ("frequency": also E^T diag(w) E), each one float32
    pass over the V x d_T table, eigendecomposition in float64. Column signs are fixed so the entry of largest
    magnitude is positive, which makes M deterministic.

    LayerNorm models: every read of the residual stream goes through a LayerNorm, which removes the component along
    the all-ones vector 1, so that component never affects any output. M then projects it away: M = M' U with M' the
    top (d_S - 1) right singular vectors of the row-centered table E C (C = I - 11^T/d_T) and U [d_S - 1, d_S] an
    orthonormal basis of the student's own zero-mean subspace. The student's residual stream then has zero mean, its
    LayerNorm equals an RMSNorm of the teacher's centered residual, and the fold is exact where RMSNorm's is.

    Args:
        embed: teacher embedding table E_T [V, d_T].
        width: d_S <= d_T (at least 2 with `layer_norm`).
        mode: "uncentered" (SVD of E_T) or "centered" (PCA of E_T minus its mean row). Either way the student's
            embeddings are E_T M; centering only changes which subspace M spans. "random": a seeded random orthonormal
            basis instead of the singular vectors (the ablation that isolates the value of PCA). "frequency": the
            top eigenvectors of sum_v w_v e_v^T e_v, the rows weighted by how often text uses them, so M keeps most
            of the used tokens' energy: w = (1 - FLOOR) f + FLOOR / V with f the tokens' shares in the training data
            and FLOOR = `FREQUENCY_FLOOR`, so tokens the data never uses keep a small equal weight (directions the
            used tokens leave free follow the table). Equal shares give the "uncentered" M.
        layer_norm: whether the model's norms are LayerNorms (see above).
        seed: seeds the basis of the "random" mode.
        frequencies: f [V] (`token_distribution`), needed by the "frequency" mode only.

    Returns:
        M [d_T, d_S], ordered by decreasing singular value, with orthonormal columns for RMSNorm models and
        M^T M = I - 11^T/d_S for LayerNorm models; and its explained variance.
    """
    e = embed.detach().float()
    vocab, d = e.shape
    gram = second_moment(e)  # [d_T, d_T]
    if layer_norm and width < 2:
        raise ValueError("a LayerNorm student needs a width of at least 2")
    centering = torch.eye(d, dtype=torch.float64) - 1.0 / d  # C
    visible = _visible(gram, layer_norm)  # (E C)^T (E C) for LayerNorm models
    target = visible
    if mode == "centered":
        mean = e.mean(dim=0).double()
        if layer_norm:
            mean = mean @ centering
        target = visible - vocab * torch.outer(mean, mean)
    elif mode == "frequency":
        if frequencies is None or frequencies.shape != (vocab,):
            raise ValueError(f"the frequency mode needs the share of each of the {vocab} tokens")
        weights = (1 - FREQUENCY_FLOOR) * frequencies + FREQUENCY_FLOOR / vocab
        target = _visible(second_moment(e, weights), layer_norm)
    rank = width - 1 if layer_norm else width
    if mode == "random":
        gaussian = torch.randn(d, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        m, _ = torch.linalg.qr(centering @ gaussian if layer_norm else gaussian)  # [d_T, rank], Haar-distributed
    else:
        _, vectors = torch.linalg.eigh(target)  # ascending eigenvalues
        m = vectors[:, -rank:].flip(dims=[1])  # [d_T, rank]
    m = m * torch.sign(m.gather(0, m.abs().argmax(dim=0, keepdim=True)))
    if layer_norm:
        ones_first = torch.eye(width, dtype=m.dtype)
        ones_first[:, 0] = 1.0
        q, _ = torch.linalg.qr(ones_first)  # q[:, 0] is along 1, q[:, 1:] spans its complement
        m = m @ q[:, 1:].T  # [d_T, d_S]
    return Projection(m.float(), kept_energy(gram, m, layer_norm))  # ||E M||^2 / ||E||^2 (or ||E C||^2)


def explained_energy(
    embed: Tensor, width: int, frequencies: Tensor, layer_norm: bool = False, seed: int = 0
) -> dict[str, dict[str, float]]:
    """What the M of every PCA mode keeps: of the table's energy, and of the used tokens' energy sum_v f_v ||e_v||^2.

    Args:
        embed: teacher embedding table E_T [V, d_T].
        width: d_S.
        frequencies: f [V], the tokens' shares in the training data (`token_distribution`).
        layer_norm: whether the model's norms are LayerNorms (energies then over the part the model sees).
        seed: seeds the "random" mode's basis.

    Returns:
        mode -> {"table": the mode's explained variance, "used_tokens": its kept share of the weighted energy}.
    """
    used = second_moment(embed, frequencies)
    energy = {}
    for mode in PCA_MODES:
        projection = pca_projection(embed, width, mode, layer_norm, seed, frequencies)
        energy[mode] = {
            "table": projection.explained_variance,
            "used_tokens": kept_energy(used, projection.matrix, layer_norm),
        }
    return energy


def fold_block(block: BlockWeights, m: Tensor) -> BlockWeights:
    """Fold a canonical block (heads and units already selected) through the projection M.

    Read side (q, k, v, up, gate): W_S = c M^T diag(g) W with c = sqrt(d_T / d_S), bias b_S = b + beta W for a
    LayerNorm bias beta. Write side (o, down and their biases): W_S = W M. The student's pre-norms become gain 1,
    bias 0. A post-norm of gain g on a write-side output (Gemma 3): W_S = W diag(g) M (bias likewise) and the
    student's gain is the constant c rms(g): exact up to one factor per token (see the module docstring).

    Args:
        block: canonical block at teacher width d_T.
        m: projection [d_T, d_S].

    Returns:
        The block at width d_S.
    """
    d_teacher, d_student = m.shape
    c = math.sqrt(d_teacher / d_student)

    def read(w: Tensor, norm: Norm) -> Tensor:
        scaled = w * norm.gain.reshape(-1, *([1] * (w.dim() - 1)))  # diag(g) W
        return c * torch.tensordot(m.T, scaled, dims=1)  # [d_S, ...]

    def read_bias(bias: Tensor | None, w: Tensor, norm: Norm) -> Tensor | None:
        if norm.bias is None:
            return bias
        if bias is None:
            raise NotImplementedError("a LayerNorm bias in front of a projection without bias cannot be folded")
        return bias + torch.tensordot(norm.bias, w, dims=1)

    def write(w: Tensor, post: Norm | None) -> Tensor:
        return w @ m if post is None else (w * post.gain) @ m  # a post-norm's gain moves in front of M

    def unit_norm(norm: Norm) -> Norm:
        return norm.with_gain(torch.ones(d_student), None if norm.bias is None else torch.zeros(d_student))

    def post_norm(norm: Norm) -> Norm:
        return norm.with_gain(torch.full((d_student,), c * norm.gain.square().mean().sqrt().item()))

    return map_width(block, read=read, read_bias=read_bias, write=write, norm=unit_norm, post_norm=post_norm)


def fold_embeddings_and_head(teacher: ModelWeights, student: ModelWeights, m: Tensor) -> None:
    """Set the student's embeddings, positions, final norm and untied head from the teacher's through M, in place.

    A model that scales its embeddings (Gemma 3: by sqrt(d)) gets E_T M times `teacher.embed_scale /
    student.embed_scale`, so that block 1 reads the teacher's input times M.

    Args:
        teacher: canonical teacher weights at width d_T.
        student: canonical student weights at width d_S; `embed`, `positions`, `final_norm` and `head` are replaced.
        m: projection [d_T, d_S].
    """
    d_teacher, d_student = m.shape
    student.embed = (teacher.embed @ m) * (teacher.embed_scale / student.embed_scale)  # [V, d_S]
    if student.positions is not None:
        student.positions = teacher.positions[: student.positions.shape[0]] @ m  # [L_S, d_S]
    final = teacher.final_norm
    student.final_norm = final.with_gain(torch.ones(d_student), None if final.bias is None else torch.zeros(d_student))
    # An untied head reads the residual through the final norm, so it takes the read-side rule. A final LayerNorm
    # bias would become a logit bias, which the head does not have: it is dropped.
    if student.head is not None:
        student.head = math.sqrt(d_teacher / d_student) * (m.T @ (final.gain[:, None] * teacher.head))  # [d_S, V]
