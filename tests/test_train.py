"""Training engine: accumulation, resume, multi-process, cached teacher, failures, and the CLI's artifacts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_teacher, write_corpus
from transformers import AutoModelForCausalLM

from lmdistill.cli import main
from lmdistill.config import TrainConfig
from lmdistill.errors import LmdistillError
from lmdistill.train import loop
from lmdistill.train.loop import run_train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny teacher, a student initialized from it (weight-selection), and a small text corpus of known words."""
    root = tmp_path_factory.mktemp("train")
    save_tiny_teacher(root / "teacher")
    assert (
        main(
            [
                "init",
                "--teacher",
                str(root / "teacher"),
                "--method",
                "guide",
                "--hidden-size",
                "16",
                "--num-layers",
                "2",
                "--num-heads",
                "2",
                "--num-kv-heads",
                "1",
                "--out",
                str(root / "student"),
            ]
        )
        == 0
    )
    write_corpus(root / "corpus")
    previous = os.environ.get("LMDISTILL_CACHE")
    os.environ["LMDISTILL_CACHE"] = str(root / "cache")
    yield root
    if previous is None:
        del os.environ["LMDISTILL_CACHE"]
    else:
        os.environ["LMDISTILL_CACHE"] = previous


def config(ws: Path, out: str, **overrides) -> TrainConfig:
    settings = dict(
        student=str(ws / "student"),
        out=str(ws / out),
        data=[str(ws / "corpus")],
        seq_len=16,
        batch_size=4,
        max_steps=4,
        lr=3e-3,
        warmup_steps=1,
        precision="fp32",
        progress=False,
        eval_tokens=64,
        val_fraction=0.2,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def build_cache(ws: Path, out: str, top_k: int, *extra: object) -> None:
    """`lmdistill cache-teacher` on the workspace's teacher and corpus, with the settings of `config`."""
    args = ["--teacher", ws / "teacher", "--data", ws / "corpus", "--seq-len", 16, "--val-fraction", 0.2,
            "--top-k", top_k, "--precision", "fp32", "--no-progress", "--out", ws / out, *extra]  # fmt: skip
    assert main(["cache-teacher", *map(str, args)]) == 0


def weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def test_gradient_accumulation_does_not_change_the_update(workspace):
    for run, batch, accum in (("accum-1x8", 8, 1), ("accum-4x2", 2, 4)):
        run_train(
            config(
                workspace,
                run,
                batch_size=batch,
                grad_accum=accum,
                loss="ce+kd",
                log_every=1,
                teacher=str(workspace / "teacher"),
            )
        )
    # Same losses step by step; weights equal up to float32 summation order, amplified by Adam's normalization.
    logs = [
        [json.loads(line) for line in (workspace / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("accum-1x8", "accum-4x2")
    ]
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["kd"] == pytest.approx(b["kd"], rel=1e-6)
    a, b = weights(workspace / "accum-1x8" / "final"), weights(workspace / "accum-4x2" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)


def test_resume_after_a_crash_equals_an_uninterrupted_run_bit_for_bit(workspace, monkeypatch):
    run_train(config(workspace, "straight", max_steps=6, save_every=3))
    calls = {"n": 0}
    real = loop.chunked_distill_loss

    def crash_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "chunked_distill_loss", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_train(config(workspace, "crashed", max_steps=6, save_every=3))
    monkeypatch.setattr(loop, "chunked_distill_loss", real)
    assert (workspace / "crashed" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    run_train(config(workspace, "crashed", max_steps=6, save_every=3, resume=True))
    a, b = weights(workspace / "straight" / "final"), weights(workspace / "crashed" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (workspace / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    real = loop.chunked_distill_loss
    calls = {"n": 0}

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        total, ce, kd = real(*args, **kwargs)
        return (total * float("nan"), ce, kd) if calls["n"] == 3 else (total, ce, kd)

    monkeypatch.setattr(loop, "chunked_distill_loss", nan_at_step_3)
    with pytest.raises(LmdistillError, match=r"loss became nan at step 3.*step-000002"):
        run_train(config(workspace, "nan", max_steps=4, save_every=2))
    checkpoints = workspace / "nan" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    AutoModelForCausalLM.from_pretrained(checkpoints / "step-000002")
    assert not (workspace / "nan" / "final").exists()


def test_cached_teacher_with_every_token_kept_equals_the_online_teacher(workspace):
    build_cache(workspace, "cache-full", top_k=96)
    online = run_train(config(workspace, "kd-online", loss="kd", teacher=str(workspace / "teacher")))
    cached = run_train(config(workspace, "kd-cached", loss="kd", teacher_cache=str(workspace / "cache-full")))
    assert cached["val_loss"] == pytest.approx(online["val_loss"], rel=1e-5)
    a, b = weights(workspace / "kd-online" / "final"), weights(workspace / "kd-cached" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_cache_of_the_blocks_a_run_reads_serves_that_run_and_refuses_a_longer_one(workspace):
    samples = 4 * 4  # config's max_steps x batch_size
    build_cache(workspace, "cache-run", 96, "--samples", samples, "--seed", 3)
    manifest = json.loads((workspace / "cache-run" / "manifest.json").read_text())
    assert manifest["num_blocks"] <= samples < manifest["data_num_blocks"]
    online = run_train(config(workspace, "kd-online-3", loss="kd", seed=3, teacher=str(workspace / "teacher")))
    cached = run_train(config(workspace, "kd-run-3", loss="kd", seed=3, teacher_cache=str(workspace / "cache-run")))
    assert cached["val_loss"] == pytest.approx(online["val_loss"], rel=1e-5)
    for seed, steps in ((3, 8), (4, 4)):
        with pytest.raises(LmdistillError, match=f"lacks .* cache-teacher --samples {4 * steps} --seed {seed}"):
            run_train(config(workspace, f"kd-refused-{seed}", loss="kd", seed=seed, max_steps=steps,
                             teacher_cache=str(workspace / "cache-run")))  # fmt: skip


def test_a_mismatched_or_corrupt_cache_is_refused(workspace):
    cache = workspace / "cache-small"
    build_cache(workspace, "cache-small", top_k=4)
    with pytest.raises(LmdistillError, match="does not match the training data: its seq_len is 16"):
        run_train(config(workspace, "mismatch", loss="kd", teacher_cache=str(cache), seq_len=32))
    shard = next(cache.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(LmdistillError, match="missing or corrupt"):
        run_train(config(workspace, "corrupt", loss="kd", teacher_cache=str(cache)))


def test_train_cli_writes_every_artifact(workspace, capsys):
    out = workspace / "cli-run"
    assert (
        main(
            [
                "train",
                "--student",
                str(workspace / "student"),
                "--data",
                str(workspace / "corpus"),
                "--teacher",
                str(workspace / "teacher"),
                "--loss",
                "ce+kd",
                "--kd-loss",
                "jsd",
                "--max-steps",
                "5",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--save-every",
                "2",
                "--eval-every",
                "2",
                "--log-every",
                "1",
                "--val-fraction",
                "0.2",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert {
        "config.yaml",
        "environment.json",
        "data_manifest.json",
        "metrics.jsonl",
        "summary.json",
        "final",
        "checkpoints",
    } <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step-000002",
        "step-000004",
        "step-000005",
    ]
    assert {"model.safetensors", "config.json", "training_state.pt", "meta.json", "tokenizer.json"} <= {
        p.name for p in (out / "checkpoints" / "step-000004").iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ce"], r["kd"]])).all() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert records[-1]["tokens"] == 5 * 2 * 16
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert json.loads(capsys.readouterr().out)["steps"] == 5


def test_two_processes_match_one_with_the_same_global_batch(workspace):
    single = config(workspace, "ddp-1", batch_size=4, max_steps=3)
    run_train(single)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29731",
        "-m",
        "lmdistill.cli",
        "train",
        "--student",
        str(workspace / "student"),
        "--data",
        str(workspace / "corpus"),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--precision",
        "fp32",
        "--eval-tokens",
        "64",
        "--val-fraction",
        "0.2",
        "--no-progress",
        "--out",
        str(workspace / "ddp-2"),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(workspace / "ddp-1" / "final"), weights(workspace / "ddp-2" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_gap_closed_matches_hand_computed_values():
    from lmdistill.evaluate import gap_closed

    assert gap_closed(base=5.0, method=4.0, teacher=3.0) == pytest.approx(0.5)
    assert gap_closed(base=5.0, method=3.0, teacher=3.0) == pytest.approx(1.0)
    assert gap_closed(base=5.0, method=5.5, teacher=3.0) == pytest.approx(-0.25)
    assert gap_closed(base=148.4, method=90.0, teacher=20.1) == pytest.approx((148.4 - 90.0) / (148.4 - 20.1))
    assert math.isnan(gap_closed(base=3.0, method=3.0, teacher=3.0))


def test_eval_cli_reports_losses_and_the_gap_closed(workspace, capsys):
    trained = workspace / "kd-online" / "final"
    if not trained.exists():
        run_train(config(workspace, "kd-online", loss="kd", teacher=str(workspace / "teacher")))
    out = workspace / "eval.json"
    args = ["--model", trained, "--teacher", workspace / "teacher", "--baseline", workspace / "student", "--data",
            workspace / "corpus", "--seq-len", 16, "--val-fraction", 0.2, "--out", out]  # fmt: skip
    assert main(["eval", *map(str, args)]) == 0
    results = json.loads(out.read_text())
    losses = {name: results[name]["val_loss"] for name in ("model", "baseline", "teacher")}
    for name, loss in losses.items():
        assert results[name]["val_ppl"] == pytest.approx(math.exp(loss))
    expected = (losses["baseline"] - losses["model"]) / (losses["baseline"] - losses["teacher"])
    assert results["gap_closed_loss"] == pytest.approx(expected)
    ppl = {name: results[name]["val_ppl"] for name in losses}
    assert results["gap_closed_ppl"] == pytest.approx(
        (ppl["baseline"] - ppl["model"]) / (ppl["baseline"] - ppl["teacher"])
    )
    assert results["data"]["tokens"] > 0 and "gap closed:" in capsys.readouterr().out
    assert main(["eval", "--model", str(workspace / "missing")]) == 2


def test_auto_precision_uses_bf16_only_where_the_cpu_has_bf16_instructions(tmp_path):
    from lmdistill.evaluate import fast_bf16

    cpu = torch.device("cpu")
    (tmp_path / "avx2").write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    (tmp_path / "bf16").write_text("flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n")
    (tmp_path / "amx").write_text("flags\t\t: fpu avx512f amx_tile amx_bf16\n")
    assert not fast_bf16(cpu, tmp_path / "avx2")
    assert fast_bf16(cpu, tmp_path / "bf16") and fast_bf16(cpu, tmp_path / "amx")
    assert not fast_bf16(cpu, tmp_path / "missing")
