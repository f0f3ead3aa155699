"""Training throughput and memory: CE only, KD with the online teacher, KD from the teacher cache, and TRL.

The same student (GUIDE-initialized from the default teacher), data, batch and sequence length in every mode; the
alternative a user would pick is the same forward-KL distillation through TRL's GKD trainer (`pip install trl`,
off-policy: lmbda 0, beta 0), which computes full [B, T, V] logits for student and teacher. Each
mode runs in a fresh process so that its peak resident memory is its own; each does `--warmup` steps, then times
`--steps` optimizer steps. The teacher cache is built first on the same data (its time is reported separately).

Run: `.venv/bin/python benchmarks/bench_train.py` (the last printed line is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmdistill.data.packed import PackedData, prepare_data
from lmdistill.evaluate import autocast, shifted_labels
from lmdistill.losses import chunked_distill_loss
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.teacher_cache import TeacherCache, write_cache

MODES = ("ce", "kd_online", "kd_cached", "trl_kd")


def timed_blocks(data: PackedData, args: argparse.Namespace) -> PackedData:
    """The packed data cut to the training blocks the warm-up and timed steps read (all the cache needs)."""
    n_blocks = (args.warmup + args.steps) * args.batch_size
    return PackedData(data.train[:n_blocks], data.val, data.manifest, data.directory)


def measure_trl(args: argparse.Namespace) -> dict:
    """The same forward-KL distillation through TRL's GKD trainer (off-policy: lmbda 0; beta 0 is forward KL)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, tokenizer, _ = load_hf_directory(Path(args.student), torch.float32)
    data = timed_blocks(prepare_data(args.data, tokenizer, args.seq_len, progress=False), args)
    teacher = load_teacher(args.teacher).model
    blocks = Dataset.from_dict({"input_ids": data.train.astype(np.int64).tolist()})

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class StepClock(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, *_args, **_kwargs):
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=1e-4, lmbda=0.0, beta=0.0, seq_kd=False, use_cpu=True, bf16=False, report_to=[],
            save_strategy="no", logging_strategy="no", dataloader_drop_last=True, max_length=args.seq_len,
            disable_tqdm=True, gradient_checkpointing=False,  # as our loop: no recomputation, the faster setting
        )  # fmt: skip
        clock = StepClock()
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=blocks,
                             processing_class=tokenizer, data_collator=collate, callbacks=[clock])  # fmt: skip
        trainer.train()
    seconds = clock.times[-1] - clock.times[args.warmup - 1]
    return {
        "mode": args.mode,
        "tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps of one mode in this process."""
    if args.mode == "trl_kd":
        return measure_trl(args)
    student, tokenizer, _ = load_hf_directory(Path(args.student), torch.float32)
    student.train()
    data = timed_blocks(prepare_data(args.data, tokenizer, args.seq_len, progress=False), args)
    teacher = load_teacher(args.teacher).model if args.mode == "kd_online" else None
    cache = TeacherCache.open(Path(args.cache), data) if args.mode == "kd_cached" else None
    head = student.get_output_embeddings().weight
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    device = torch.device("cpu")
    num_items = args.batch_size * (args.seq_len - 1)

    def step(i: int) -> None:
        blocks = np.arange(i * args.batch_size, (i + 1) * args.batch_size)
        ids = torch.as_tensor(data.train[blocks].astype(np.int64))
        extra = {}
        with autocast(device, args.precision):
            if teacher is not None:
                with torch.no_grad():
                    extra["teacher_hidden"] = teacher.base_model(input_ids=ids).last_hidden_state
                extra["teacher_head"] = teacher.get_output_embeddings().weight
            if cache is not None:
                extra["teacher_ids"], extra["teacher_logprobs"] = cache.lookup(blocks)
            hidden = student.base_model(input_ids=ids).last_hidden_state
            total, _, _ = chunked_distill_loss(
                hidden, head, shifted_labels(ids), kd_weight=0.0 if args.mode == "ce" else 1.0,
                num_items=num_items, chunk_size=args.chunk_size, **extra,
            )  # fmt: skip
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    seconds = time.perf_counter() - start
    return {
        "mode": args.mode,
        "tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/student-guide", help="student directory (lmdistill init)")
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--data", nargs="+", default=None, help="text sources (default: the built-in corpus)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk of the loss")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child process: one mode
        print(json.dumps(measure(args)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        # Cache only the blocks the timed steps read, on the same data.
        teacher = load_teacher(args.teacher)
        data = timed_blocks(prepare_data(args.data, teacher.tokenizer, args.seq_len, progress=False), args)
        start = time.perf_counter()
        write_cache(teacher.model, teacher.name, teacher.tokenizer, data, Path(scratch), top_k=args.top_k,
                    precision=args.precision, progress=False)  # fmt: skip
        cache_s = time.perf_counter() - start
        del teacher

        results = {}
        for mode in MODES:
            command = [sys.executable, __file__, "--mode", mode, "--cache", scratch, "--student", args.student,
                       "--teacher", args.teacher, "--batch-size", str(args.batch_size), "--seq-len",
                       str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--precision", args.precision, "--chunk-size", str(args.chunk_size)]  # fmt: skip
            if args.data:
                command += ["--data", *args.data]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{mode:10s} {results[mode]['tokens_per_s']:8.0f} tokens/s  "
                f"{results[mode]['seconds_per_step']:6.2f} s/step  peak RSS {results[mode]['peak_rss_mb']:7.0f} MB"
            )

    ce, online, cached, trl = (results[m] for m in MODES)
    print(f"teacher cache of {len(data.train)} blocks (top-{args.top_k}) built in {cache_s:.1f} s")
    print(json.dumps({
        "ce_tokens_per_s": ce["tokens_per_s"],
        "kd_online_tokens_per_s": online["tokens_per_s"],
        "kd_cached_tokens_per_s": cached["tokens_per_s"],
        "ce_peak_rss_mb": ce["peak_rss_mb"],
        "kd_peak_rss_mb": online["peak_rss_mb"],
        "kd_cached_peak_rss_mb": cached["peak_rss_mb"],
        "cached_step_ratio": ce["tokens_per_s"] / cached["tokens_per_s"],
        "kd_memory_ratio": online["peak_rss_mb"] / ce["peak_rss_mb"],
        "cache_build_s": cache_s,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "precision": args.precision,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "trl_kd_tokens_per_s": trl["tokens_per_s"],
        "trl_kd_peak_rss_mb": trl["peak_rss_mb"],
        "speedup_vs_trl": online["tokens_per_s"] / trl["tokens_per_s"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
