"""`--teacher-dtype`: the teacher in fp32, bf16 or int8 (dynamically quantized linear layers), and what auto picks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_teacher
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from lmdistill import precision as precision_module
from lmdistill.errors import LmdistillError
from lmdistill.models.teacher_dtype import TokenScaledInt8, head_weight, resolve_teacher_dtype, to_teacher_dtype

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
IDS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))


def kl_and_agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || logits) per position (float32 softmax) and the share of equal top-1 tokens."""
    log_p, log_q = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return kl, (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("kind, tied", [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", True)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@torch.no_grad()
def test_each_teacher_dtype_runs_close_to_fp32(kind, tied, dtype):
    model = tiny_teacher(kind, **({"tie_word_embeddings": tied} if kind != "gpt2" else {}))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    embedding = model.get_input_embeddings().weight.detach().clone()
    reference = model(IDS).logits
    assert to_teacher_dtype(model, dtype, CPU) == (dtype, f"set to {dtype}")
    logits = model(IDS).logits
    kl, agreement = kl_and_agreement(reference, logits)
    assert torch.isfinite(logits).all() and kl < 2e-3 and agreement > 0.9, (kl, agreement)
    assert head_weight(model).shape == (VOCAB, 32)
    if dtype == "fp32":
        torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    if dtype == "bf16":
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if dtype == "int8":  # every linear layer quantized, the head included; the embedding float and unchanged
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert isinstance(model.get_output_embeddings(), TokenScaledInt8)
        layers = sum(isinstance(m, TokenScaledInt8) for m in model.modules())
        assert layers == 1 + 3 * (4 if kind == "gpt2" else 7)  # head + per block: q, k, v, o, mlp (gpt2: fused)
        torch.testing.assert_close(model.get_input_embeddings().weight, embedding, rtol=0, atol=0)
        dequantized = model.get_output_embeddings().weight().dequantize()
        torch.testing.assert_close(head_weight(model), dequantized, rtol=0, atol=0)


@torch.no_grad()
def test_an_int8_layer_gives_each_token_its_own_scale_so_one_large_token_costs_the_others_nothing():
    linear = nn.Linear(64, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation
        per_tensor = quantize_dynamic(nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig}, torch.qint8)[0]
        per_token = TokenScaledInt8(copy.deepcopy(per_tensor))
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] *= 1000  # one token with large activations, as LMs' first positions have
    exact = linear(x)

    def error(layer: nn.Module) -> torch.Tensor:  # [2, 16]: the relative error per token
        return (layer(x) - exact).norm(dim=-1) / exact.norm(dim=-1)

    assert error(per_tensor)[1].min() > 0.3  # one scale for all: the small tokens get a handful of levels
    assert error(per_token).max() < 0.02
    torch.testing.assert_close(per_token.weight(), per_tensor.weight(), rtol=0, atol=0)


@torch.no_grad()
def test_an_int8_teacher_runs_under_a_callers_bf16_autocast():  # as TRL's trainer calls its teacher with bf16=True
    model = tiny_teacher("llama")
    to_teacher_dtype(model, "int8", CPU)
    reference = model(IDS).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(IDS).logits
    kl, agreement = kl_and_agreement(reference, logits)
    assert kl < 2e-3 and agreement > 0.9, (kl, agreement)


@pytest.mark.parametrize(
    "fast, expected",
    [(True, ("bf16", "auto: CPU with AVX512-BF16/AMX")),
     (False, ("fp32", "auto: CPU without AVX512-BF16/AMX, bf16 would be emulated"))],
)  # fmt: skip
def test_auto_picks_bf16_where_it_is_fast_else_fp32_never_int8(monkeypatch, fast, expected):
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device, cpuinfo=None: fast)
    assert resolve_teacher_dtype(CPU, "auto") == expected
    assert resolve_teacher_dtype(CPU, "int8") == ("int8", "set to int8")
    model = tiny_teacher("llama")
    assert to_teacher_dtype(model, "auto", CPU) == expected
    assert next(model.parameters()).dtype == (torch.bfloat16 if fast else torch.float32)


def test_int8_is_refused_on_cuda_in_one_line_before_anything_moves():
    model = tiny_teacher("llama")
    with pytest.raises(LmdistillError, match=r"^--teacher-dtype int8 runs on the CPU only .*pass --teacher-dtype bf16"):
        to_teacher_dtype(model, "int8", torch.device("cuda"))
    assert isinstance(model.lm_head, nn.Linear) and next(model.parameters()).device == CPU
