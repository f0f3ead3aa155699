"""The teacher's dtype (`--teacher-dtype`): fp32; bf16 weights and compute; or int8, its linear layers (the output
head included) dynamically quantized for CPU inference, with one activation scale per token.

int8 uses `torch.ao.quantization.quantize_dynamic`. torch 2.13 marks it deprecated in favour of torchao, but torchao's
equivalent (`quantize_` with `Int8DynamicActivationInt8WeightConfig`, torchao 0.18) ran a 576 x 1536 linear layer on
this CPU 30x slower than fp32 in eager mode, while `quantize_dynamic`'s x86 kernels ran it 1.6x faster than fp32; so
the one torch ships is used, and its deprecation warnings are silenced here.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lmdistill.errors import LmdistillError
from lmdistill.precision import resolve_precision

TeacherDtype = Literal["auto", "fp32", "bf16", "int8"]


def resolve_teacher_dtype(device: torch.device, setting: str) -> tuple[str, str]:
    """The dtype a `--teacher-dtype` setting runs the teacher in on `device`, and why.

    "auto" is bf16 where bf16 products are fast, else fp32 (`lmdistill.precision.resolve_precision`); int8 is never
    chosen by itself, since it changes the teacher's numbers.
    """
    return resolve_precision(device, setting)


def to_teacher_dtype(model: PreTrainedModel, setting: str, device: torch.device) -> tuple[str, str]:
    """Move a loaded teacher to `device` in the dtype `setting` resolves to (see `resolve_teacher_dtype`), in place.

    bf16: every weight in bf16, so that the forward pass computes in bf16. int8: every linear layer (`nn.Linear`, and
    GPT-2's `Conv1D` as the `nn.Linear` it is), the output head included, replaced by its dynamically quantized int8
    version with one activation scale per token (`TokenScaledInt8`); a head tied to the input embeddings is first untied
    into a copy, so that the embedding stays float.

    Returns:
        The resolved dtype ("fp32", "bf16" or "int8") and why.

    Raises:
        LmdistillError: int8 on a device other than the CPU.
    """
    dtype, reason = resolve_teacher_dtype(device, setting)
    if dtype == "int8" and device.type != "cpu":
        raise LmdistillError(
            f"--teacher-dtype int8 runs on the CPU only (dynamic quantization has no {device.type} kernels): pass "
            "--teacher-dtype bf16 there"
        )
    model.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if dtype == "int8":
        _quantize_int8(model)
    return dtype, reason


def _quantize_int8(model: PreTrainedModel) -> None:
    for name, module in list(model.named_modules()):  # GPT-2's Conv1D layers are linear layers stored transposed
        if isinstance(module, Conv1D):
            linear = nn.Linear(*module.weight.shape)
            linear.load_state_dict({"weight": module.weight.T, "bias": module.bias})
            model.set_submodule(name, linear.requires_grad_(False))
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:  # tied: quantize a copy, the embedding stays float
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        untied.load_state_dict(head.state_dict())
        model.set_output_embeddings(untied.requires_grad_(False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # weights per output channel (one scale per row); activations per tensor, made per token by TokenScaledInt8
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    for name, module in list(model.named_modules()):
        if isinstance(module, dynamic):
            model.set_submodule(name, TokenScaledInt8(module))


class TokenScaledInt8(nn.Module):
    """A dynamically quantized int8 linear layer whose input is quantized with one scale per token.

    `quantize_dynamic`'s layers quantize their whole input with one scale, so a few tokens with large activations
    leave the others a handful of levels. Dividing each token's row by its largest |x| before the layer and
    multiplying the product back (the layer is linear per row; its bias is added after) gives every token its own
    scale, at the cost of two elementwise products: on SmolLM2-135M (`benchmarks/bench_teacher.py`) the mean
    KL(fp32 || int8) fell from 1.54 to 0.16 nats/token.
    """

    def __init__(self, quantized: nn.Module) -> None:
        super().__init__()
        bias = quantized.bias()
        quantized.set_weight_bias(quantized.weight(), None)
        self.quantized = quantized
        self.register_buffer("bias", bias)

    def weight(self) -> torch.Tensor:
        """The int8 weight ``[out, in]`` (a quantized tensor, one scale per row)."""
        return self.quantized.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # the int8 kernels take float32 only; under a caller's bf16 autocast (TRL's) x is bf16
        scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)  # [..., 1]: one per token
        out = self.quantized(x / scale).mul_(scale)  # the layer's output is a fresh tensor: scaled in place
        return out if self.bias is None else out.add_(self.bias)


def head_weight(model: PreTrainedModel) -> torch.Tensor:
    """A causal LM's output head weight ``[V, d]``: the parameter itself, or an int8 head's dequantized weights."""
    weight = model.get_output_embeddings().weight
    return weight if isinstance(weight, torch.Tensor) else weight().dequantize()
