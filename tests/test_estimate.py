"""`--dry-run` of `train` and `study`: the memory estimate by component, its warning, and its accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lmdistill_cache, save_tiny_teacher, tiny_tokenizer, write_corpus
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from lmdistill import estimate
from lmdistill.cli import main
from lmdistill.train import loop


def save_llama(path: Path, **sizes) -> Path:
    """A llama of vocabulary 16,384 (the tiny tokenizer's 96 ids are its first), saved with the tiny tokenizer."""
    config = LlamaConfig(vocab_size=16384, bos_token_id=0, eos_token_id=1, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=256, **sizes)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A student of 29M parameters, a teacher of 50M (so that the model terms outweigh the Python process), a corpus,
    and a top-64 cache of the blocks the runs below read."""
    root = tmp_path_factory.mktemp("estimate")
    save_llama(root / "student", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8)
    save_llama(root / "teacher", hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12)
    write_corpus(root / "corpus", words=2000)
    with lmdistill_cache(root / "cache"):
        args = ["--teacher", root / "teacher", "--data", root / "corpus", "--seq-len", 128, "--top-k", 64,
                "--samples", 16, "--no-progress", "--out", root / "teacher-cache"]  # fmt: skip
        assert main(["cache-teacher", *map(str, args)]) == 0
        yield root


def train_args(ws: Path, out: str, teacher: str) -> list[str]:
    """`lmdistill train` of 2 steps of 8 x 128 tokens: CE (teacher ""), online KD ("online"; "online-int8",
    "online-bf16": a teacher in that dtype) or cached KD."""
    kd = {"": [], "online": ["--teacher", ws / "teacher", "--teacher-dtype", "fp32"],  # not auto: bf16 on some CPUs
          "online-int8": ["--teacher", ws / "teacher", "--teacher-dtype", "int8"],
          "online-bf16": ["--teacher", ws / "teacher", "--teacher-dtype", "bf16"],
          "cached": ["--teacher-cache", ws / "teacher-cache"]}  # fmt: skip
    args = ["train", "--student", ws / "student", "--data", ws / "corpus", "--seq-len", 128, "--batch-size", 8,
            "--max-steps", 2, "--eval-tokens", 256, "--precision", "fp32", "--no-progress", "--out", ws / out,
            *kd[teacher], *(["--loss", "kd"] if teacher else [])]  # fmt: skip
    return list(map(str, args))


@pytest.mark.parametrize("teacher", ["", "online", "online-int8", "cached"])
def test_dry_run_prints_the_table_and_exits_without_loading_weights(workspace, teacher, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(loop, "run_train", refuse)
    assert main([*train_args(workspace, "dry", teacher), "--dry-run"]) == 0
    table = capsys.readouterr().out
    for row in ("student weights", "student gradients", "AdamW state", "activations", "loss chunk buffers",
                "expected peak per process"):  # fmt: skip
        assert row in table
    assert ("teacher weights" in table) == teacher.startswith("online")
    assert ("linear weights int8" in table) == ("teacher in float32" in table) == (teacher == "online-int8")
    assert ("cached top-k" in table) == ("teacher cache on disk" in table) == (teacher == "cached")
    assert not (workspace / "dry").exists()


def test_study_dry_run_counts_the_held_teacher_and_the_cache_disk(tmp_path, monkeypatch, capsys):
    save_tiny_teacher(tmp_path / "teacher")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", lambda *a, **k: pytest.fail("--dry-run loaded weights"))
    args = ["study", "--teacher", tmp_path / "teacher", "--out", tmp_path / "study", "--hidden-size", 16,
            "--num-layers", 2, "--num-heads", 2, "--num-kv-heads", 1, "--intermediate-size", 32, "--seq-len", 16,
            "--train-tokens", 640, "--top-k", 8, "--dry-run"]  # fmt: skip
    assert main(list(map(str, args))) == 0
    table = capsys.readouterr().out
    assert "teacher weights" in table and "cached top-k" in table
    # 640 tokens in steps of 4 x 16: 10 steps, at most 40 blocks of 16 x 8 (ids + logprobs), 16 tails, one index
    assert f"{estimate.cache_bytes(40, 16, 8) / 2**20:.1f} MiB" in table.split("teacher cache on disk")[1]
    assert not (tmp_path / "study").exists()


def test_the_cache_disk_formula_is_the_size_of_a_written_cache(workspace):
    shard = workspace / "teacher-cache" / "shard-000000.safetensors"
    blocks = json.loads((workspace / "teacher-cache" / "manifest.json").read_text())["num_blocks"]
    header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")  # safetensors: length, then the JSON header
    assert shard.stat().st_size - header == estimate.cache_bytes(blocks, 128, 64)


def test_a_run_whose_estimate_exceeds_the_available_memory_warns_and_names_the_levers(workspace, monkeypatch, caplog):
    started = []
    monkeypatch.setattr(loop, "run_train", lambda config: started.append(config) or {})
    monkeypatch.setattr(estimate, "available_memory", lambda: 100 * 2**20)
    assert main(train_args(workspace, "small", "online")) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "exceeds" in r.getMessage()]
    assert "MiB available" in warning and "--teacher-cache" in warning and "--fsdp" in warning
    assert "--chunk-size" in warning and "--teacher-dtype int8" in warning
    assert started  # a warning, not a refusal
    caplog.clear()
    for reduced in ("online-int8", "online-bf16"):  # a teacher already in a reduced dtype: not offered again
        assert main(train_args(workspace, f"small-{reduced}", reduced)) == 0
        (warning,) = [r.getMessage() for r in caplog.records if "exceeds" in r.getMessage()]
        assert "--teacher-cache" in warning and "--teacher-dtype" not in warning, reduced
        caplog.clear()
    monkeypatch.setattr(estimate, "available_memory", lambda: 2**40)
    assert main(train_args(workspace, "large", "online")) == 0
    assert not [r for r in caplog.records if "exceeds" in r.getMessage()]


def peak_rss(args: list[str]) -> int:
    """The peak resident memory (bytes) of `python -m lmdistill.cli ARGS` on the CPU, measured by a fresh process
    that runs only that child (ru_maxrss of its children is the child's VmHWM)."""
    measure = ("import resource, subprocess, sys;"
               " subprocess.run([sys.executable, '-m', 'lmdistill.cli', *sys.argv[1:]], check=True,"
               " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
               " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", measure, *args], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout) * 1024


def dry_run_peak(args: list[str]) -> float:
    """The expected peak (bytes) of `lmdistill train ARGS --dry-run`, in a child process like the measured run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "lmdistill.cli", *args, "--dry-run"], capture_output=True,
                          text=True, env=env, check=True)  # fmt: skip
    row = next(line for line in done.stdout.splitlines() if line.startswith("expected peak per process"))
    return float(row.split()[-2]) * 2**20


@pytest.mark.integration
@pytest.mark.parametrize("teacher", ["", "online", "online-int8", "cached"])
def test_the_estimate_is_within_25_percent_of_the_measured_peak(workspace, teacher):
    args = train_args(workspace, f"measured-{teacher or 'ce'}", teacher)
    expected, measured = dry_run_peak(args), peak_rss(args)
    print(f"{teacher or 'ce'}: estimate {expected / 2**20:.0f} MiB, VmHWM {measured / 2**20:.0f} MiB")
    assert abs(expected - measured) <= 0.25 * measured


def test_an_int8_teacher_counts_its_linear_layers_at_one_byte_and_a_conversion_moment_in_float32():
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    # per layer q, k, v, o, gate, up, down: 36,864 weights in 512 rows; the tied head 96 x 64 in 96 rows; float32:
    # the embedding (6,144), 5 norms of 64, and the dequantized head
    int8, _ = estimate.teacher_weight_bytes(config, "int8")
    assert int8 == (2 * 36864 + 6144) + estimate.INT8_ROW * (2 * 512 + 96) + 4 * (6144 + 320) + 4 * 6144
    assert estimate.teacher_weight_bytes(config, "bf16")[0] == 2 * (6144 + 2 * 36864 + 320)
    student = LlamaConfig(vocab_size=96, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, head_dim=8)  # fmt: skip
    run = estimate.training_estimate(student, batch_size=1, seq_len=2, chunk_size=2, teacher=config,
                                     teacher_dtype="int8", baseline=0)  # fmt: skip
    fp32 = 4 * (6144 + 2 * 36864 + 320) + 4 * 6144  # loaded, with a float32 copy of the tied head to quantize
    always = sum(term.bytes for term in run.terms if term.phase == "")
    assert run.peak == always + fp32 - int8  # the tiny student's step and checkpoint are smaller than the conversion


CHUNK_PEAK = """
import sys, torch
from pathlib import Path
from lmdistill import losses

def hwm():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024

n, vocab, kind, kd_weight = 256, 65536, sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
h, head, targets = torch.randn(n, 32), torch.randn(vocab, 32) * 0.1, torch.randint(0, vocab, (n,))
teacher = losses._Teacher(hidden=torch.randn(n, 32), head=torch.randn(vocab, 32) * 0.1)
options = losses._Options(kind=kind, temperature=2.0, beta=0.5, alpha=0.5, kd_weight=kd_weight, chunk_size=n)
before = hwm()
losses._chunk(h, head, targets, teacher, options, True)
print((hwm() - before) / (n * vocab * 4))
"""


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl"])
def test_an_online_chunk_holds_the_buffers_the_estimate_counts(kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHUNK_PEAK, kind, "0.5"], capture_output=True, text=True, env=env,
                          check=True)  # fmt: skip
    measured = float(done.stdout)  # [chunk, V] float32 buffers alive at the peak of a ce+kd chunk at τ = 2
    config = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1)  # fmt: skip
    run = estimate.training_estimate(config, batch_size=1, seq_len=1, chunk_size=1, teacher=config, kd_loss=kind,
                                     beta=0.5, baseline=0)  # fmt: skip
    counted = next(t for t in run.terms if t.name == "loss chunk buffers").bytes / (4 * 64)
    assert abs(measured - counted) < 0.5, (measured, counted)
    if kind == "forward-kl":  # closed form: logits, the CE's gradient, teacher logits, log ratio
        assert measured < 4.5
