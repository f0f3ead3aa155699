"""The benchmark scripts start: each imports what it uses from lmdistill and parses its flags (`--help`), so a change
of the package's API that a benchmark relies on fails here rather than when the benchmark is next run."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("bench_*.py"))


def test_there_are_benchmarks():
    assert {b.name for b in BENCHMARKS} >= {"bench_init.py", "bench_train.py", "bench_rationales.py"}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_and_parses_its_flags(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
