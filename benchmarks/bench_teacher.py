"""The teacher in each `--teacher-dtype`: its speed, its weight memory, and its error against the fp32 teacher.

Loads the teacher once (`load_teacher`), makes a bf16 and an int8 copy with `to_teacher_dtype` (what `train`,
`cache-teacher`, `eval` and `rationales extract` run), and runs every dtype's forward pass over the same held-out
blocks of the data (default: the built-in corpus's, `prepare_data(...).val`, spread over the split), batch by batch, the
dtypes in turn within each batch so that they share the machine's load, `--repeats` times. Per dtype: tokens/s of the
forward pass (logits included), weight memory (the bytes of its weights: float parameters and buffers, int8 layers'
int8 weights; a tied weight once), the mean KL(fp32 teacher || this teacher) per predicted token (float32 softmax), the
share of positions where the two agree on the most probable token, and the held-out loss (nats per predicted token).
bf16 is measured by default only where it is native (`fast_bf16`: elsewhere it is emulated, 7x slower than fp32 on
an AVX2 CPU); pass `--dtypes fp32 bf16 int8` to measure it anyway.

Run: `.venv/bin/python benchmarks/bench_teacher.py [--tokens 16384]` (the last printed line is one JSON object).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch import nn

from lmdistill.data.packed import prepare_data
from lmdistill.evaluation import spread_blocks
from lmdistill.models.load import load_teacher
from lmdistill.models.teacher_dtype import to_teacher_dtype
from lmdistill.precision import cpu_description, fast_bf16

DTYPES = ("fp32", "bf16", "int8")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: its state dict's tensors (int8 layers' packed weights as int8), each storage once."""
    seen, total = set(), 0

    def add(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset()) if not value.is_quantized else id(value)
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)

    for value in model.state_dict().values():
        add(value)
    return total


def compare(reference: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sums over the predicted positions of a batch: [KL(reference || logits), top-1 agreements, cross-entropy]."""
    log_p = reference[:, :-1].float().log_softmax(-1)  # [B, L - 1, V]: position t predicts token t + 1
    log_q = logits[:, :-1].float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).sum()
    ce = -log_q.gather(-1, ids[:, 1:, None]).sum()
    return torch.stack([kl, agree.double(), ce]).double()


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    """Every dtype of `args.dtypes` over the same held-out blocks; the results per dtype."""
    teacher = load_teacher(args.teacher)
    data = prepare_data(args.data, teacher.tokenizer, args.seq_len, progress=False)
    blocks = spread_blocks(data.val, args.tokens)
    cpu = torch.device("cpu")
    models = {dtype: teacher.model if dtype == "fp32" else copy.deepcopy(teacher.model) for dtype in args.dtypes}
    for dtype, model in models.items():
        to_teacher_dtype(model, dtype, cpu)
    seconds = dict.fromkeys(args.dtypes, 0.0)
    sums = {dtype: torch.zeros(3, dtype=torch.float64) for dtype in args.dtypes}
    for repeat in range(args.repeats):
        for start in range(0, len(blocks), args.batch_size):
            ids = torch.as_tensor(blocks[start : start + args.batch_size].astype(np.int64))
            logits = {}
            for dtype in args.dtypes:
                began = time.perf_counter()
                logits[dtype] = models[dtype](input_ids=ids).logits
                seconds[dtype] += time.perf_counter() - began
            if repeat == 0:  # the numbers are the same in every repeat
                for dtype in args.dtypes:
                    sums[dtype] += compare(logits["fp32"], logits[dtype], ids)
    positions = blocks.shape[0] * (blocks.shape[1] - 1)
    return {
        dtype: {
            "tokens_per_s": args.repeats * blocks.size / seconds[dtype],
            "weight_mb": weight_bytes(models[dtype]) / 2**20,
            "teacher_kl": sums[dtype][0].item() / positions,
            "top1_agreement": sums[dtype][1].item() / positions,
            "val_loss": sums[dtype][2].item() / positions,
        }
        for dtype in args.dtypes
    } | {"tokens": int(blocks.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--data", nargs="+", default=None, help="text sources (default: the built-in corpus)")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens (spread over the split)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the blocks for the timing")
    native = fast_bf16(torch.device("cpu"))
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES if native else ("fp32", "int8")),
        help="dtypes to measure (default: fp32, int8, and bf16 where it is native)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tokens < args.seq_len or args.repeats < 1 or args.batch_size < 1:
        parser.error("--tokens must be at least --seq-len, --repeats and --batch-size at least 1")
    args.dtypes = ["fp32", *(d for d in DTYPES if d in args.dtypes and d != "fp32")]  # fp32 is the reference
    results = measure(args)
    for dtype in args.dtypes:
        r = results[dtype]
        print(
            f"{dtype:5s} {r['tokens_per_s']:8.0f} tokens/s  weights {r['weight_mb']:7.1f} MB  KL(fp32||{dtype}) "
            f"{r['teacher_kl']:.5f} nats/token  top-1 agreement {r['top1_agreement']:.4f}  loss {r['val_loss']:.4f}"
        )
    print(json.dumps({
        "teacher": args.teacher, "tokens": results.pop("tokens"), "seq_len": args.seq_len,
        "batch_size": args.batch_size, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "cpu": cpu_description(), "bf16_native": native, "dtypes": results,
        "teacher_kl": {dtype: r["teacher_kl"] for dtype, r in results.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
