"""GUIDE and Weight Selection identities on tiny randomized teachers (derivations: lmdistill.init.guide, .select)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_teacher, tiny_tokenizer, write_corpus
from transformers import AutoModelForCausalLM

from lmdistill.data.corpus import hash_fraction
from lmdistill.data.packed import prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.init.build import build_student
from lmdistill.init.guide import PCA_MODES, explained_energy, pca_projection, token_distribution
from lmdistill.init.select import block_indices, uniform_indices
from lmdistill.models.adapters import ModelShape, adapter_for
from lmdistill.models.shape import derive_student_shape

LLAMA_KINDS = ["llama", "qwen2", "qwen3"]


def shape_of(model) -> ModelShape:
    return adapter_for(model.config).shape(model.config)


def student_shape(teacher, **sizes) -> ModelShape:
    return derive_student_shape(shape_of(teacher), adapter_for(teacher.config), **sizes)


def capture(module: torch.nn.Module, inputs: bool = False) -> list[torch.Tensor]:
    """Record a module's output (or first input) on every forward call."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, output):
        seen.append((args[0] if inputs else output).detach())

    module.register_forward_hook(hook)
    return seen


def final_norm(model) -> torch.nn.Module:
    return model.transformer.ln_f if model.config.model_type == "gpt2" else model.model.norm


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_uniform_indices_are_evenly_spaced_and_identity_when_nothing_is_cut():
    assert uniform_indices(9, 3).tolist() == [0, 3, 6]
    assert uniform_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert torch.equal(uniform_indices(7, 7), torch.arange(7))
    for n_teacher in range(1, 20):
        for n_student in range(1, n_teacher + 1):
            idx = uniform_indices(n_teacher, n_student)
            assert idx[0] == 0 and (idx.diff() > 0).all() and idx[-1] < n_teacher
            gaps = idx.diff()
            assert gaps.numel() == 0 or gaps.max() - gaps.min() <= 1
    with pytest.raises(ValueError):
        uniform_indices(3, 4)


@pytest.mark.parametrize(
    "teacher_heads, student_heads",
    [((9, 3), (3, 1)), ((9, 3), (3, 3)), ((8, 2), (4, 2)), ((8, 2), (2, 1)), ((4, 4), (2, 2)), ((12, 4), (6, 3))],
)
def test_gqa_selection_maps_every_query_head_onto_a_kept_kv_head(teacher_heads, student_heads):
    t = ModelShape(64, 2, *teacher_heads, head_dim=16, intermediate_size=32, vocab_size=10)
    s = ModelShape(32, 1, *student_heads, head_dim=8, intermediate_size=16, vocab_size=10)
    idx = block_indices(t, s, rotary=True)
    t_group, s_group = t.num_heads // t.num_kv_heads, s.num_heads // s.num_kv_heads
    assert len(idx.q_heads) == s.num_heads and len(set(idx.q_heads.tolist())) == s.num_heads
    assert len(idx.kv_heads) == s.num_kv_heads
    for i, q in enumerate(idx.q_heads.tolist()):
        # student query head i reads student KV head i // s_group, which is teacher KV head kv_heads[i // s_group]
        assert q // t_group == idx.kv_heads[i // s_group]
    # rotary pairs stay whole: student dims (j, j + l_S/2) are teacher dims (k, k + l_T/2)
    half = s.head_dim // 2
    assert torch.equal(idx.head_dims[half:], idx.head_dims[:half] + t.head_dim // 2)


@pytest.mark.parametrize(
    "kind, tied",
    [
        ("llama", False),
        ("llama", True),
        ("qwen2", False),
        ("qwen3", True),
        ("gpt2", True),
        ("gemma3", True),
        ("gemma3", False),
    ],
)
def test_weight_selection_with_nothing_cut_reproduces_the_teacher(kind, tied, tokens):
    teacher = tiny_teacher(kind, tie_word_embeddings=tied)
    student = build_student(teacher, shape_of(teacher), "weight-selection").student
    torch.testing.assert_close(logits(student, tokens), logits(teacher, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_guide_all_with_nothing_cut_rotates_the_residual_stream_and_keeps_untied_logits(kind, tokens):
    teacher = tiny_teacher(kind, tie_word_embeddings=False)
    result = build_student(teacher, shape_of(teacher), "guide-all")
    m = result.projection
    assert torch.allclose(m.T @ m, torch.eye(m.shape[0]), atol=1e-5)
    teacher_residual, student_residual = capture(final_norm(teacher), True), capture(final_norm(result.student), True)
    teacher_logits, student_logits = logits(teacher, tokens), logits(result.student, tokens)
    torch.testing.assert_close(student_residual[0], teacher_residual[0] @ m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student_logits, teacher_logits, rtol=1e-4, atol=1e-5)


def test_guide_all_tied_head_cannot_absorb_the_final_gain_but_satisfies_the_tied_identity(tokens):
    teacher = tiny_teacher("llama", tie_word_embeddings=True)
    result = build_student(teacher, shape_of(teacher), "guide-all")
    residual = capture(final_norm(teacher), True)
    student_logits = logits(result.student, tokens)
    logits(teacher, tokens)
    x = residual[0]
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + teacher.config.rms_norm_eps)  # gain 1
    # h E_T^T = (h M) E_S^T with E_S = E_T M
    torch.testing.assert_close(student_logits, normed @ teacher.model.embed_tokens.weight.T, rtol=1e-4, atol=1e-5)


def low_rank_teacher(kind: str, rank: int, write_in_subspace: bool):
    """A teacher whose embedding table has rank exactly `rank` (and optionally block-1 writes inside that subspace)."""
    teacher = tiny_teacher(kind, tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(5)
    d = teacher.config.hidden_size
    basis = torch.randn(rank, d, generator=generator)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.copy_(torch.randn(VOCAB, rank, generator=generator) @ basis)
        if write_in_subspace:
            projector = basis.T @ torch.linalg.solve(basis @ basis.T, basis)  # [d, d] onto the row space
            o_proj = teacher.model.layers[0].self_attn.o_proj
            o_proj.weight.copy_(projector @ o_proj.weight)
    return teacher


@pytest.mark.parametrize("kind", LLAMA_KINDS)
@pytest.mark.parametrize("sizes", [dict(num_heads=2, num_kv_heads=1), dict(num_heads=4, num_kv_heads=2, head_dim=4)])
def test_guide_block1_qkv_match_the_teacher_at_kept_heads_when_embeddings_have_rank_d_student(kind, sizes, tokens):
    teacher = low_rank_teacher(kind, rank=16, write_in_subspace=False)
    shape = student_shape(teacher, hidden_size=16, num_layers=2, intermediate_size=32, **sizes)
    student = build_student(teacher, shape, "guide").student
    idx = block_indices(shape_of(teacher), shape, rotary=True)
    t_attn, s_attn = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    for name, heads in [("q_proj", idx.q_heads), ("k_proj", idx.kv_heads), ("v_proj", idx.kv_heads)]:
        t_out, s_out = capture(getattr(t_attn, name)), capture(getattr(s_attn, name))
        logits(teacher, tokens), logits(student, tokens)
        t_heads = t_out[0].unflatten(-1, (-1, shape_of(teacher).head_dim))[:, :, heads][..., idx.head_dims]
        s_heads = s_out[0].unflatten(-1, (-1, shape.head_dim))
        torch.testing.assert_close(s_heads, t_heads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_guide_block1_mlp_preactivations_match_at_kept_units_when_all_heads_are_kept_and_writes_stay_in_span(
    kind, tokens
):
    # The MLP reads x + attn_out: that sum lies in span(M) only if every head is kept and W_o writes inside span(M).
    teacher = low_rank_teacher(kind, rank=16, write_in_subspace=True)
    shape = student_shape(teacher, hidden_size=16, num_layers=2, intermediate_size=24)
    student = build_student(teacher, shape, "guide").student
    units = uniform_indices(64, 24)
    for name in ["gate_proj", "up_proj"]:
        t_out = capture(getattr(teacher.model.layers[0].mlp, name))
        s_out = capture(getattr(student.model.layers[0].mlp, name))
        logits(teacher, tokens), logits(student, tokens)
        torch.testing.assert_close(s_out[0], t_out[0][..., units], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["uncentered", "centered"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_reconstruction_error_never_increases_with_width(mode, layer_norm):
    embed = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(3)).double() + 0.5
    target = embed - embed.mean(1, keepdim=True) if layer_norm else embed
    target = target - target.mean(0) if mode == "centered" else target
    errors = []
    for width in range(2 if layer_norm else 1, 33):
        m = pca_projection(embed, width, mode, layer_norm).matrix.double()
        errors.append(torch.linalg.norm(target - target @ m @ torch.linalg.pinv(m)).item())
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * errors[0]


@pytest.mark.parametrize("mode", ["uncentered", "centered"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_explained_variance_is_the_kept_share_of_the_visible_energy(mode, layer_norm):
    embed = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(4)) + 0.3
    visible = embed - embed.mean(1, keepdim=True) if layer_norm else embed
    shares = []
    for width in (4, 16, 32):
        projection = pca_projection(embed, width, mode, layer_norm)
        expected = (embed @ projection.matrix).square().sum() / visible.square().sum()
        assert projection.explained_variance == pytest.approx(expected.item(), rel=1e-4)
        shares.append(projection.explained_variance)
    assert shares[0] < shares[1] < shares[2] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_random_projection_is_a_seeded_orthonormal_basis_that_keeps_less_than_pca(layer_norm):
    embed = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3.0, 32) + 0.3
    width = 8
    a, b, c = (pca_projection(embed, width, "random", layer_norm, seed=s) for s in (1, 1, 2))
    m = a.matrix.double()
    gram = torch.eye(width, dtype=torch.float64) - (1.0 / width if layer_norm else 0.0)
    torch.testing.assert_close(m.T @ m, gram, rtol=0, atol=1e-6)
    if layer_norm:  # the student's stream stays zero-mean, as for the PCA basis
        torch.testing.assert_close(m.sum(dim=1), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(a.matrix, b.matrix) and not torch.allclose(a.matrix, c.matrix)
    assert a.explained_variance < pca_projection(embed, width, "uncentered", layer_norm).explained_variance


def anisotropic_table(seed: int) -> torch.Tensor:
    """A [VOCAB, 32] table whose directions carry very different energies, with a nonzero mean row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, 32, generator=generator) * torch.linspace(0.2, 2.0, 32) + 0.3


@pytest.mark.parametrize("layer_norm", [False, True])
def test_frequency_projection_with_equal_shares_is_the_uncentered_one(layer_norm):
    embed = anisotropic_table(6)
    equal = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    frequency = pca_projection(embed, 8, "frequency", layer_norm, frequencies=equal)
    uncentered = pca_projection(embed, 8, "uncentered", layer_norm)
    torch.testing.assert_close(frequency.matrix, uncentered.matrix, rtol=0, atol=1e-5)
    assert frequency.explained_variance == pytest.approx(uncentered.explained_variance, rel=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_frequency_projection_keeps_more_of_the_used_tokens_energy_and_less_of_the_table(layer_norm):
    embed, width = anisotropic_table(7), 8
    frequencies = torch.zeros(VOCAB, dtype=torch.float64)
    frequencies[[3, 10, 40, 41, 77]] = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    energy = explained_energy(embed, width, frequencies, layer_norm)
    assert list(energy) == list(PCA_MODES)
    frequency, uncentered = energy["frequency"], energy["uncentered"]
    assert frequency["used_tokens"] > uncentered["used_tokens"] + 0.05  # PCA's optimality under the weighting
    assert frequency["used_tokens"] > 0.999  # 5 used tokens span 5 of the 8 kept directions
    assert frequency["table"] < uncentered["table"]
    for mode, kept in energy.items():
        m = pca_projection(embed, width, mode, layer_norm, frequencies=frequencies).matrix
        rows = embed - embed.mean(1, keepdim=True) if layer_norm else embed  # the part the model sees
        expected = (frequencies.float() @ (embed @ m).square().sum(1)) / (frequencies.float() @ rows.square().sum(1))
        assert kept["used_tokens"] == pytest.approx(expected.item(), rel=1e-4), mode
        assert (
            kept["table"] == pca_projection(embed, width, mode, layer_norm, frequencies=frequencies).explained_variance
        )


def test_the_frequency_projection_needs_frequencies_of_every_token():
    with pytest.raises(ValueError, match="share of each of the 96 tokens"):
        pca_projection(anisotropic_table(8), 8, "frequency")
    with pytest.raises(ValueError, match="share of each of the 96 tokens"):
        pca_projection(anisotropic_table(8), 8, "frequency", frequencies=torch.ones(10))


def test_token_distribution_counts_the_training_blocks_only(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    held_out = next(p for p in sorted(corpus.iterdir()) if hash_fraction(p.name) < 0.2)  # a validation document
    held_out.write_text(held_out.read_text() + " w80" * 50)
    data = prepare_data([str(corpus)], tiny_tokenizer(), 16, val_fraction=0.2, cache=tmp_path / "cache")
    assert 80 in data.val and 80 not in data.train
    shares = token_distribution(data.train, VOCAB)
    assert shares[80] == 0 and shares.sum().item() == pytest.approx(1.0)
    expected = np.bincount(data.train.ravel(), minlength=VOCAB) / data.train.size
    np.testing.assert_array_equal(shares.numpy(), expected)


def test_token_ids_beyond_the_embedding_table_are_refused_in_one_line():
    blocks = np.array([[3, 4, 70], [5, 6, 7]], dtype=np.uint16)
    with pytest.raises(LmdistillError, match="token id 70, beyond the teacher's embedding table of 64 rows") as info:
        token_distribution(blocks, 64)
    assert "\n" not in str(info.value)
    assert token_distribution(blocks, 71)[70] == pytest.approx(1 / 6)  # a padded table is fine


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_student_embeddings_span_the_top_right_singular_subspace(kind):
    teacher = tiny_teacher(kind)
    width = 16
    shape = student_shape(teacher, hidden_size=width, num_heads=2 if kind == "gpt2" else 4)
    student = build_student(teacher, shape, "guide").student
    e_t = adapter_for(teacher.config).read(teacher).embed.double()
    e_s = adapter_for(student.config).read(student).embed.double()
    rank = width
    if kind == "gpt2":  # LayerNorm: the all-ones direction is invisible and dropped; the rest of E C is kept
        e_t, rank = e_t - e_t.mean(dim=1, keepdim=True), width - 1
    _, _, vh = torch.linalg.svd(e_t, full_matrices=False)
    projector = vh[:rank].T @ vh[:rank]  # sign-invariant
    torch.testing.assert_close(e_s @ e_s.T, e_t @ projector @ e_t.T, rtol=1e-5, atol=1e-5)


def test_guide_leaves_blocks_after_the_first_as_the_seeded_random_init():
    teacher = tiny_teacher("llama")
    shape = student_shape(teacher, hidden_size=16, num_heads=2, num_kv_heads=1)
    guided = build_student(teacher, shape, "guide", seed=7).student
    random = build_student(teacher, shape, "random", seed=7).student
    for (name, g), (_, r) in zip(guided.named_parameters(), random.named_parameters()):
        transferred = "embed" in name or "lm_head" in name or (".layers.0." in name and "layernorm" not in name)
        assert torch.equal(g, r) != transferred, name


def test_same_seed_same_student_and_different_seed_different_random_blocks():
    teacher = tiny_teacher("llama")
    shape = student_shape(teacher, hidden_size=16, num_heads=2, num_kv_heads=1)
    a, b, c = (build_student(teacher, shape, "guide", seed=s).student for s in (1, 1, 2))
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.model.layers[1].mlp.up_proj.weight, c.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2", "gemma3"])
@pytest.mark.parametrize("method", ["guide", "guide-all", "weight-selection", "random"])
def test_saved_student_reloads_with_identical_logits(kind, method, tmp_path, tokens):
    teacher = tiny_teacher(kind)
    sizes = dict(hidden_size=16, num_layers=2, intermediate_size=24)
    sizes.update(num_heads=2) if kind == "gpt2" else sizes.update(num_heads=2, num_kv_heads=1)
    student = build_student(teacher, student_shape(teacher, **sizes), method).student
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, tokens), logits(student, tokens))
    assert reloaded.num_parameters() == student.num_parameters()


def test_gpt2_guide_all_with_nothing_cut_keeps_the_centered_residual_stream(tokens):
    # LayerNorm ignores the residual's component along the all-ones vector; the projection drops it and keeps the
    # student's stream zero-mean, so LayerNorm folds exactly (see `pca_projection`).
    teacher = tiny_teacher("gpt2")
    result = build_student(teacher, shape_of(teacher), "guide-all")
    m = result.projection
    t_res, s_res = capture(final_norm(teacher), True), capture(final_norm(result.student), True)
    student_logits = logits(result.student, tokens)
    logits(teacher, tokens)
    torch.testing.assert_close(s_res[0], t_res[0] @ m, rtol=1e-4, atol=1e-5)
    assert s_res[0].mean(-1).abs().max() < 1e-5
    normed = torch.nn.functional.layer_norm(t_res[0], (m.shape[0],), eps=teacher.config.layer_norm_epsilon)
    torch.testing.assert_close(student_logits, normed @ teacher.transformer.wte.weight.T, rtol=1e-4, atol=1e-4)
