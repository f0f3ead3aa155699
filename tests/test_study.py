"""`lmdistill study` / `demo`: a tiny study through the CLI, resume, the gap-closed arithmetic, the shipped configs."""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import lmdistill_cache, save_tiny_teacher, write_corpus

from lmdistill.cli import main
from lmdistill.commands import study as study_module
from lmdistill.commands.study import run_dir, student_dir, write_results
from lmdistill.commands.study_report import device_text, headline_table
from lmdistill.commands.study_results import collect_results, record_path, teacher_record_path
from lmdistill.config import STUDY_ARMS, DemoConfig, StudyConfig, TrainConfig, load_yaml
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import token_multiplier
from lmdistill.storage import sha256_file
from lmdistill.train.loop import run_train

ROOT = Path(__file__).resolve().parents[1]
TINY_STUDY = {
    "arms": ["random", "guide+kd"],
    "seeds": [0, 1],
    "ablations": ["guide-random-projection"],
    "ablation_seeds": [0],
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 24,
    "train_tokens": [256],  # 4 steps of 4 x 16
    "seq_len": 16,
    "warmup_steps": 1,
    "lr": 3e-3,
    "top_k": 8,
    "val_fraction": 0.2,
    "eval_points": 2,
    "eval_tokens": 64,
    "precision": "fp32",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny study run once through the CLI: its directory, config file and printed output."""
    root = tmp_path_factory.mktemp("study")
    with lmdistill_cache(root / "cache"):
        corpus = str(write_corpus(root / "c"))
        # a teacher trained on the corpus, so that it is better than the `random` arm and the gap closed is defined
        teacher = TrainConfig(student=str(save_tiny_teacher(root / "teacher")), out=str(root / "teacher-run"),
                              data=[corpus], seq_len=16, batch_size=8, max_steps=40, lr=1e-2, warmup_steps=2,
                              precision="fp32", progress=False, eval_tokens=64, val_fraction=0.2)  # fmt: skip
        settings = dict(TINY_STUDY, teacher=run_train(teacher)["final"], data=[corpus])
        config_file = root / "study.yaml"
        config_file.write_text(yaml.safe_dump(settings))
        out = root / "out"
        code = main(["study", "--config", str(config_file), "--out", str(out), "--no-progress"])
        yield out, config_file, code


def committed_copy(out: Path, root: Path) -> Path:
    """What a repository keeps of the study in ``out``: its config and records, no run directories."""
    committed = root / "results"
    committed.mkdir()
    shutil.copy(out / "study_config.yaml", committed)
    shutil.copytree(out / "records", committed / "records")
    return committed


def trained_runs(out: Path) -> list[str]:
    """The runs a study trained into ``out``, as TOKENS/ARM/seed-S."""
    return sorted(path.relative_to(out / "runs").as_posix() for path in (out / "runs").glob("*/*/seed-*"))


@pytest.mark.integration
def test_tiny_study_writes_every_output_with_the_documented_keys(study):
    out, _, code = study
    assert code == 0
    for name in ("results.json", "report.md", "curves.png", "gap.png", "budgets.png", "study_config.yaml"):
        assert (out / name).is_file(), name
    assert teacher_record_path(out).is_file()
    for name in ("curves.png", "gap.png", "budgets.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results["teacher"]) >= {"val_loss", "val_ppl"}
    assert list(results["arms"]) == ["random", "guide+kd", "guide-random-projection"]
    for name, arm in results["arms"].items():
        assert set(arm) >= {"val_loss", "val_ppl", "gap_closed_loss", "gap_closed_ppl", "per_seed"}
        assert [run["seed"] for run in arm["per_seed"]] == ([0] if name == "guide-random-projection" else [0, 1])
        assert arm["val_loss"] == pytest.approx(sum(r["val_loss"] for r in arm["per_seed"]) / len(arm["per_seed"]))
        for run in arm["per_seed"]:
            assert run["tokens"] == 256 and [p["tokens"] for p in run["curve"]] == [128, 256]
            assert run["val_loss"] == run["scores"]["mixture"]
    assert results["arms"]["random"]["gap_closed_loss"] == 0.0
    # the kd arm read the shared cache, which holds exactly the blocks the runs read
    manifest = json.loads((out / "teacher-cache" / "256" / "manifest.json").read_text())
    assert manifest["num_blocks"] <= 4 * 4
    report = (out / "report.md").read_text()
    for name in results["arms"]:
        assert f"`{name}`" in report
    assert f"{results['teacher']['val_loss']:.3f}" in report


@pytest.mark.integration
def test_an_interrupted_study_resumes_without_redoing_finished_runs(study):
    out, config_file, _ = study
    finished = run_dir(out, 256, "random", 0) / "summary.json"
    before = (finished.stat().st_mtime_ns, json.loads((out / "results.json").read_text()))
    interrupted = run_dir(out, 256, "guide+kd", 1)
    shutil.rmtree(interrupted / "final")
    (interrupted / "summary.json").unlink()  # stopped after its last checkpoint, before the summary
    record_path(out, 256, "guide+kd", 1).unlink()
    shutil.rmtree(run_dir(out, 256, "guide-random-projection", 0))  # never started
    record_path(out, 256, "guide-random-projection", 0).unlink()
    (out / "results.json").unlink()

    args = ["study", "--config", str(config_file), "--out", str(out), "--no-progress"]
    assert main(args) == 2  # without --resume an existing study is refused
    assert main([*args, "--resume"]) == 0
    assert finished.stat().st_mtime_ns == before[0]
    after = json.loads((out / "results.json").read_text())
    for name in before[1]["arms"]:
        for old, new in zip(before[1]["arms"][name]["per_seed"], after["arms"][name]["per_seed"]):
            assert new["val_loss"] == old["val_loss"], name  # the rerun from scratch is deterministic too


@pytest.mark.integration
def test_a_fresh_machine_resumes_from_the_committed_records_and_only_rebuilds_a_run(study, tmp_path):
    out, config_file, _ = study
    committed = committed_copy(out, tmp_path)
    missing = record_path(committed, 256, "guide+kd", 1)
    original = json.loads(missing.read_text())
    missing.unlink()
    fresh = tmp_path / "fresh"
    args = ["study", "--config", str(config_file), "--out", str(fresh), "--results", str(committed), "--no-progress"]
    assert main(args) == 2  # a results directory holding a study is continued only with --resume
    assert main([*args, "--resume"]) == 0
    trained = trained_runs(fresh)
    assert trained == ["256/guide+kd/seed-1"]  # only the run without a record
    assert sorted(path.name for path in (fresh / "teacher-cache").iterdir()) == ["256"]
    rebuilt = json.loads(missing.read_text())
    assert rebuilt["weights_sha256"] == original["weights_sha256"] and rebuilt["scores"] == original["scores"]
    results = json.loads((committed / "results.json").read_text())
    assert results["runs_finished"] == results["runs_planned"] == 5

    rebuild = tmp_path / "rebuild"  # --only: one run's student, the same weights, no records or results
    assert main(["study", "--config", str(config_file), "--out", str(rebuild), "--only", "256/guide+kd/0"]) == 0
    weights = run_dir(rebuild, 256, "guide+kd", 0) / "final" / "model.safetensors"
    assert sha256_file(weights) == json.loads(record_path(out, 256, "guide+kd", 0).read_text())["weights_sha256"]
    assert not (rebuild / "records").exists() and not (rebuild / "results.json").exists()


@pytest.mark.integration
def test_a_launch_naming_fewer_arms_trains_those_and_keeps_the_whole_study(study, tmp_path):
    out, config_file, _ = study
    committed = committed_copy(out, tmp_path)
    record_path(committed, 256, "random", 1).unlink()
    fresh = tmp_path / "fresh"
    args = ["study", "--config", str(config_file), "--out", str(fresh), "--results", str(committed), "--no-progress"]
    assert main([*args, "--resume", "--arms", "random"]) == 0
    trained = trained_runs(fresh)
    assert trained == ["256/random/seed-1"]
    assert load_yaml(committed / "study_config.yaml", StudyConfig)["arms"] == ["random", "guide+kd"]
    results = json.loads((committed / "results.json").read_text())
    assert list(results["arms"]) == ["random", "guide+kd", "guide-random-projection"]
    assert results["runs_finished"] == results["runs_planned"] == 5


@pytest.mark.integration
def test_two_workers_share_the_missing_runs_by_their_place_in_the_study(study, tmp_path):
    out, config_file, _ = study
    committed = committed_copy(out, tmp_path)
    order = [f"{b}/{a}/seed-{s}" for b, a, s in StudyConfig(**load_yaml(config_file, StudyConfig), out="x").runs()]
    lost = ["256/guide+kd/seed-0", "256/guide-random-projection/seed-0"]  # places 1 and 2 of the study's order
    originals = {}
    for name in lost:
        budget, arm, seed = name.split("/")
        originals[name] = json.loads(record_path(committed, int(budget), arm, int(seed[5:])).read_text())
        record_path(committed, int(budget), arm, int(seed[5:])).unlink()
    for worker in (0, 1):
        fresh = tmp_path / f"worker-{worker}"
        args = ["study", "--config", config_file, "--out", fresh, "--results", committed, "--no-progress", "--resume",
                "--workers", 2, "--worker", worker]  # fmt: skip
        assert main([str(a) for a in args]) == 0
        trained = trained_runs(fresh)
        assert trained == [name for name in lost if order.index(name) % 2 == worker]
    for name in lost:
        budget, arm, seed = name.split("/")
        rebuilt = json.loads(record_path(committed, int(budget), arm, int(seed[5:])).read_text())
        assert rebuilt["weights_sha256"] == originals[name]["weights_sha256"]
    assert json.loads((committed / "results.json").read_text())["runs_finished"] == 5


@pytest.mark.integration
def test_a_worker_trains_runs_without_a_cache_while_another_builds_it(study, tmp_path, monkeypatch):
    """Workers sharing --out build a budget's teacher cache once: while another holds its lock, a kd run waits behind
    the runs that need no cache, and runs once the lock is free."""
    out, config_file, _ = study
    committed = committed_copy(out, tmp_path)
    for arm in ("guide+kd", "guide-random-projection"):  # places 1 (kd, reads the cache) and 2 (cross-entropy)
        record_path(committed, 256, arm, 0).unlink()
    fresh = tmp_path / "fresh"
    (fresh / "locks").mkdir(parents=True)
    other_worker = (fresh / "locks" / "teacher-cache-256").open("a")  # another worker, building the cache
    fcntl.flock(other_worker, fcntl.LOCK_EX)
    release = threading.Timer(60, other_worker.close)  # a study that waits at once fails below instead of hanging
    release.start()
    trained = []

    def train(config, **kwargs):
        trained.append(Path(config.out).relative_to(fresh / "runs").as_posix())
        if config.teacher_cache is None:
            other_worker.close()  # its cache is done: the lock is free
        return run_train(config, **kwargs)

    monkeypatch.setattr(study_module, "run_train", train)
    args = ["study", "--config", config_file, "--out", fresh, "--results", committed, "--no-progress", "--resume"]
    assert main([str(a) for a in args]) == 0
    release.cancel()
    assert trained == ["256/guide-random-projection/seed-0", "256/guide+kd/seed-0"]
    assert json.loads((committed / "results.json").read_text())["runs_finished"] == 5


@pytest.mark.integration
def test_a_study_resumed_with_auto_precision_keeps_the_precision_its_records_used(study, tmp_path, monkeypatch):
    out, config_file, _ = study
    monkeypatch.setattr("lmdistill.precision.fast_bf16", lambda device: True)  # this machine alone would pick bf16
    auto = tmp_path / "study.yaml"
    auto.write_text(config_file.read_text().replace("precision: fp32", "precision: auto"))
    committed = tmp_path / "results"
    committed.mkdir()
    (committed / "study_config.yaml").write_text((out / "study_config.yaml").read_text().replace(
        "precision: fp32", "precision: auto"))  # fmt: skip
    shutil.copytree(out / "records", committed / "records")  # every record ran in fp32
    missing = record_path(committed, 256, "random", 1)
    original = json.loads(missing.read_text())
    missing.unlink()
    args = ["study", "--config", str(auto), "--out", str(tmp_path / "fresh"), "--results", str(committed)]
    assert main([*args, "--resume", "--no-progress"]) == 0
    rebuilt = json.loads(missing.read_text())
    assert rebuilt["precision"] == "fp32" and rebuilt["weights_sha256"] == original["weights_sha256"]


@pytest.mark.integration
def test_resume_refuses_a_changed_study(study):
    out, config_file, _ = study
    with pytest.raises(LmdistillError, match="different lr"):
        from lmdistill.commands.study import run_study

        run_study(StudyConfig(**{**load_yaml(config_file, StudyConfig), "lr": 1e-3, "out": str(out)}, resume=True))


SHAPE = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8,
         "intermediate_size": 24, "vocab_size": 96}  # fmt: skip


def fake_run(results: Path, arm: str, seed: int, loss: float, budget: int = 40960, wiki: float | None = None) -> None:
    """The record of a finished run: mixture loss ``loss``, Wikipedia loss ``wiki`` (default: the same)."""
    scores = {"mixture": loss, "wikipedia": loss if wiki is None else wiki}
    record = {"budget": budget, "arm": arm, "seed": seed, "scores": scores, "score_tokens": {"wikipedia": 64},
              "mixture_weights": {"wikipedia": 1.0}, "tokens": budget, "seconds": 1.0, "tokens_per_s": 100.0,
              "precision": "fp32", "precision_reason": "set to fp32", "cpu": {"model": "cpu", "flags": ["avx2"]},
              "curve": [{"tokens": budget, "val_loss": loss, "val_ppl": math.exp(loss)}], "step0_val_loss": 9.0,
              "explained_variance": None, "student": {"shape": SHAPE, "parameters": 1e4}, "weights_sha256": "0" * 64,
              "teacher_cache_seconds": None}  # fmt: skip
    path = record_path(results, budget, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def fake_teacher(results: Path, loss: float, wiki: float | None = None) -> None:
    scores = {"mixture": loss, "wikipedia": loss if wiki is None else wiki}
    record = {"name": "tiny", "parameters": 1e5, "scores": scores, "score_tokens": {"wikipedia": 64},
              "mixture_weights": {"wikipedia": 1.0}, "curve_val_loss": loss, "seconds": 1.0}  # fmt: skip
    path = teacher_record_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_gap_closed_is_paired_by_seed_and_falls_back_to_the_mean_of_random(tmp_path):
    config = StudyConfig(
        out=str(tmp_path), arms=["random", "guide"], seeds=[0, 1], ablations=["guide-centered"], ablation_seeds=[2]
    )
    losses = {("random", 0): 5.0, ("random", 1): 6.0, ("guide", 0): 4.0, ("guide", 1): 5.0, ("guide-centered", 2): 4.75}
    for (arm, seed), loss in losses.items():
        fake_run(tmp_path, arm, seed, loss)
    fake_teacher(tmp_path, 3.0)
    arms = collect_results(config, tmp_path)["arms"]
    # guide: seed 0 closes (5 - 4) / (5 - 3) = 1/2, seed 1 closes (6 - 5) / (6 - 3) = 1/3
    assert [r["gap_closed_loss"] for r in arms["guide"]["per_seed"]] == pytest.approx([0.5, 1 / 3])
    assert arms["guide"]["gap_closed_loss"] == pytest.approx(5 / 12)
    assert arms["guide"]["gap_closed_loss_std"] == pytest.approx(math.sqrt(2) * (0.5 - 5 / 12))
    # seed 2 has no random run: the mean random loss 5.5 is the base, (5.5 - 4.75) / (5.5 - 3) = 0.3
    assert arms["guide-centered"]["gap_closed_loss"] == pytest.approx(0.3)
    assert arms["guide-centered"]["gap_closed_loss_std"] is None
    e = math.exp
    assert arms["guide"]["per_seed"][0]["gap_closed_ppl"] == pytest.approx((e(5) - e(4)) / (e(5) - e(3)))
    assert arms["random"]["gap_closed_loss"] == 0.0 and arms["random"]["gap_closed_loss_std"] == 0.0


def test_every_arm_has_its_description_in_the_report_table():
    score = {"loss": 5.0, "loss_std": None, "gap_closed": 0.5, "gap_closed_std": None}
    arm = {"seeds": [0], "per_seed": [{"seed": 0, "val_loss": 5.0}], "val_loss": 5.0, "val_loss_std": None,
           "val_ppl": 148.4, "val_ppl_std": None, "gap_closed_loss": 0.5, "gap_closed_loss_std": None,
           "gap_closed_ppl": 0.5, "gap_closed_ppl_std": None, "step0_val_loss": 9.0, "tokens": 256,
           "seconds": 6.0, "scores": {"mixture": score}}  # fmt: skip
    teacher = {"name": "t", "parameters": 1e6, "val_loss": 3.0, "val_ppl": 20.1, "scores": {"mixture": 3.0}}
    results = {"arms": dict.fromkeys(STUDY_ARMS, arm), "teacher": teacher, "config": {"final_eval_sources": []}}
    rows = headline_table(results).splitlines()[2:-1]
    assert all(arm.description for arm in STUDY_ARMS.values())
    assert [row.split(" | ")[1] for row in rows] == [arm.description for arm in STUDY_ARMS.values()]


def test_the_guide_freq_arm_counts_the_tokens_of_the_study_training_data():
    config = StudyConfig(out="study", data=["corpus"], seq_len=16, val_fraction=0.2)
    init = config.init_config(STUDY_ARMS["guide-freq"], 1, "students/x")
    assert (init.method, init.pca, init.seed) == ("guide", "frequency", 1)
    assert (init.data, init.seq_len, init.val_fraction) == (["corpus"], 16, 0.2)
    assert student_dir(Path("study"), STUDY_ARMS["guide-freq"], 1).name == "guide-frequency-seed1"


def test_report_only_reports_the_finished_runs_of_an_unfinished_study(tmp_path):
    config = StudyConfig(out=str(tmp_path), arms=["random", "guide"], seeds=[0, 1], report_only=True)
    fake_teacher(tmp_path, 3.0)
    with pytest.raises(LmdistillError, match="no run of the study"):
        collect_results(config, tmp_path, partial=True)
    fake_run(tmp_path, "random", 0, 5.0)
    fake_run(tmp_path, "guide", 0, 4.0)
    with pytest.raises(LmdistillError, match="run 40960/random/1 has not finished"):
        collect_results(config, tmp_path)
    results = collect_results(config, tmp_path, partial=True)
    assert (results["runs_finished"], results["runs_planned"]) == (2, 4)
    assert [r["seed"] for r in results["arms"]["guide"]["per_seed"]] == [0]


def test_demo_config_file_is_the_demo_and_the_shipped_study_is_valid():
    assert StudyConfig(**load_yaml(ROOT / "configs" / "demo.yaml", StudyConfig)) == DemoConfig().study_config()
    study = StudyConfig(**load_yaml(ROOT / "configs" / "study-smollm2.yaml", StudyConfig))
    assert study.seeds == [0, 1, 2] and len(study.arms) == 5 and len(study.ablations) == 4
    assert study.steps(study.train_tokens[0]) * study.batch_size * study.seq_len >= 300_000
    gpu = StudyConfig(**load_yaml(ROOT / "configs" / "study-smollm2-gpu.yaml", StudyConfig))
    assert [run[1:] for run in gpu.runs()] == [run[1:] for run in study.runs()]
    assert gpu.steps(gpu.train_tokens[0]) * gpu.batch_size * gpu.seq_len >= 50_000_000
    budgets = StudyConfig(**load_yaml(ROOT / "configs" / "study-budgets.yaml", StudyConfig))
    assert min(budgets.train_tokens) >= 300_000 and max(budgets.train_tokens) >= 1_200_000
    assert {"random", "guide", "kd", "guide+kd"} <= set(budgets.arms) and len(budgets.seeds) >= 2
    assert budgets.final_eval_tokens >= 100_000 and budgets.final_eval_sources == ["wikipedia"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arms": ["guide", "gide"]}, "unknown arms \\['gide'\\]"),
        ({"ablations": ["guide"]}, "once in --arms and --ablations"),
        ({"seeds": [0, 0]}, "distinct non-negative seeds"),
        ({"eval_points": 50, "train_tokens": [1024, 40960]}, "exceeds the 1 optimizer steps"),
        ({"train_tokens": [1024, 1024]}, "distinct positive budgets"),
        ({"train_tokens": []}, "distinct positive budgets"),
        ({"only": ["40960/guide/7"]}, "--only: 40960/guide/7 is not a run of this study .*40960/random/0"),
        ({"kd_weight": 1.5}, "--kd-weight must be in"),
    ],
)
def test_invalid_study_configs_are_refused_with_the_option_named(overrides, message):
    with pytest.raises(LmdistillError, match=message):
        StudyConfig(out="x", **overrides)


@pytest.mark.integration
def test_the_precision_and_threads_the_runs_used_are_recorded_and_reported(study):
    out, _, _ = study
    results = json.loads((out / "results.json").read_text())
    assert (results["environment"]["precision"], results["environment"]["precision_reason"]) == ("fp32", "set to fp32")
    for path in (out / "environment.json", run_dir(out, 256, "random", 0) / "environment.json"):
        assert json.loads(path.read_text())["precision"] == "fp32", path
    assert json.loads(record_path(out, 256, "random", 0).read_text())["cpu_threads"] == torch.get_num_threads()
    report = (out / "report.md").read_text()
    assert "runs in fp32 (set to fp32)" in report and "Warning" not in report


@pytest.mark.parametrize("teacher_loss", [5.5, 9.0])
def test_a_teacher_not_better_than_random_leaves_the_gap_closed_undefined(tmp_path, teacher_loss):
    config = StudyConfig(
        out=str(tmp_path), arms=["random", "guide"], seeds=[0, 1], ablations=["guide-centered"], ablation_seeds=[2]
    )
    losses = {("random", 0): 5.0, ("random", 1): 6.0, ("guide", 0): 4.0, ("guide", 1): 5.75, ("guide-centered", 2): 4.5}
    for (arm, seed), loss in losses.items():
        fake_run(tmp_path, arm, seed, loss)
    fake_teacher(tmp_path, teacher_loss)
    results = write_results(config)
    arms = json.loads((tmp_path / "results.json").read_text())["arms"]
    assert results["arms"] == arms
    if teacher_loss == 5.5:  # seed 0: the random run (5.0) beats the teacher; seed 1 (6.0) does not
        assert [r["gap_closed_loss"] for r in arms["guide"]["per_seed"]] == [None, pytest.approx(0.5)]
        assert arms["guide"]["per_seed"][0]["gap_closed_ppl"] is None
        assert arms["guide-centered"]["gap_closed_loss"] is None  # against the mean random loss, 5.5: no gap
    else:
        assert all(r[f"gap_closed_{f}"] is None for a in arms.values() for r in a["per_seed"] for f in ("loss", "ppl"))
    for name, arm in arms.items():
        assert arm["gap_closed_loss"] is None and arm["gap_closed_loss_std"] is None, name
        # the mean of the random perplexities (275.9) is above the teacher's (244.7): that form has a gap
        assert (arm["gap_closed_ppl"] is None) == (name != "guide-centered" or teacher_loss == 9.0), name
    report = (tmp_path / "report.md").read_text()
    seeds = "0" if teacher_loss == 5.5 else "0, 1"
    assert f"**Warning: gap closed undefined.** The teacher's held-out loss ({teacher_loss:.3f}) is not below" in report
    assert f"`random` run of seed(s) {seeds}:" in report and "null in results.json" in report
    teacher_row = next(line for line in report.splitlines() if line.startswith("| teacher |"))
    assert "100 %" not in teacher_row and "| — | — |" in teacher_row
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_multiplier_interpolates_random_in_log_tokens_and_bounds_what_lies_outside():
    assert token_multiplier([100, 400], [5.0, 4.0], 4.5, 100) == (pytest.approx(2.0), "within")  # sqrt(100 * 400)
    assert token_multiplier([100, 400], [5.0, 4.0], 5.0, 100) == (pytest.approx(1.0), "within")
    assert token_multiplier([100, 400], [5.0, 4.0], 3.9, 400) == (1.0, "above")
    assert token_multiplier([100, 400], [5.0, 4.0], 5.2, 400) == (0.25, "below")
    assert token_multiplier([1, 10, 100], [5.0, 4.0, 3.0], 3.5, 10) == (pytest.approx(10**0.5), "within")


def test_budgets_hold_every_arm_per_budget_with_token_multipliers_and_paired_extensions(tmp_path):
    config = StudyConfig(out=str(tmp_path), arms=["random", "guide", "guide-freq"], seeds=[0, 1],
                         train_tokens=[40960, 163840], final_eval_sources=["wikipedia"])  # fmt: skip
    losses = {  # (budget, arm, seed) -> (mixture, wikipedia)
        (40960, "random", 0): (5.0, 6.0), (40960, "random", 1): (5.2, 6.2),
        (163840, "random", 0): (4.0, 5.0), (163840, "random", 1): (4.2, 5.2),
        (40960, "guide", 0): (4.5, 5.0), (40960, "guide", 1): (4.7, 5.2),
        (163840, "guide", 0): (3.9, 4.6), (163840, "guide", 1): (4.1, 4.8),
        (40960, "guide-freq", 0): (4.0, 4.0), (40960, "guide-freq", 1): (4.6, 5.2),
    }  # fmt: skip
    for (budget, arm, seed), (loss, wiki) in losses.items():
        fake_run(tmp_path, arm, seed, loss, budget, wiki)
    fake_teacher(tmp_path, 3.0, 3.0)
    results = write_results(StudyConfig(**{**vars(config), "report_only": True}), partial=True)
    assert list(results["budgets"]) == ["40960", "163840"] and results["arms"] == results["budgets"]["163840"]
    small, large = results["budgets"]["40960"], results["budgets"]["163840"]
    # guide at 40960: (5 - 4.5) / (5 - 3) = 25 % and (5.2 - 4.7) / (5.2 - 3) = 22.7 % on the mixture
    assert [r["gap_closed_loss"] for r in small["guide"]["per_seed"]] == pytest.approx([0.25, 0.5 / 2.2])
    assert small["guide"]["scores"]["wikipedia"]["gap_closed"] == pytest.approx((1 / 3 + 1 / 3.2) / 2)
    # random reaches 4.5 halfway between 40960 and 163840 in log-tokens: 2x; guide at the large budget is beyond
    assert small["guide"]["token_multiplier_per_seed"][0] == {"seed": 0, "value": pytest.approx(2.0), "range": "within"}
    assert small["guide"]["token_multiplier"] == pytest.approx(2.0)
    assert large["guide"]["token_multiplier"] is None
    assert {e["range"] for e in large["guide"]["token_multiplier_per_seed"]} == {"above"}
    # guide-freq against guide, paired by seed: seed 0 closes 50 % vs 25 %, seed 1 (5.2 - 4.6) / 2.2 vs 0.5 / 2.2
    versus = small["guide-freq"]["vs_extended"]
    assert versus["arm"] == "guide" and versus["seeds"] == [0, 1]
    assert versus["sets"]["mixture"]["per_seed"] == pytest.approx([0.25, 0.1 / 2.2])
    assert versus["sets"]["mixture"]["ratio"] == pytest.approx((0.5 + 0.6 / 2.2) / (0.25 + 0.5 / 2.2))
    assert "vs_extended" not in large.get("guide-freq", {}) and "guide-freq" not in large
    report = (tmp_path / "report.md").read_text()
    assert "## Gap closed on the training mixture, by budget" in report and "| `guide-freq` vs `guide` |" in report
    assert "## 40,960 training tokens per run" in report and "wikipedia: gap closed" in report
    assert (tmp_path / "budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_names_the_hidden_state_arms_and_compares_guide_hkd_with_guide_kd_by_seed(tmp_path):
    config = StudyConfig(out=str(tmp_path), arms=["random", "guide+kd", "guide+hkd"], seeds=[0, 1], hidden_weight=0.5)
    for seed in (0, 1):
        fake_run(tmp_path, "random", seed, 5.0)
        fake_run(tmp_path, "guide+kd", seed, 4.0)
        fake_run(tmp_path, "guide+hkd", seed, 3.5 + 0.1 * seed)
    fake_teacher(tmp_path, 3.0)
    results = write_results(config)
    comparison = results["budgets"]["40960"]["guide+hkd"]["vs_extended"]
    assert comparison["arm"] == "guide+kd" and comparison["seeds"] == [0, 1]
    assert comparison["sets"]["mixture"]["per_seed"] == pytest.approx([0.25, 0.2])
    report = (tmp_path / "report.md").read_text()
    assert "Hidden-state arms (`guide+hkd`) add 0.5 × (1 − cosine)" in report


def test_the_report_names_the_device_with_its_thread_count_in_words():
    assert device_text({"gpu": None, "cpu_threads": 1}) == "CPU (1 thread)"
    assert device_text({"gpu": None, "cpu_threads": 2}) == "CPU (2 threads)"
    assert device_text({"gpu": "NVIDIA H200", "cpu_threads": 16}) == "NVIDIA H200"
