"""Training throughput and memory: CE only, KD with the online teacher, KD from the teacher cache, and TRL.

Our three modes are `lmdistill train` itself (`run_train`, timed step by step through its `on_step` hook), so the
numbers include everything a user's run does per step: data, loss, backward, clipping, AdamW, schedule. The same
student (GUIDE-initialized from the default teacher), data, blocks in the same order, batch and sequence length in
every mode; the alternative a user would pick is the same forward-KL distillation through TRL's GKD trainer
(`pip install -e ".[bench]"`, off-policy: lmbda 0, beta 0), which computes full [B, T, V] logits for student and
teacher. Each mode runs in a fresh process so that its peak resident memory (VmHWM) is its own; each does `--warmup`
steps, then times `--steps` optimizer steps. The teacher cache is built first with `lmdistill cache-teacher`'s code
on exactly the blocks the runs read (its time is reported separately).

Both sides at the same compute precision: TRL gets `bf16=True` exactly where our `--precision` resolves to bf16.
With `--teacher-dtype D ...` the online modes (ours and TRL's, which takes any teacher module) run once per teacher
dtype, the teacher made by `to_teacher_dtype` as `lmdistill train` makes it, and each dtype's error, the mean
KL(fp32 teacher || this teacher) per token over `--kl-tokens` held-out tokens (`bench_teacher.py`'s measurement),
is reported beside its speed: the JSON's `by_teacher_dtype` holds `speedup_vs_trl`, `kd_memory_ratio` and
`teacher_kl` per dtype; its top-level keys are those of the first dtype.

Run: `.venv/bin/python benchmarks/bench_train.py` (the last printed line is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_teacher import measure as measure_teacher

from lmdistill.commands.cache_teacher import run_cache_teacher
from lmdistill.config import CacheTeacherConfig, TrainConfig
from lmdistill.data.order import DataOrder
from lmdistill.data.packed import prepare_data
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.models.teacher_dtype import TeacherDtype, resolve_teacher_dtype, to_teacher_dtype
from lmdistill.precision import cpu_description, resolve_precision
from lmdistill.train.loop import run_train

MODES = ("ce", "kd_online", "kd_cached", "trl_kd")
ONLINE = ("kd_online", "trl_kd")  # the modes that run once per --teacher-dtype
CPU = torch.device("cpu")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; `ru_maxrss` would carry the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def throughput(args: argparse.Namespace, step_ends: list[float]) -> dict:
    """Tokens/s over the timed steps: from the end of the last warm-up step to the end of the last step."""
    seconds = step_ends[args.warmup + args.steps - 1] - step_ends[args.warmup - 1]
    return {
        "mode": args.mode,
        "tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_trl(args: argparse.Namespace) -> dict:
    """The same forward-KL distillation through TRL's GKD trainer (off-policy: lmbda 0; beta 0 is forward KL)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, tokenizer, _ = load_hf_directory(Path(args.student), torch.float32)
    data = prepare_data(args.data, tokenizer, args.seq_len, progress=False)
    order = DataOrder(len(data.train), args.seed).blocks(0, (args.warmup + args.steps) * args.batch_size)
    blocks = Dataset.from_dict({"input_ids": data.train[order].astype(np.int64).tolist()})  # our runs' blocks
    teacher = load_teacher(args.teacher).model
    to_teacher_dtype(teacher, args.teacher_dtype[0], CPU)  # as `lmdistill train` runs it

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=1e-4, lmbda=0.0, beta=0.0, seq_kd=False, use_cpu=True, report_to=[],
            bf16=resolve_precision(CPU, args.precision)[0] == "bf16",  # the precision our side runs in
            save_strategy="no", logging_strategy="no", dataloader_drop_last=True, max_length=args.seq_len,
            disable_tqdm=True, gradient_checkpointing=False,  # as our loop: no recomputation, the faster setting
            train_sampling_strategy="sequential",
        )  # fmt: skip
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=blocks,
                             processing_class=tokenizer, data_collator=collate, callbacks=[StepClock()])  # fmt: skip
        trainer.train()
    return throughput(args, step_ends)


def measure(args: argparse.Namespace) -> dict:
    """Time `args.steps` optimizer steps of `lmdistill train` in one mode in this process."""
    if args.mode == "trl_kd":
        return measure_trl(args)
    step_ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            student=args.student, out=out, data=args.data, loss="ce" if args.mode == "ce" else "kd",
            teacher=args.teacher if args.mode == "kd_online" else None,
            teacher_cache=args.cache if args.mode == "kd_cached" else None, teacher_dtype=args.teacher_dtype[0],
            max_steps=args.warmup + args.steps + 1,  # the last step's held-out evaluation and save stay untimed
            batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4,
            precision=args.precision, chunk_size=args.chunk_size, eval_tokens=args.seq_len, seed=args.seed,
            progress=False,
        )  # fmt: skip
        run_train(config, on_step=lambda record: step_ends.append(time.perf_counter()))
    return throughput(args, step_ends)


def run_mode(args: argparse.Namespace, mode: str, cache: str, teacher_dtype: str) -> dict:
    """One mode in a fresh process (its own peak memory), with the teacher in `teacher_dtype`."""
    command = [sys.executable, __file__, "--mode", mode, "--cache", cache, "--student", args.student,
               "--teacher", args.teacher, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--precision", args.precision, "--chunk-size", str(args.chunk_size), "--teacher-dtype",
               teacher_dtype]  # fmt: skip
    if args.data:
        command += ["--data", *args.data]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} (teacher in {teacher_dtype}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{mode:10s} {teacher_dtype:5s} {result['tokens_per_s']:8.0f} tokens/s  {result['seconds_per_step']:6.2f} "
        f"s/step  peak RSS {result['peak_rss_mb']:7.0f} MB"
    )
    return result


def teacher_errors(args: argparse.Namespace, dtypes: list[str]) -> dict[str, float]:
    """The mean KL(fp32 teacher || teacher in each dtype) per token over `--kl-tokens` held-out tokens."""
    others = [dtype for dtype in dtypes if dtype != "fp32"]
    kl_args = argparse.Namespace(teacher=args.teacher, data=args.data, tokens=args.kl_tokens, seq_len=args.seq_len,
                                 batch_size=4, repeats=1, dtypes=["fp32", *others])  # fmt: skip
    measured = measure_teacher(kl_args)
    return {dtype: measured[dtype]["teacher_kl"] for dtype in dtypes}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/student-guide", help="student directory (lmdistill init)")
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--data", nargs="+", default=None, help="text sources (default: the built-in corpus)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="data order of every mode")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk of the loss")
    parser.add_argument(
        "--teacher-dtype", nargs="+", choices=TeacherDtype.__args__, default=["auto"],
        help="teacher dtypes of the online modes, each measured (the first also builds the cache)",
    )  # fmt: skip
    parser.add_argument("--kl-tokens", type=int, default=16384, help="held-out tokens of each dtype's teacher_kl")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the clock starts at the end of a warm-up step)")
    return args


def main() -> None:
    args = parse()
    if args.mode:  # a child process: one mode
        print(json.dumps(measure(args)))
        return
    dtypes = list(dict.fromkeys(resolve_teacher_dtype(CPU, d)[0] for d in args.teacher_dtype))  # as resolved here

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        manifest = run_cache_teacher(
            CacheTeacherConfig(
                teacher=args.teacher, out=scratch, data=args.data, seq_len=args.seq_len, top_k=args.top_k,
                samples=(args.warmup + args.steps + 1) * args.batch_size, seed=args.seed, teacher_dtype=dtypes[0],
                progress=False,
            )
        )  # fmt: skip
        cache_s = time.perf_counter() - start
        results = {mode: run_mode(args, mode, scratch, dtypes[0]) for mode in ("ce", "kd_cached")}
        online = {dtype: {mode: run_mode(args, mode, scratch, dtype) for mode in ONLINE} for dtype in dtypes}
    kl = teacher_errors(args, dtypes)

    ce, cached = results["ce"], results["kd_cached"]
    by_dtype = {
        dtype: {
            "kd_online_tokens_per_s": runs["kd_online"]["tokens_per_s"],
            "kd_peak_rss_mb": runs["kd_online"]["peak_rss_mb"],
            "kd_memory_ratio": runs["kd_online"]["peak_rss_mb"] / ce["peak_rss_mb"],
            "trl_kd_tokens_per_s": runs["trl_kd"]["tokens_per_s"],
            "trl_kd_peak_rss_mb": runs["trl_kd"]["peak_rss_mb"],
            "speedup_vs_trl": runs["kd_online"]["tokens_per_s"] / runs["trl_kd"]["tokens_per_s"],
            "teacher_kl": kl[dtype],
        }
        for dtype, runs in online.items()
    }
    first = by_dtype[dtypes[0]]
    print(f"teacher cache of {manifest['num_blocks']} blocks (top-{args.top_k}) built in {cache_s:.1f} s")
    print(json.dumps({
        "ce_tokens_per_s": ce["tokens_per_s"],
        "kd_online_tokens_per_s": first["kd_online_tokens_per_s"],
        "kd_cached_tokens_per_s": cached["tokens_per_s"],
        "ce_peak_rss_mb": ce["peak_rss_mb"],
        "kd_peak_rss_mb": first["kd_peak_rss_mb"],
        "kd_cached_peak_rss_mb": cached["peak_rss_mb"],
        "cached_step_ratio": ce["tokens_per_s"] / cached["tokens_per_s"],
        "kd_memory_ratio": first["kd_memory_ratio"],
        "cache_build_s": cache_s,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "precision": args.precision,
        "precision_resolved": resolve_precision(CPU, args.precision)[0],
        "trl_bf16": resolve_precision(CPU, args.precision)[0] == "bf16",
        "teacher_dtype": dtypes[0],
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "trl_kd_tokens_per_s": first["trl_kd_tokens_per_s"],
        "trl_kd_peak_rss_mb": first["trl_kd_peak_rss_mb"],
        "speedup_vs_trl": first["speedup_vs_trl"],
        "teacher_kl": first["teacher_kl"],
        "by_teacher_dtype": by_dtype,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
