"""Hidden-state distillation through the GUIDE projection: the loss, the layers, the cache's hidden states, training
with `--loss kd+hkd` from the cache and online, the refusals, and the `guide+hkd` study arm."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import lmdistill_cache, save_tiny_teacher, tiny_teacher, write_corpus
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lmdistill import hidden
from lmdistill.cli import main
from lmdistill.commands import study as study_command
from lmdistill.config import STUDY_ARMS, StudyConfig, TrainConfig, to_yaml
from lmdistill.data.packed import prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.init.build import build_student
from lmdistill.losses import hidden_loss
from lmdistill.models.adapters import adapter_for
from lmdistill.models.load import load_teacher
from lmdistill.models.shape import derive_student_shape
from lmdistill.teacher_cache import TeacherCache, write_cache
from lmdistill.train.loop import run_train

STUDENT = ["--hidden-size", "16", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1"]


def init(ws: Path, out: str, *extra: str) -> Path:
    assert main(["init", "--teacher", str(ws / "teacher"), *STUDENT, "--out", str(ws / out), *extra]) == 0
    return ws / out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_thread):
    """A tiny teacher (3 blocks of width 32), GUIDE students of it (width 16, 2 blocks) and a small corpus."""
    root = tmp_path_factory.mktemp("hidden")
    with lmdistill_cache(root / "cache"):
        save_tiny_teacher(root / "teacher")
        init(root, "student", "--method", "guide")
        write_corpus(root / "corpus")
        yield root


def cache_teacher(ws: Path, out: str, *extra: object, top_k: int = 8) -> int:
    args = ["--teacher", ws / "teacher", "--data", ws / "corpus", "--seq-len", 16, "--val-fraction", 0.2,
            "--top-k", top_k, "--teacher-dtype", "fp32", "--no-progress", "--out", ws / out, *extra]  # fmt: skip
    return main(["cache-teacher", *map(str, args)])


def hidden_cache(ws: Path, name: str = "cache-hidden", top_k: int = 8) -> Path:
    if not (ws / name / "manifest.json").is_file():
        assert cache_teacher(ws, name, "--hidden-student", ws / "student", top_k=top_k) == 0
    return ws / name


def config(ws: Path, out: str, **overrides) -> TrainConfig:
    settings = dict(student=str(ws / "student"), out=str(ws / out), data=[str(ws / "corpus")], seq_len=16,
                    batch_size=4, max_steps=4, lr=3e-3, warmup_steps=1, precision="fp32", progress=False,
                    eval_tokens=64, val_fraction=0.2, loss="kd+hkd")  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_hidden_loss_is_zero_on_its_target_two_against_its_opposite_and_ignores_invalid_positions():
    student = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[True, True, True, True, False], [True, False, True, True, False]])
    assert hidden_loss(student, student, valid).item() == pytest.approx(0, abs=1e-6)
    assert hidden_loss(student, 3 * student, valid).item() == pytest.approx(0, abs=1e-6)  # blind to the norm
    assert hidden_loss(student, -student, valid).item() == pytest.approx(2)
    garbage = student.clone()
    garbage[~valid] = math.nan
    target = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    assert hidden_loss(garbage, target, valid).item() == hidden_loss(student, target, valid).item()
    # by hand: the mean over valid positions of 1 - cosine
    cosine = torch.nn.functional.cosine_similarity(student[valid], target[valid], dim=-1)
    assert hidden_loss(student, target, valid).item() == pytest.approx((1 - cosine).mean().item(), rel=1e-6)


def test_hidden_loss_of_micro_batches_with_the_global_count_adds_up_to_the_whole_batch_s():
    generator = torch.Generator().manual_seed(2)
    student, target = torch.randn(4, 5, 6, generator=generator), torch.randn(4, 5, 6, generator=generator)
    valid = torch.rand(4, 5, generator=generator) > 0.3
    whole = hidden_loss(student, target, valid)
    parts = sum(hidden_loss(student[i : i + 2], target[i : i + 2], valid[i : i + 2], int(valid.sum())) for i in (0, 2))
    torch.testing.assert_close(parts, whole)
    student64 = student.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: hidden_loss(s, target.double(), valid), (student64,))
    with pytest.raises(LmdistillError, match="must be \\[B, T, d\\]"):
        hidden_loss(student, target[..., :5], valid)


@pytest.mark.parametrize(
    ("student", "teacher", "pairs"),
    [
        (6, 30, [(3, 15), (6, 30)]),
        (2, 3, [(1, 2), (2, 3)]),
        (1, 3, [(1, 3)]),
        (5, 30, [(2, 12), (5, 30)]),
        (3, 1, [(1, 1), (3, 1)]),
    ],  # fmt: skip
)
def test_the_student_s_middle_and_last_blocks_map_to_the_teacher_s_proportional_blocks(student, teacher, pairs):
    assert hidden.layer_pairs(student, teacher) == pairs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_projection_is_the_one_guide_init_uses_and_block_outputs_are_the_residual_stream(kind):
    teacher = tiny_teacher(kind)
    adapter = adapter_for(teacher.config)
    shape = derive_student_shape(adapter.shape(teacher.config), adapter, hidden_size=16, num_layers=2, num_heads=2)
    for seed in (0, 1):  # the uncentered projection does not depend on the seed
        built = build_student(teacher, shape, "guide", seed=seed)
        assert torch.equal(hidden.projection(teacher, 16), built.projection)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hidden.block_outputs(teacher, [1, 3]) as outputs:
        everything = teacher(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(outputs[1], everything.hidden_states[1])  # after block 1
    final_norm = teacher.model.norm if kind == "llama" else teacher.transformer.ln_f
    torch.testing.assert_close(final_norm(outputs[3]), everything.hidden_states[-1])  # the last, before the norm
    with pytest.raises(LmdistillError, match="width 40 must be between 1 and the teacher's width 32"):
        hidden.projection(teacher, 40)


def test_the_cache_holds_the_projected_hidden_states_of_the_same_teacher_pass(workspace):
    path = hidden_cache(workspace)
    assert cache_teacher(workspace, "cache-plain") == 0
    manifest = json.loads((path / "manifest.json").read_text())
    teacher = load_teacher(str(workspace / "teacher"))
    m = hidden.projection(teacher.model, 16)
    assert manifest["hidden"] == {
        "width": 16,
        "student_num_layers": 2,
        "layers": [{"student": 1, "teacher": 2}, {"student": 2, "teacher": 3}],
        "projection": "uncentered",
        "projection_sha256": hidden.fingerprint(m),
        "dtype": "float16",
    }
    shard, plain = (
        load_file(path / "shard-000000.safetensors"),
        load_file(workspace / "cache-plain" / "shard-000000.safetensors"),
    )
    for name in ("blocks", "ids", "logprobs", "tail"):  # the top-k of a cache with hidden states are the same
        assert torch.equal(shard[name], plain[name])
    data = prepare_data([str(workspace / "corpus")], teacher.tokenizer, 16, val_fraction=0.2, progress=False)
    ids = torch.as_tensor(data.train[shard["blocks"][:3].numpy()].astype(np.int64))
    with torch.no_grad():
        _, states = hidden.teacher_states(teacher.model, ids, [2, 3], m)  # [3, 16, 2, 16]
    assert shard["hidden"].dtype == torch.float16 and shard["hidden"].shape[1:] == (16, 2, 16)
    torch.testing.assert_close(shard["hidden"][:3].float(), states, rtol=1e-3, atol=1e-3)
    cache = TeacherCache.open(path, data, 96)
    assert torch.equal(cache.states(np.array([int(shard["blocks"][1])])), shard["hidden"][1:2])
    assert TeacherCache.open(workspace / "cache-plain", data, 96).hidden is None  # a cache without them still opens


def test_states_that_overflow_float16_are_refused_before_a_shard_is_written(workspace):
    teacher = load_teacher(str(workspace / "teacher"))
    with torch.no_grad():
        teacher.model.get_input_embeddings().weight.mul_(1e6)  # the residual stream starts at the embeddings
    data = prepare_data([str(workspace / "corpus")], teacher.tokenizer, 16, val_fraction=0.2, progress=False)
    out = workspace / "cache-overflow"
    with pytest.raises(LmdistillError, match="overflow float16"):
        write_cache(teacher.model, teacher.name, teacher.tokenizer, data, out, top_k=8,
                    progress=False, hidden=hidden.HiddenSpec(16, 2))  # fmt: skip
    assert not list(out.glob("shard-*"))


def test_a_cached_hkd_run_trains_its_hidden_loss_down_and_matches_the_online_teacher(workspace):
    full = hidden_cache(workspace, "cache-hidden-full", top_k=96)  # every token: the kd term is the online one
    cached = run_train(config(workspace, "hkd-cached", teacher_cache=str(full), max_steps=12, eval_every=12,
                              log_every=1))  # fmt: skip
    records = metrics(workspace / "hkd-cached")
    assert {"ce", "kd", "hkd"} <= records[0].keys()
    assert records[-1]["hkd"] < 0.8 * records[0]["hkd"]
    assert records[0]["loss"] == pytest.approx(records[0]["kd"] + records[0]["hkd"], rel=1e-6)  # --hidden-weight 1
    online = run_train(config(workspace, "hkd-online", teacher=str(workspace / "teacher"), max_steps=12,
                              eval_every=12, log_every=1))  # fmt: skip
    assert [r["hkd"] for r in metrics(workspace / "hkd-online")] == pytest.approx([r["hkd"] for r in records], rel=1e-2)
    assert cached["val_loss"] == pytest.approx(online["val_loss"], rel=1e-3)


def test_gradient_accumulation_does_not_change_an_hkd_update(workspace):
    cache = str(hidden_cache(workspace))
    for run, batch, accum in (("hkd-1x8", 8, 1), ("hkd-4x2", 2, 4)):
        run_train(config(workspace, run, teacher_cache=cache, batch_size=batch, grad_accum=accum, max_steps=2))
    a = AutoModelForCausalLM.from_pretrained(workspace / "hkd-1x8" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(workspace / "hkd-4x2" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_kd_run_is_the_same_from_a_cache_with_hidden_states_and_its_weight_scales_the_term(workspace):
    run_train(config(workspace, "kd-plain", loss="kd", teacher_cache=str(workspace / "cache-plain")))
    run_train(config(workspace, "kd-hidden", loss="kd", teacher_cache=str(hidden_cache(workspace))))
    assert "hkd" not in metrics(workspace / "kd-plain")[0]
    a = AutoModelForCausalLM.from_pretrained(workspace / "kd-plain" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(workspace / "kd-hidden" / "final").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    run_train(config(workspace, "hkd-weight-3", teacher_cache=str(hidden_cache(workspace)), hidden_weight=3.0,
                     max_steps=1))  # fmt: skip
    first = metrics(workspace / "hkd-weight-3")[0]
    assert first["loss"] == pytest.approx(first["kd"] + 3 * first["hkd"], rel=1e-6)
    with pytest.raises(LmdistillError, match="--hidden-weight must be a finite number >= 0"):
        config(workspace, "x", teacher_cache="c", hidden_weight=-1.0)


def test_hkd_refuses_a_cache_without_hidden_states_or_for_another_student_and_a_student_without_guide(workspace):
    cases = {
        "holds no hidden states; build one with cache-teacher --hidden-student": {
            "teacher_cache": str(workspace / "cache-plain")
        },
        "hidden states for a student of width 16 with 2 blocks, but .* has width 8 and 2 blocks": {
            "teacher_cache": str(hidden_cache(workspace)),
            "student": str(init(workspace, "student-narrow", "--method", "guide", "--hidden-size", "8")),
        },
        "was not initialized with it \\(method random, pca None": {
            "teacher_cache": str(hidden_cache(workspace)),
            "student": str(init(workspace, "student-random", "--method", "random")),
        },
        "was not initialized with it \\(method guide, pca centered": {
            "teacher": str(workspace / "teacher"),
            "student": str(init(workspace, "student-centered", "--method", "guide", "--pca", "centered")),
        },
    }
    for message, overrides in cases.items():
        with pytest.raises(LmdistillError, match=message) as refusal:
            run_train(config(workspace, "hkd-refused", **overrides))
        assert "\n" not in str(refusal.value)
    assert cache_teacher(workspace, "cache-refused", "--hidden-student", workspace / "student-random") == 2
    assert not (workspace / "cache-refused").exists()  # refused before the teacher's first forward pass
    assert cache_teacher(workspace, hidden_cache(workspace).name, "--resume") == 2  # without the hidden states


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nan", "hidden range from .* to nan, where they must be finite"),
        ("shape", r"hidden is torch.float16 \[\d+, 16, 1, 16\], where the manifest implies torch.float16 \[\d+, 16, 2"),
        ("dtype", "hidden is torch.float32"),
        ("missing", "hidden is missing"),
        ("record", "malformed: hidden must hold width"),
    ],
)
def test_a_cache_whose_hidden_states_break_the_format_is_refused(workspace, case, message):
    broken = workspace / f"cache-broken-hidden-{case}"
    shutil.copytree(hidden_cache(workspace), broken)
    if case == "record":
        manifest = json.loads((broken / "manifest.json").read_text())
        manifest["hidden"]["dtype"] = "bfloat16"
        (broken / "manifest.json").write_text(json.dumps(manifest))
    else:
        tensors = load_file(broken / "shard-000000.safetensors")
        changes = {
            "nan": lambda t: t["hidden"].__setitem__((0, 3, 1, 2), math.nan),
            "shape": lambda t: t.update(hidden=t["hidden"][:, :, :1].contiguous()),
            "dtype": lambda t: t.update(hidden=t["hidden"].float()),
            "missing": lambda t: t.pop("hidden"),
        }
        changes[case](tensors)
        save_file(tensors, broken / "shard-000000.safetensors")
    with pytest.raises(LmdistillError, match=message):
        run_train(config(workspace, f"hkd-broken-{case}", teacher_cache=str(broken)))


def test_the_guide_hkd_arm_extends_guide_kd_and_its_study_cache_gains_the_hidden_states(workspace):
    arm = STUDY_ARMS["guide+hkd"]
    assert (arm.init, arm.loss, arm.pca, arm.extends) == ("guide", "kd+hkd", "uncentered", "guide+kd")
    settings = dict(out=str(workspace / "study"), teacher=str(workspace / "teacher"), data=[str(workspace / "corpus")],
                    hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24, seq_len=16,
                    batch_size=4, train_tokens=[256], top_k=8, val_fraction=0.2, eval_points=2, precision="fp32",
                    progress=False)  # fmt: skip
    plain, with_hkd = StudyConfig(**settings), StudyConfig(**settings, arms=["guide+kd", "guide+hkd"])
    run = with_hkd.train_config(arm, 256, student="s", out="o", teacher_cache="c")
    assert (run.loss, run.hidden_share, run.kd_share) == ("kd+hkd", 1.0, 1.0)
    assert plain.train_config(STUDY_ARMS["guide+kd"], 256, student="s", out="o", teacher_cache="c").hidden_share == 0
    teacher = load_teacher(str(workspace / "teacher"))
    data = prepare_data([str(workspace / "corpus")], teacher.tokenizer, 16, val_fraction=0.2, progress=False)
    loader = study_command._Teacher(plain)
    path = study_command._teacher_cache(plain, Path(plain.out), loader, data, 256, wait=True)
    before = load_file(path / "shard-000000.safetensors")
    assert "hidden" not in json.loads((path / "manifest.json").read_text())
    study_command._teacher_cache(with_hkd, Path(plain.out), loader, data, 256, wait=True)  # an hkd arm: rebuilt
    after = load_file(path / "shard-000000.safetensors")
    assert json.loads((path / "manifest.json").read_text())["hidden"]["width"] == 16
    assert all(torch.equal(before[name], after[name]) for name in before) and "hidden" in after
    assert (path / "build.json").is_file()
    run = with_hkd.train_config(arm, 256, student=str(workspace / "student"), out=str(workspace / "arm"),
                                teacher_cache=str(path))  # fmt: skip
    assert "hkd" in metrics(Path(run_train(run)["out"]))[0]


def test_a_study_saved_before_a_setting_existed_resumes_with_its_default(workspace):
    out = workspace / "old-study"
    out.mkdir()
    config = StudyConfig(out=str(out), resume=True)
    saved = {k: v for k, v in yaml.safe_load(to_yaml(config)).items() if k != "hidden_weight"}
    (out / "study_config.yaml").write_text(yaml.safe_dump(saved))
    study_command.check_resumable(config, out, growable=study_command.GROWABLE)
    with pytest.raises(LmdistillError, match="different hidden_weight"):
        study_command.check_resumable(StudyConfig(out=str(out), resume=True, hidden_weight=2.0), out,
                                      growable=study_command.GROWABLE)  # fmt: skip


def test_the_study_dry_run_counts_the_hidden_states_in_the_cache_s_disk(workspace):
    from lmdistill.commands.estimate import estimate_study

    settings = dict(out="x", teacher=str(workspace / "teacher"), hidden_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, intermediate_size=24, seq_len=16, batch_size=4, train_tokens=[256],
                    eval_points=2)  # fmt: skip
    plain = estimate_study(StudyConfig(**settings, arms=["guide+kd"]))
    with_hkd = estimate_study(StudyConfig(**settings, arms=["guide+kd", "guide+hkd"]))
    assert with_hkd.cache_disk - plain.cache_disk == 4 * 4 * 16 * (2 * 16) * 2  # blocks x L x H x d_S x 2 bytes
    assert "with hidden states 2 x 16 float16" in with_hkd.cache_how
