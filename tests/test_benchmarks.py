"""The benchmark scripts start: each imports what it uses from lmdistill and parses its flags (`--help`), so a change
of the package's API that a benchmark relies on fails here rather than when the benchmark is next run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_teacher, write_corpus

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("bench_*.py"))


def test_there_are_benchmarks():
    names = {"bench_init.py", "bench_train.py", "bench_rationales.py", "bench_teacher.py"}
    assert {b.name for b in BENCHMARKS} >= names


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_and_parses_its_flags(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_bench_teacher_measures_every_dtype_against_fp32_on_a_tiny_teacher(tmp_path):
    teacher, corpus = save_tiny_teacher(tmp_path / "teacher"), write_corpus(tmp_path / "corpus")
    script = BENCHMARKS[0].with_name("bench_teacher.py")
    args = ["--teacher", teacher, "--data", corpus, "--tokens", 128, "--seq-len", 16, "--dtypes", "int8", "bf16"]
    env = {**os.environ, "LMDISTILL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 128 and list(result["dtypes"]) == ["fp32", "bf16", "int8"]
    fp32, bf16, int8 = result["dtypes"].values()
    assert fp32["teacher_kl"] == 0 and fp32["top1_agreement"] == 1
    for other in (bf16, int8):
        assert 0 < other["teacher_kl"] < 0.01 and other["top1_agreement"] > 0.9 and other["tokens_per_s"] > 0
        assert other["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.02)
    assert int8["weight_mb"] < bf16["weight_mb"] < fp32["weight_mb"]
    assert result["teacher_kl"] == {dtype: r["teacher_kl"] for dtype, r in result["dtypes"].items()}
