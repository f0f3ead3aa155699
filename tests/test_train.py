"""Training engine: accumulation, resume, multi-process, cached teacher, failures, and the CLI's artifacts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lmdistill_cache, save_tiny_teacher, torchrun, write_corpus
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lmdistill import distributed, objective
from lmdistill.cli import main
from lmdistill.config import TrainConfig
from lmdistill.errors import LmdistillError
from lmdistill.models.load import load_hf_directory
from lmdistill.train import checkpoint, loop
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
    with lmdistill_cache(root / "cache"):
        yield root


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
        teacher_dtype="fp32",  # not auto, which is bf16 on CPUs with native bf16
        progress=False,
        eval_tokens=64,
        val_fraction=0.2,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def cache_teacher(ws: Path, out: str, top_k: int, *extra: object) -> int:
    """`lmdistill cache-teacher` on the workspace's teacher and corpus, with the settings of `config`: its exit code."""
    args = ["--teacher", ws / "teacher", "--data", ws / "corpus", "--seq-len", 16, "--val-fraction", 0.2,
            "--top-k", top_k, "--teacher-dtype", "fp32", "--no-progress", "--out", ws / out, *extra]  # fmt: skip
    return main(["cache-teacher", *map(str, args)])


def build_cache(ws: Path, out: str, top_k: int, *extra: object) -> None:
    assert cache_teacher(ws, out, top_k, *extra) == 0


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
    real = objective.chunked_distill_loss

    def crash_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "chunked_distill_loss", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_train(config(workspace, "crashed", max_steps=6, save_every=3))
    monkeypatch.setattr(objective, "chunked_distill_loss", real)
    assert (workspace / "crashed" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    run_train(config(workspace, "crashed", max_steps=6, save_every=3, resume=True))
    a, b = weights(workspace / "straight" / "final"), weights(workspace / "crashed" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (workspace / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def straight_step_3(ws: Path, out: str) -> Path:
    """A run `out` whose only checkpoint is step 3 of the run `straight` (6 steps, checkpoints every 3)."""
    straight = ws / "straight"
    if not (straight / "final").exists():
        run_train(config(ws, "straight", max_steps=6, save_every=3))
    checkpoints = ws / out / "checkpoints"
    shutil.copytree(straight / "checkpoints" / "step-000003", checkpoints / "step-000003")
    (checkpoints / "latest").write_text("step-000003\n")
    return checkpoints / "step-000003"


def pickled(path: Path, state: dict) -> None:
    """Store `state` in the checkpoint `path` as checkpoints did before the current format: one pickled
    training_state.pt, numpy's RNG state as `np.random.get_state()` gives it."""
    for rng in state["rng"]:
        name, key, *rest = rng["numpy"]
        rng["numpy"] = (name, np.array(key, dtype=np.uint32), *rest)
    torch.save(state, path / "training_state.pt")
    (path / "training_state.json").unlink()
    (path / "training_state.safetensors").unlink()


def test_a_checkpoint_of_the_pickled_format_still_resumes_bit_for_bit(workspace):
    path = straight_step_3(workspace, "pickled")
    pickled(path, checkpoint.load_training_state(path))
    run_train(config(workspace, "pickled", max_steps=6, save_every=3, resume=True))
    a, b = weights(workspace / "straight" / "final"), weights(workspace / "pickled" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name


class RunsCode:
    """Unpickling it runs a shell command, which creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickled_training_state_that_would_run_code_is_refused_and_nothing_runs(workspace):
    path = straight_step_3(workspace, "tampered")
    state = checkpoint.load_training_state(path)
    marker = workspace / "tampered" / "the-payload-ran"
    state["scheduler"] = RunsCode(marker)
    pickled(path, state)
    with pytest.raises(LmdistillError, match="refused checkpoint .*step-000003: its training_state.pt holds pickled"):
        run_train(config(workspace, "tampered", max_steps=6, save_every=3, resume=True))
    assert not marker.exists()


def test_a_checkpoint_with_the_optimizer_state_keyed_by_position_still_resumes(workspace):
    straight = workspace / "straight"
    straight_step_3(workspace, "by-position")
    checkpoints = workspace / "by-position" / "checkpoints"
    # Rewrite the optimizer state as checkpoints before --fsdp held it: `optimizer.state_dict()`, keyed by position.
    student = AutoModelForCausalLM.from_pretrained(checkpoints / "step-000003")
    optimizer = loop._optimizer(student, config(workspace, "by-position"))
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # adds the `initial_lr` the saved state holds
    state = checkpoint.load_training_state(checkpoints / "step-000003")
    checkpoint.load_optimizer_state(student, optimizer, state["optimizer"])
    state["optimizer"] = optimizer.state_dict()
    assert all(isinstance(key, int) for key in state["optimizer"]["state"])
    pickled(checkpoints / "step-000003", state)
    run_train(config(workspace, "by-position", max_steps=6, save_every=3, resume=True))
    a, b = weights(straight / "final"), weights(workspace / "by-position" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    real = objective.chunked_distill_loss
    calls = {"n": 0}

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        total, ce, kd = real(*args, **kwargs)
        return (total * float("nan"), ce, kd) if calls["n"] == 3 else (total, ce, kd)

    monkeypatch.setattr(objective, "chunked_distill_loss", nan_at_step_3)
    with pytest.raises(LmdistillError, match=r"loss became nan at step 3.*step-000002"):
        run_train(config(workspace, "nan", max_steps=4, save_every=2))
    checkpoints = workspace / "nan" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    AutoModelForCausalLM.from_pretrained(checkpoints / "step-000002")
    assert not (workspace / "nan" / "final").exists()


def test_a_nan_gradient_norm_stops_the_run_before_the_update_and_names_a_finite_checkpoint(workspace):
    # At --lr 1e6 a step's loss is still finite when its gradient norm is NaN already.
    with pytest.raises(LmdistillError, match=r"the gradient norm became nan at step \d+; stopped without") as stop:
        run_train(config(workspace, "nan-gradient", lr=1e6, max_steps=8, save_every=1, log_every=1))
    named = Path(re.search(r"Last good checkpoint: (\S+)", str(stop.value)).group(1))
    assert named.name == (workspace / "nan-gradient" / "checkpoints" / "latest").read_text().strip()
    for name, value in weights(named).items():
        assert torch.isfinite(value).all(), name


def test_resume_refuses_settings_that_change_the_run_and_takes_those_that_do_not(workspace):
    straight = workspace / "straight"
    if not (straight / "final").exists():
        run_train(config(workspace, "straight", max_steps=6, save_every=3))
    checkpoints = workspace / "resumed" / "checkpoints"
    shutil.copytree(straight / "checkpoints", checkpoints)  # the finished run: its latest checkpoint is step 6
    # What a run killed while writing a checkpoint leaves (`storage.staged`), and a file of another name.
    leftovers = [checkpoints / f".step-000009.partial-{uuid.uuid4().hex}", checkpoints / f".latest.partial-{'0' * 32}"]
    leftovers[0].mkdir()
    leftovers[1].write_text("step-000009\n")
    (checkpoints / ".notes.partial-mine").write_text("kept\n")
    for overrides, refusal in (
        (dict(lr=1e-3), r"step-000006 was trained with --lr 0.003 \(now 0.001\); resuming with other settings"),
        (dict(warmup_steps=0, seed=1), r"--warmup-steps 1 \(now 0\), --seed 0 \(now 1\);"),
        (dict(loss="kd", teacher=str(workspace / "teacher")), r"--teacher None \(now '.*teacher'\), --loss 'ce'"),
        (dict(batch_size=8), r"took 4 examples each, this launch's would take 8 \(--batch-size 8 x --grad-accum 1 x 1"),
        (dict(max_steps=5), r"--max-steps 5 is below the step of the checkpoint .*step-000006 \(6\)"),
    ):
        with pytest.raises(LmdistillError, match=refusal):
            run_train(config(workspace, "resumed", **{"max_steps": 6, "save_every": 3, "resume": True, **overrides}))
    # Other intervals, the same 4 examples per step in micro-batches of 2, and a longer run.
    settings = dict(max_steps=8, save_every=4, eval_every=1, log_every=1, batch_size=2, grad_accum=2, resume=True)
    assert run_train(config(workspace, "resumed", **settings))["steps"] == 8
    assert (checkpoints / "latest").read_text().strip() == "step-000008"
    assert [r["step"] for r in metrics(workspace / "resumed")] == [7, 8]
    assert not any(path.exists() for path in leftovers) and (checkpoints / ".notes.partial-mine").exists()


def test_a_gpt2_student_is_refused_sequences_longer_than_its_positions_a_rotary_one_is_not(workspace):
    gpt2 = save_tiny_teacher(workspace / "student-gpt2", kind="gpt2")  # n_positions 64
    with pytest.raises(LmdistillError, match=r"--seq-len 65 exceeds the 64 learned positions of the student"):
        run_train(config(workspace, "gpt2-65", student=str(gpt2), seq_len=65))
    with pytest.raises(LmdistillError, match=r"--seq-len 65 exceeds the 64 learned positions of the teacher"):
        run_train(config(workspace, "gpt2-teacher-65", loss="kd", teacher=str(gpt2), seq_len=65))
    run_train(config(workspace, "gpt2-64", student=str(gpt2), seq_len=64, max_steps=1))
    assert AutoConfig.from_pretrained(workspace / "student").max_position_embeddings < 80
    run_train(config(workspace, "llama-80", seq_len=80, max_steps=1))


def test_cached_teacher_with_every_token_kept_equals_the_online_teacher(workspace):
    build_cache(workspace, "cache-full", top_k=96)
    online = run_train(config(workspace, "kd-online", loss="kd", teacher=str(workspace / "teacher")))
    cached = run_train(config(workspace, "kd-cached", loss="kd", teacher_cache=str(workspace / "cache-full")))
    assert cached["val_loss"] == pytest.approx(online["val_loss"], rel=1e-5)
    a, b = weights(workspace / "kd-online" / "final"), weights(workspace / "kd-cached" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_cached_teacher_is_refused_at_a_temperature_other_than_1_and_the_online_one_is_not(workspace):
    with pytest.raises(LmdistillError, match="--temperature 2.0 with --teacher-cache: .* use --teacher"):
        config(workspace, "kd-t2", loss="kd", temperature=2.0, teacher_cache=str(workspace / "cache-full"))
    config(workspace, "kd-t2", loss="ce+kd", temperature=2.0, teacher=str(workspace / "teacher"))
    config(workspace, "ce-t2", loss="ce", temperature=2.0, teacher_cache=str(workspace / "cache-full"))  # no kd term


def test_batch_gives_the_student_s_side_and_teacher_targets_the_teacher_s(workspace):
    """`PackedTrainData.batch`: ids and their next-token labels; `teacher_targets`: the online teacher's final hidden
    states and head on those ids, the cached top-k of the blocks, or nothing (CE only)."""
    student, tokenizer, _ = load_hf_directory(workspace / "student", torch.float32)
    processes, indices = distributed.Processes(rank=0, world=1, device=torch.device("cpu")), np.array([3, 0, 5])

    def data(**overrides) -> loop.PackedTrainData:
        return loop.PackedTrainData(config(workspace, "unused", **overrides), student, tokenizer, processes)

    ce = data()
    ids, labels, inputs = ce.batch(indices, processes.device)
    assert torch.equal(ids, torch.as_tensor(ce.data.train[indices].astype(np.int64))) and inputs == {}
    assert torch.equal(labels, objective.shifted_labels(ids)) and ce.teacher_targets(ids, indices) == {}
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher")
    with torch.no_grad():
        online = data(loss="kd", teacher=str(workspace / "teacher")).teacher_targets(ids, indices)
        torch.testing.assert_close(online["teacher_hidden"], teacher.base_model(input_ids=ids).last_hidden_state)
        top = torch.log_softmax(teacher(input_ids=ids).logits, dim=-1).topk(4, dim=-1)  # [3, 16, 4]
    assert online.keys() == {"teacher_hidden", "teacher_head"}
    assert torch.equal(online["teacher_head"], teacher.get_output_embeddings().weight)
    build_cache(workspace, "cache-targets", top_k=4)
    cached = data(loss="kd", teacher_cache=str(workspace / "cache-targets")).teacher_targets(ids, indices)
    assert cached.keys() == {"teacher_ids", "teacher_logprobs"} and torch.equal(cached["teacher_ids"], top.indices)
    torch.testing.assert_close(cached["teacher_logprobs"], top.values)


def test_the_step_asks_for_the_teacher_under_no_grad_for_each_micro_batch(workspace, monkeypatch):
    real, calls = loop.PackedTrainData.teacher_targets, []

    def spy(self, ids, indices):
        calls.append((torch.is_grad_enabled(), len(indices)))
        return real(self, ids, indices)

    monkeypatch.setattr(loop.PackedTrainData, "teacher_targets", spy)
    run_train(config(workspace, "teacher-no-grad", loss="kd", teacher=str(workspace / "teacher"), batch_size=2,
                     grad_accum=2, max_steps=2))  # fmt: skip
    assert calls == [(False, 2)] * 4  # 2 steps x 2 micro-batches of 2 blocks


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


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_cache_teacher_refuses_a_non_empty_out_unless_resumed_as_the_same_build_or_overwritten(workspace, capsys):
    out = workspace / "cache-reused"
    build_cache(workspace, "cache-reused", 4)
    before = files(out)
    other_teacher = save_tiny_teacher(workspace / "teacher-seed-1", seed=1)
    (workspace / "corpus-edited").mkdir()
    for doc in sorted((workspace / "corpus").iterdir()):  # the same block count, other text
        (workspace / "corpus-edited" / doc.name).write_text(doc.read_text().replace(" the ", " a ", 1))
    refusals = {
        "is not empty: pass --resume": (4,),
        "another top_k [(]4 there, 8 now[)]": (8, "--resume"),
        "another num_blocks": (4, "--resume", "--samples", 16),
        "another teacher_fingerprint": (4, "--resume", "--teacher", other_teacher),
        "another data_fingerprint": (4, "--resume", "--data", workspace / "corpus-edited"),
        "either --resume or --overwrite": (4, "--resume", "--overwrite"),
    }
    for message, args in refusals.items():
        capsys.readouterr()
        assert cache_teacher(workspace, "cache-reused", *args) == 2, message
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar, when there is one
        assert err.startswith("lmdistill cache-teacher: error: ") and re.search(message, err), err
        assert files(out) == before
    build_cache(workspace, "cache-reused", 4, "--resume")  # the same build, complete: kept as it is
    assert files(out) == before
    build_cache(workspace, "cache-reused", 8, "--overwrite", "--samples", 16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["num_blocks"] <= 16
    assert sorted(files(out)) == ["manifest.json", "shard-000000.safetensors"]
    run_train(config(workspace, "kd-overwritten", loss="kd", teacher_cache=str(out)))
    (out / "notes.txt").write_text("mine")
    assert cache_teacher(workspace, "cache-reused", 8, "--overwrite") == 2
    assert "also holds 'notes.txt'" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


def test_an_interrupted_cache_build_is_refused_by_train_and_continued_with_resume(workspace, monkeypatch):
    from lmdistill import teacher_cache
    from lmdistill.data.packed import prepare_data
    from lmdistill.models.load import load_teacher

    teacher = load_teacher(str(workspace / "teacher"))
    data = prepare_data([str(workspace / "corpus")], teacher.tokenizer, 16, val_fraction=0.2, progress=False)

    def build(out: Path, **options) -> dict:
        return teacher_cache.write_cache(teacher.model, teacher.name, teacher.tokenizer, data, out, top_k=4,
                                         shard_blocks=64, progress=False, **options)  # fmt: skip

    straight = workspace / "cache-straight"
    build(straight)
    assert len(list(straight.glob("shard-*"))) > 2 and not (straight / "manifest.incomplete.json").exists()
    interrupted, real, calls = workspace / "cache-interrupted", teacher_cache.save_file, {"n": 0}

    def crash_at_the_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "save_file", crash_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build(interrupted)
    monkeypatch.setattr(teacher_cache, "save_file", real)
    shards = ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert sorted(files(interrupted)) == ["manifest.incomplete.json", *shards]
    with pytest.raises(LmdistillError, match="incomplete: its build was interrupted; finish it with .* --resume"):
        run_train(config(workspace, "kd-interrupted", loss="kd", teacher_cache=str(interrupted)))
    with pytest.raises(LmdistillError, match="is not empty"):
        build(interrupted)
    first_shard = (interrupted / "shard-000000.safetensors").stat().st_mtime_ns
    build(interrupted, resume=True)
    assert (interrupted / "shard-000000.safetensors").stat().st_mtime_ns == first_shard
    assert files(interrupted) == files(straight)
    # A smaller build over it: --resume refuses, --overwrite leaves no shard of the old one behind.
    with pytest.raises(LmdistillError, match="another num_blocks"):
        build(interrupted, resume=True, blocks=np.arange(2))
    manifest = build(interrupted, overwrite=True, blocks=np.arange(2))
    assert manifest["num_blocks"] == 2 and sorted(files(interrupted)) == ["manifest.json", "shard-000000.safetensors"]


def set_item(name: str, index, value):
    return lambda tensors: tensors[name].__setitem__(index, value)


BROKEN_CACHES = {  # case -> (the refusal, a change to the first shard's tensors or to the manifest's fields)
    "id-beyond-vocab": (r"ids range from 0 to 96, where they must be in \[0, 96\)", set_item("ids", (0, 0, 0), 96)),
    "negative-id": (r"ids range from -1 to", set_item("ids", (1, 2, 3), -1)),
    "positive-logprob": (
        r"logprobs range from .* to 5.0, where they must be finite and <= 0",
        set_item("logprobs", (0, 0, 0), 5.0),
    ),
    "nan-logprob": (r"logprobs range from .* to nan", set_item("logprobs", (0, 3, 1), math.nan)),
    "infinite-logprob": (r"logprobs range from -inf", set_item("logprobs", (0, 3, 1), -math.inf)),
    "tail-above-1": (r"tail range from .* to 1.5", set_item("tail", (0, 0), 1.5)),
    "block-beyond-data": (
        r"blocks range from \d+ to 10000, where they must be in \[0, \d+\)",
        set_item("blocks", 0, 10000),
    ),
    "logprobs-shape": (
        r"logprobs is torch.float32 \[\d+, 16, 3\], where the manifest implies torch.float32 \[\d+, 16, 4\]",
        lambda tensors: tensors.update(logprobs=tensors["logprobs"][..., :3].contiguous()),
    ),
    "ids-dtype": (r"ids is torch.int64", lambda tensors: tensors.update(ids=tensors["ids"].long())),
    "no-tail": (r"tail is missing", lambda tensors: tensors.pop("tail")),
    "other-vocab": ("distributions over 128 token ids, but the student's output head has 96", {"vocab_size": 128}),
    "top-k-string": ("malformed: top_k is '4'", {"top_k": "4"}),
    "shard-outside": ("malformed: shards must list", {"shards": [{"file": "../x.safetensors", "num_blocks": 1}]}),
    "no-teacher-fingerprint": ("malformed: it has no teacher_fingerprint", {"teacher_fingerprint": None}),
}


@pytest.mark.parametrize("case", BROKEN_CACHES)
def test_a_cache_that_breaks_its_format_is_refused_before_the_first_step(workspace, case):
    message, change = BROKEN_CACHES[case]
    if not (workspace / "cache-trusted").exists():
        build_cache(workspace, "cache-trusted", 4)
    cache = workspace / f"cache-broken-{case}"
    shutil.copytree(workspace / "cache-trusted", cache)
    if isinstance(change, dict):
        manifest = json.loads((cache / "manifest.json").read_text())
        (cache / "manifest.json").write_text(json.dumps({**manifest, **change}))
    else:
        tensors = load_file(cache / "shard-000000.safetensors")
        change(tensors)
        save_file(tensors, cache / "shard-000000.safetensors")
    with pytest.raises(LmdistillError, match=message) as refusal:
        run_train(config(workspace, f"kd-broken-{case}", loss="kd", teacher_cache=str(cache)))
    assert "\n" not in str(refusal.value)


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
    saved = {p.name for p in (out / "checkpoints" / "step-000004").iterdir()}
    assert {"model.safetensors", "config.json", "training_state.json", "meta.json", "tokenizer.json"} <= saved
    assert "training_state.safetensors" in saved and "training_state.pt" not in saved  # no pickle
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ce"], r["kd"]])).all() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert records[-1]["tokens"] == 5 * 2 * 16
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert json.loads(capsys.readouterr().out)["steps"] == 5


def train_in_two_processes(ws: Path, out: str, *flags: str) -> None:
    """`lmdistill train` in 2 gloo processes with the settings of `config` but the batch size; `flags` override."""
    args = ["train", "--student", ws / "student", "--data", ws / "corpus", "--seq-len", 16, "--lr", 3e-3,
            "--warmup-steps", 1, "--precision", "fp32", "--teacher-dtype", "fp32", "--eval-tokens", 64,
            "--val-fraction", 0.2, "--no-progress", "--out", ws / out, *flags]  # fmt: skip
    torchrun(*args)


def metrics(run: Path) -> list[dict]:
    """The run's records, timing aside."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in r.items() if key != "tokens_per_s"} for r in records]


def assert_same_training(a: Path, b: Path) -> None:
    """The weights saved in `a` and `b` equal up to float32 rounding: each tensor's relative error in norm < 1e-5.

    Not elementwise: two runs that split the batch differently sum the gradients in another order, and Adam's
    update of an element whose gradient is near 0 (|g| <~ eps = 1e-8) is about lr * g / eps, which turns a rounding
    difference of g into one up to lr / eps = 3e5 times larger (in the FSDP test one element of 30944 differs by
    4.5e-6, the others by at most 2e-7).
    """
    a_weights, b_weights = weights(a), weights(b)
    assert a_weights.keys() == b_weights.keys()
    for name, value in a_weights.items():
        assert torch.linalg.norm(b_weights[name] - value) <= 1e-5 * torch.linalg.norm(value), name


@pytest.mark.integration
def test_two_processes_match_one_with_the_same_global_batch(workspace):
    run_train(config(workspace, "ddp-1", batch_size=4, max_steps=3))
    train_in_two_processes(workspace, "ddp-2", "--batch-size", "2", "--max-steps", "3")
    a, b = weights(workspace / "ddp-1" / "final"), weights(workspace / "ddp-2" / "final")
    for name in a:  # element-wise holds here (largest difference 1.2e-7); see `assert_same_training` for the KD run
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_a_checkpoint_of_one_process_resumes_in_two_with_the_same_global_batch(workspace):
    if not (workspace / "ddp-1" / "final").exists():
        run_train(config(workspace, "ddp-1", batch_size=4, max_steps=3))
    for out in ("ddp-1-then-1", "ddp-1-then-2"):
        shutil.copytree(workspace / "ddp-1" / "checkpoints", workspace / out / "checkpoints")
    run_train(config(workspace, "ddp-1-then-1", batch_size=4, max_steps=4, resume=True))
    train_in_two_processes(workspace, "ddp-1-then-2", "--batch-size", "2", "--max-steps", "4", "--resume")
    a, b = weights(workspace / "ddp-1-then-1" / "final"), weights(workspace / "ddp-1-then-2" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def fsdp_settings(ws: Path, **overrides) -> dict:
    """The runs of `fsdp_runs`: 4 steps of CE + KD (online teacher), checkpoints at 2 and 4, evaluations on 5 blocks
    (with 2 processes and batch 1, one evaluates 3 batches, the other 2 and a pass that is not counted)."""
    settings = dict(student=str(ws / "student-tied"), loss="ce+kd", teacher=str(ws / "teacher"), max_steps=4,
                    save_every=2, eval_every=2, log_every=1, eval_tokens=80)  # fmt: skip
    return {**settings, **overrides}


@pytest.fixture(scope="module")
def fsdp_runs(workspace):
    """A student with tied embeddings trained in one process with batch 4 (`fsdp-1`), and by 2 FSDP processes with
    2 micro-batches of 1 (`fsdp-2`); returns the workspace and the flags of the FSDP run."""
    save_tiny_teacher(workspace / "student-tied", tie_word_embeddings=True)
    run_train(config(workspace, "fsdp-1", **fsdp_settings(workspace, batch_size=4)))
    settings = fsdp_settings(workspace, batch_size=1, grad_accum=2, fsdp=True)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    train_in_two_processes(workspace, "fsdp-2", *flags)
    return workspace, flags


@pytest.mark.integration
def test_fsdp_two_processes_match_one_and_write_whole_weights(fsdp_runs):
    ws, _ = fsdp_runs
    # 2 processes accumulate 2 micro-batches each and reduce-scatter the sums, where 1 process sums one batch.
    for a, b in zip(metrics(ws / "fsdp-1"), metrics(ws / "fsdp-2"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    for saved in ("checkpoints/step-000002", "final"):
        assert_same_training(ws / "fsdp-1" / saved, ws / "fsdp-2" / saved)
    files = [set(safe_open(ws / run / "final" / "model.safetensors", "pt").keys()) for run in ("fsdp-1", "fsdp-2")]
    assert files[0] == files[1] and "lm_head.weight" not in files[1]  # the tied head is written once
    student = AutoModelForCausalLM.from_pretrained(ws / "fsdp-2" / "final")
    assert student.lm_head.weight is student.model.embed_tokens.weight


def crashed_after_step_2(ws: Path, out: str) -> None:
    """Copy the FSDP run as a crash after its step-2 checkpoint leaves it: nothing written later survives."""
    run = ws / out
    shutil.copytree(ws / "fsdp-2", run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest").write_text("step-000002\n")


@pytest.mark.integration
def test_fsdp_resume_continues_to_the_uninterrupted_result_bit_for_bit(fsdp_runs):
    ws, flags = fsdp_runs
    crashed_after_step_2(ws, "fsdp-resumed")
    train_in_two_processes(ws, "fsdp-resumed", *flags, "--resume")
    a, b = weights(ws / "fsdp-2" / "final"), weights(ws / "fsdp-resumed" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metrics(ws / "fsdp-resumed") == metrics(ws / "fsdp-2")


@pytest.mark.integration
def test_an_fsdp_checkpoint_resumes_in_one_process(fsdp_runs):
    ws, _ = fsdp_runs
    crashed_after_step_2(ws, "fsdp-then-1")
    run_train(config(ws, "fsdp-then-1", **fsdp_settings(ws, batch_size=4, resume=True)))
    assert_same_training(ws / "fsdp-1" / "final", ws / "fsdp-then-1" / "final")


def test_fsdp_needs_several_processes(workspace):
    with pytest.raises(LmdistillError, match="--fsdp shards the student over processes: launch with torchrun"):
        run_train(config(workspace, "fsdp-alone", fsdp=True))


def test_gap_closed_matches_hand_computed_values():
    from lmdistill.evaluation import gap_closed

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
    from lmdistill.precision import fast_bf16

    cpu = torch.device("cpu")
    (tmp_path / "avx2").write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    (tmp_path / "bf16").write_text("flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n")
    (tmp_path / "amx").write_text("flags\t\t: fpu avx512f amx_tile amx_bf16\n")
    assert not fast_bf16(cpu, tmp_path / "avx2")
    assert fast_bf16(cpu, tmp_path / "bf16") and fast_bf16(cpu, tmp_path / "amx")
    assert not fast_bf16(cpu, tmp_path / "missing")


@pytest.mark.parametrize("student", ["final", "final/inner"])
def test_an_out_whose_final_is_the_student_is_refused_before_anything_is_written(workspace, tmp_path, student):
    out = tmp_path / "run"
    shutil.copytree(workspace / "student", out / student)
    before = sorted(p.name for p in (out / student).iterdir())
    with pytest.raises(LmdistillError, match="would write its trained student over --student"):
        run_train(dataclasses.replace(config(workspace, "unused"), student=str(out / student), out=str(out)))
    assert sorted(p.name for p in (out / student).iterdir()) == before and not (out / "checkpoints").exists()


def test_train_from_a_directory_without_a_cache_is_refused_in_one_line(workspace, tmp_path, capsys):
    args = ["train", "--student", workspace / "student", "--teacher-cache", tmp_path, "--loss", "kd", "--max-steps",
            1, "--batch-size", 1, "--seq-len", 16, "--out", tmp_path / "run", "--no-progress"]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(
        "manifest.json is missing (run lmdistill cache-teacher)"
    )


def test_the_cache_manifest_records_the_teacher_dtype_and_resume_refuses_another(workspace, capsys):
    build_cache(workspace, "cache-fp32", 4)
    build_cache(workspace, "cache-int8", 4, "--teacher-dtype", "int8")
    fp32, int8 = (json.loads((workspace / name / "manifest.json").read_text()) for name in ("cache-fp32", "cache-int8"))
    assert (fp32["teacher_dtype"], fp32["teacher_dtype_reason"]) == ("fp32", "set to fp32")
    assert (int8["teacher_dtype"], int8["teacher_dtype_reason"]) == ("int8", "set to int8")
    assert int8["teacher_fingerprint"] == fp32["teacher_fingerprint"]  # the weights as loaded
    capsys.readouterr()
    assert cache_teacher(workspace, "cache-int8", 4, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmdistill cache-teacher: error: --resume: ") and (
        "another teacher_dtype ('int8' there, 'fp32' now) (another --teacher-dtype)" in err
    ), err
    build_cache(workspace, "cache-int8", 4, "--resume", "--teacher-dtype", "int8")
    # int8 changes the cached distributions, a little
    shards = [load_file(workspace / name / "shard-000000.safetensors") for name in ("cache-fp32", "cache-int8")]
    assert (shards[0]["ids"][..., 0] == shards[1]["ids"][..., 0]).float().mean() > 0.9
    assert not torch.equal(shards[0]["logprobs"], shards[1]["logprobs"])
    assert (shards[0]["logprobs"][..., 0] - shards[1]["logprobs"][..., 0]).abs().mean() < 0.05


@pytest.mark.parametrize("teacher_dtype", ["bf16", "int8"])
def test_online_kd_runs_its_teacher_in_its_own_dtype_beside_the_student_s_precision(workspace, teacher_dtype):
    runs = {}
    for dtype, precision in (("fp32", "fp32"), (teacher_dtype, "bf16")):
        out = f"kd-teacher-{teacher_dtype}-{dtype}-{precision}"
        runs[dtype] = run_train(config(workspace, out, loss="kd", teacher=str(workspace / "teacher"),
                                       teacher_dtype=dtype, precision=precision, max_steps=2))  # fmt: skip
        env = json.loads((workspace / out / "environment.json").read_text())
        assert (env["teacher_dtype"], env["teacher_dtype_reason"]) == (dtype, f"set to {dtype}")
        assert env["precision"] == precision
    assert math.isfinite(runs[teacher_dtype]["val_loss"])
    assert runs[teacher_dtype]["val_loss"] == pytest.approx(runs["fp32"]["val_loss"], rel=0.05)
