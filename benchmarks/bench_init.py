"""Initialization benchmark on the default teacher (SmolLM2-135M-Instruct).

For each method: seconds to build the student (best of `--repeats`, teacher already loaded), explained variance of
the GUIDE projection, and held-out cross-entropy at step 0 on the built-in sample. Step-0 loss is reported as
measured, not tuned for: a cut-down student assembled from teacher fragments is usually no better than random at
step 0; GUIDE's benefit shows during training (see `lmdistill study`).

Run: `.venv/bin/python benchmarks/bench_init.py` (the last printed line is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmdistill.data import builtin_sample_text
from lmdistill.evaluation import heldout_loss, token_blocks
from lmdistill.init.build import INIT_METHODS, build_student
from lmdistill.models.adapters import adapter_for
from lmdistill.models.load import load_teacher
from lmdistill.models.shape import derive_student_shape
from lmdistill.provenance import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--hidden-size", type=int, default=288)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=3)
    parser.add_argument("--num-kv-heads", type=int, default=1)
    parser.add_argument("--intermediate-size", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    teacher = load_teacher(args.teacher)
    load_s = time.perf_counter() - start
    adapter = adapter_for(teacher.model.config)
    shape = derive_student_shape(
        adapter.shape(teacher.model.config),
        adapter,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
    )
    sample = token_blocks(teacher.tokenizer(builtin_sample_text())["input_ids"], 128)

    init_s, step0, variance = {}, {}, None
    for method in INIT_METHODS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = build_student(teacher.model, shape, method)
            times.append(time.perf_counter() - start)
        init_s[method] = min(times)
        step0[method] = heldout_loss(result.student, sample)
        if method == "guide":
            variance = result.explained_variance
    teacher_loss = heldout_loss(teacher.model, sample)

    print(
        f"teacher {teacher.name}: loaded in {load_s:.2f} s, step-0 loss {teacher_loss:.3f} on {sample.numel()} tokens"
    )
    print(f"student {shape}, {result.student.num_parameters() / 1e6:.1f}M parameters")
    print(f"{'method':18s} {'init s':>8s} {'step-0 loss':>12s}")
    for method in INIT_METHODS:
        print(f"{method:18s} {init_s[method]:8.2f} {step0[method]:12.3f}")
    print(f"GUIDE explained variance {variance:.4f}")
    env = environment()
    print(
        json.dumps(
            {
                "guide_init_s": init_s["guide"],
                "explained_variance": variance,
                "step0_loss": step0,
                "init_s": init_s,
                "teacher_loss": teacher_loss,
                "teacher_load_s": load_s,
                "heldout_tokens": sample.numel(),
                "student_parameters": result.student.num_parameters(),
                "threads": torch.get_num_threads(),
                "torch": env["torch"],
                "git": env["git"],
            }
        )
    )


if __name__ == "__main__":
    main()
