"""Held-out evaluation: cross-entropy per token, perplexity, and the share of the teacher-student gap closed."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from lmdistill.data.packed import check_same_vocabulary, prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.losses import chunked_distill_loss
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.provenance import environment
from lmdistill.train.distributed import Processes, all_reduce_sum


def token_blocks(token_ids: list[int] | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks, dropping the partial tail.

    Args:
        token_ids: the stream [N].
        seq_len: block length L.

    Returns:
        int64 [N // L, L].
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < seq_len:
        raise ValueError(f"need at least {seq_len} tokens, got {ids.numel()}")
    return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)


def fast_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether bf16 matrix products are fast here: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX.

    Without those instructions (AVX2-only CPUs) PyTorch emulates bf16 products, measured 10-100x slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device, precision: str) -> tuple[str, str]:
    """The precision a setting ("auto", "bf16" or "fp32") runs in on `device`, "bf16" or "fp32", and why.

    "auto" is bf16 where bf16 products are fast (see `fast_bf16`), else fp32. Runs record both in environment.json:
    results differ between machines with and without native bf16.
    """
    if precision != "auto":
        return precision, f"set to {precision}"
    fast = fast_bf16(device)
    if device.type == "cuda":
        return ("bf16", "auto: CUDA GPU with bf16") if fast else ("fp32", "auto: CUDA GPU without bf16")
    if fast:
        return "bf16", "auto: CPU with AVX512-BF16/AMX"
    return "fp32", "auto: CPU without AVX512-BF16/AMX, bf16 would be emulated"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where the setting `precision` resolves to bf16 (see `resolve_precision`), else nothing."""
    if resolve_precision(device, precision)[0] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of a batch of blocks: position t predicts token t + 1; the last position is ignored.

    Args:
        ids: int64 [B, L].

    Returns:
        int64 [B, L] with -100 in the last column.
    """
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


class LMLoss(nn.Module):
    """A causal LM whose forward ends in `chunked_distill_loss` on its final hidden states and output head.

    Whatever wraps it (DDP, FSDP) thus wraps every use of the parameters: under FSDP the output head is whole only
    inside this forward.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, **loss_options: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, ce, kd) of `chunked_distill_loss` for ids [B, L] and labels [B, L], given its keyword options."""
        hidden = self.lm.base_model(input_ids=input_ids).last_hidden_state  # [B, L, d]
        return chunked_distill_loss(hidden, self.lm.get_output_embeddings().weight, labels, **loss_options)


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel | LMLoss,
    blocks: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    chunk_size: int = 256,
    processes: Processes | None = None,
) -> float:
    """Mean cross-entropy (nats per predicted token) of a causal LM on held-out blocks.

    Each block predicts its tokens 2..L from the ones before. Softmax in float32, computed in chunks so the full
    [B, L, V] logits are never materialized. Under `torchrun` each process takes every world-th batch and the sums
    are reduced, so every process returns the same number. Every process runs the same number of forward passes
    (those of an FSDP-sharded model are collective): one past the last batch repeats it and is not counted.

    Args:
        model: a causal LM (a Hugging Face `PreTrainedModel`), or an `LMLoss` around one, possibly FSDP-sharded.
        blocks: token ids [N, L].
        batch_size: blocks per forward pass.
        precision: "fp32", "bf16" or "auto" (autocast of the forward pass, see `autocast`).
        chunk_size: positions per chunk of the loss.
        processes: the process group (None: alone, on the model's device).

    Returns:
        Cross-entropy per predicted token; its exponential is the perplexity.
    """
    lm_loss = model if isinstance(model, LMLoss) else LMLoss(model)
    device = processes.device if processes else next(model.parameters()).device
    rank, world = (processes.rank, processes.world) if processes else (0, 1)
    starts = range(0, len(blocks), batch_size)
    was_training = lm_loss.training
    lm_loss.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count]
    for batch in range(rank, math.ceil(len(starts) / world) * world, world):
        start = starts[min(batch, len(starts) - 1)]
        ids = torch.as_tensor(np.asarray(blocks[start : start + batch_size]), dtype=torch.long, device=device)
        labels = shifted_labels(ids)
        with autocast(device, precision):
            loss, _, _ = lm_loss(ids, labels, chunk_size=chunk_size)
        if batch < len(starts):
            count = int((labels != -100).sum())
            total += torch.tensor([loss.item() * count, count], dtype=torch.float64, device=device)
    all_reduce_sum(total)
    lm_loss.train(was_training)
    return (total[0] / total[1]).item()


def perplexity(loss: float) -> float:
    """Perplexity from a cross-entropy in nats per token."""
    return math.exp(loss)


GAP_UNDEFINED = "undefined: the teacher is not better than the baseline"


def gap_closed(base: float, method: float, teacher: float) -> float:
    """Share of the teacher-student gap a method closes: (base - method) / (base - teacher).

    Works for losses and for perplexities alike. 0 means no better than the baseline, 1 means as good as the
    teacher, negative means worse than the baseline.

    Args:
        base: the baseline student's value (random init, same data and budget).
        method: the evaluated student's value.
        teacher: the teacher's value.

    Returns:
        The share (a fraction, not a percentage); NaN (undefined) unless the teacher is better than the baseline
        (base > teacher): otherwise the ratio would turn a method worse than the baseline into a positive share.
    """
    gap = base - teacher
    return (base - method) / gap if gap > 0 else float("nan")


def gap_closed_forms(
    base: dict[str, float], method: dict[str, float], teacher: dict[str, float]
) -> dict[str, float | None]:
    """`gap_closed` in the loss and the perplexity form of results holding ``val_loss`` and ``val_ppl``.

    Returns:
        ``gap_closed_loss`` and ``gap_closed_ppl``, each None (JSON null) where undefined (see `GAP_UNDEFINED`).
    """
    shares: dict[str, float | None] = {}
    for form in ("loss", "ppl"):
        share = gap_closed(base[f"val_{form}"], method[f"val_{form}"], teacher[f"val_{form}"])
        shares[f"gap_closed_{form}"] = None if math.isnan(share) else share
    return shares


def run_eval(config: Any) -> dict[str, Any]:
    """`lmdistill eval`: held-out loss and perplexity of a model, its teacher and a baseline, and the gap closed.

    Args:
        config: an `EvalConfig`.

    Returns:
        The results, also written to `config.out` (default `MODEL/eval.json`).
    """
    model, tokenizer, _ = load_hf_directory(Path(config.model), torch.float32)
    data = prepare_data(config.data, tokenizer, config.seq_len, val_fraction=config.val_fraction)
    blocks = data.val if config.eval_tokens is None else data.val[: max(1, config.eval_tokens // config.seq_len)]
    precision = resolve_precision(next(model.parameters()).device, config.precision)

    def measure(lm: PreTrainedModel, role: str, name: str) -> dict[str, float]:
        loss = heldout_loss(lm, blocks, batch_size=config.batch_size, precision=config.precision)
        if not math.isfinite(loss):
            raise LmdistillError(
                f"the {role} {name} has a non-finite held-out loss ({loss}) in {precision[0]}: its weights or its "
                "forward pass give NaN or inf"
            )
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    results: dict[str, Any] = {"model": {"path": config.model, **measure(model, "--model", config.model)}}
    if config.teacher is not None:
        teacher = load_teacher(config.teacher)
        check_same_vocabulary(model, tokenizer, teacher.model, teacher.tokenizer)
        results["teacher"] = {"name": teacher.name, **measure(teacher.model, "--teacher", teacher.name)}
    if config.baseline is not None:
        baseline, baseline_tokenizer, _ = load_hf_directory(Path(config.baseline), torch.float32)
        check_same_vocabulary(model, tokenizer, baseline, baseline_tokenizer)
        results["baseline"] = {"path": config.baseline, **measure(baseline, "--baseline", config.baseline)}
    if "teacher" in results and "baseline" in results:
        results.update(gap_closed_forms(results["baseline"], results["model"], results["teacher"]))
    results["data"] = {"fingerprint": data.fingerprint, "tokens": int(blocks.size), "seq_len": config.seq_len}
    results["config"] = vars(config)
    results["environment"] = environment(precision)
    out = Path(config.out) if config.out else Path(config.model) / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    results["written_to"] = str(out)
    return results
