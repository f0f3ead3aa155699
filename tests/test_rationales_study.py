"""`rationales study`: arms and runs, smaller k as prefixes of one extraction, the rationale-word share, a tiny study
through the command line (results, report, plot), resume, refusals, and `rationales eval` of a teacher spec."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_teacher, tiny_teacher, tiny_tokenizer

from lmdistill.cli import main
from lmdistill.commands import rationales_eval as evaluate_module
from lmdistill.commands import rationales_study as study_module
from lmdistill.commands.rationales_extract import run_extract
from lmdistill.commands.rationales_report import task_table, write_plot
from lmdistill.commands.rationales_study import (
    check_study_resumable,
    random_file,
    rationale_file,
    rationale_word_share,
    rationale_word_share_any_choice,
    run_dir,
    task_dir,
    word_in,
)
from lmdistill.commands.study import check_resumable
from lmdistill.config import (
    RATIONALE_STUDY_ARMS,
    RationaleExtractConfig,
    RationaleStudyConfig,
    StudyConfig,
    load_yaml,
)
from lmdistill.errors import LmdistillError
from lmdistill.rationales.records import random_records, read_records, write_first_words
from lmdistill.rationales.tasks import SHARED_DATA_ENV, TASKS, Example, load_task

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# Words of the tiny tokenizer (conftest.WORDS, single letters, digits), in the shared data's formats.
SVAMP_TRAIN = [
    {"input": "it was 3 and 4 on the b", "label": "( 3.0 + 4.0 )"},
    {"input": "x had 9 and lost 2", "label": "( 9.0 - 2.0 )"},
    {"input": "7 rows of 5 c", "label": "( 7.0 * 5.0 )"},
    {"input": "8 d in 2 e", "label": "( 8.0 / 2.0 )"},
    {"input": "q is 6 and r is 1", "label": "( 6.0 + 1.0 )"},
    {"input": "from 5 take 3 f", "label": "( 5.0 - 3.0 )"},
]
SVAMP_TEST = [
    {"input": "it is 2 and 2", "label": "( 2.0 + 2.0 )"},
    {"input": "6 g by 3", "label": "( 6.0 / 3.0 )"},
]
SVAMP_COT = [f"{r['input']} so it is {r['label']} . The answer is {r['label']}" for r in SVAMP_TRAIN]


def cqa_row(i: int, question: str, choices: list[str], answer: str) -> dict:
    return {
        "id": f"c{i}",
        "question": question,
        "choices": choices,
        "answer": answer,
        "abstractive_explanation": f"{answer} is the one",
    }


CQA_TRAIN = [
    cqa_row(0, "where is the b of the c", ["b", "c", "d"], "c"),
    cqa_row(1, "what is x to y", ["x", "y"], "y"),
    cqa_row(2, "this is a test of the h", ["h", "k", "m"], "h"),
    cqa_row(3, "it was on the n by the p", ["n", "p"], "n"),
    cqa_row(4, "be at the r from the s", ["r", "s", "t"], "t"),
    cqa_row(5, "w and v are u", ["u", "v", "w"], "u"),
]
CQA_TEST = [cqa_row(10, "the b is in c", ["b", "c"], "b"), cqa_row(11, "x y z", ["x", "z", "y"], "z")]
CQA_COT = [f"{r['question']} . So the answer is ({r['answer']}) {r['answer']}" for r in CQA_TRAIN]

TINY = {
    "tasks": ["svamp", "cqa"],
    "saliency_ks": [1, 2],
    "seeds": [0],
    "max_steps": 2,
    "batch_size": 2,
    "lr": 1e-3,
    "val_fraction": 0.2,
    "max_new_tokens": 3,
    "log_every": 1,
    "precision": "fp32",
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def made_up_shared_data(root: Path) -> Path:
    for task, train, test, cot in (
        ("svamp", SVAMP_TRAIN, SVAMP_TEST, SVAMP_COT),
        ("cqa", CQA_TRAIN, CQA_TEST, CQA_COT),
    ):
        write_jsonl(root / task / f"{task}_train.json", train)
        write_jsonl(root / task / f"{task}_test.json", test)
        (root / task / "llm").mkdir()
        (root / task / "llm" / "train_CoT_0.json").write_text(json.dumps(cot))
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny teacher and student, made-up SVAMP and CQA data as the shared data, and a study config file."""
    root = tmp_path_factory.mktemp("rstudy")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SHARED_DATA_ENV, str(made_up_shared_data(root / "reasoning")))
        save_tiny_teacher(root / "teacher")
        save_tiny_teacher(root / "teacher-cqa", num_hidden_layers=3)
        save_tiny_teacher(root / "student", num_hidden_layers=2)
        config = dict(
            TINY,
            teacher=str(root / "teacher"),
            task_teachers=[f"cqa={root / 'teacher-cqa'}"],
            student=str(root / "student"),
        )
        (root / "study.yaml").write_text(yaml.safe_dump(config))
        yield root


def study(ws: Path, out: str, *args) -> int:
    return main(["rationales", "study", "--config", str(ws / "study.yaml"), "--out", str(ws / out), "--no-progress",
                 *map(str, args)])  # fmt: skip


@pytest.fixture(scope="module")
def tiny_study(ws):
    """The tiny study, run once through the command line."""
    assert study(ws, "study") == 0
    return ws / "study"


# ---------------------------------------------------------------------------------------------------- the config


def test_arms_expand_per_task_and_runs_go_seed_by_seed():
    config = RationaleStudyConfig(out="x", student="s", tasks=["svamp", "cqa", "gsm-symbolic"], saliency_ks=[5, 1])
    assert config.arm_names("svamp") == ["finetune", "saliency-k1", "saliency-k5", "step-by-step"]
    assert config.arm_names("cqa") == ["finetune", "saliency-k1", "saliency-k5", "step-by-step", "gold"]
    assert config.arm_names("gsm-symbolic") == ["finetune", "saliency-k1", "saliency-k5", "gold"]
    runs = config.runs()
    assert len(runs) == 3 * (4 + 5 + 4) and runs[0] == ("svamp", "finetune", 0) and runs[13] == ("svamp", "finetune", 1)
    assert [seed for _, _, seed in runs] == sorted(seed for _, _, seed in runs)
    assert [config.saliency_k(a) for a in config.arm_names("cqa")] == [None, 1, 5, None, None]
    assert [config.rationale_source(a) for a in config.arm_names("cqa")] == ["none", "file", "file", "llm", "gold"]
    train = config.train_config("cqa", "finetune", 2, out="r")
    assert (train.rationale_source, train.lambda_rationale, train.seed, train.rationales) == ("none", 0.0, 2, None)
    train = config.train_config("cqa", "saliency-k5", 0, out="r", rationales="k5.jsonl")
    assert (train.rationale_source, train.lambda_rationale, train.rationales) == ("file", 1.0, "k5.jsonl")
    extract = config.extract_config("svamp", out="k.jsonl")
    assert (extract.k, extract.order, extract.split) == (5, "score", "train")
    assert config.eval_config("svamp", model="m", out="e.json").split == "test"
    assert extract.teacher == config.teacher_of("svamp") == "default"
    for precision in ("fp32", "bf16"):  # the saliency teacher runs in the study's precision, as its training does
        fixed = RationaleStudyConfig(out="x", student="s", tasks=["svamp"], arms=["saliency"], precision=precision)
        assert fixed.extract_config("svamp", out="k.jsonl").teacher_dtype == precision
        assert fixed.train_config("svamp", "saliency-k5", 0, out="r", rationales="k5.jsonl").precision == precision
    config = RationaleStudyConfig(out="x", student="s", teacher="t", task_teachers=["cqa=runs/t=cqa"])
    assert (config.teacher_of("svamp"), config.teacher_of("cqa")) == ("t", "runs/t=cqa")
    assert config.extract_config("cqa", out="k.jsonl").teacher == "runs/t=cqa"


def test_esnli_runs_saliency_random_and_gold_arms_and_may_evaluate_on_its_validation_split():
    arms = ["finetune", "saliency", "random", "step-by-step", "gold"]
    config = RationaleStudyConfig(out="x", student="s", tasks=["esnli", "svamp"], arms=arms, saliency_ks=[1, 3, 5, 10])
    assert config.arm_names("esnli") == [
        "finetune", "saliency-k1", "saliency-k3", "saliency-k5", "saliency-k10", "random-k5", "gold",
    ]  # fmt: skip
    assert config.arm_names("svamp") == ["finetune", *config.arm_names("esnli")[1:6], "step-by-step"]
    assert [config.arm_k(a) for a in config.arm_names("esnli")] == [None, 1, 3, 5, 10, 5, None]
    assert [config.saliency_k(a) for a in config.arm_names("esnli")] == [None, 1, 3, 5, 10, None, None]
    assert [config.arm_kind(a) for a in ("random-k5", "saliency-k10", "gold")] == ["random", "saliency", "gold"]
    assert [config.rationale_source(a) for a in ("random-k5", "saliency-k1", "gold")] == ["file", "file", "gold"]
    assert config.eval_config("esnli", model="m", out="e.json").split == "test"
    assert config.train_config("esnli", "random-k5", 0, out="r", rationales="r5.jsonl").rationales == "r5.jsonl"
    assert RationaleStudyConfig(out="x", student="s").arms == ["finetune", "saliency", "step-by-step", "gold"]
    tuning = RationaleStudyConfig(out="x", student="s", tasks=["esnli"], arms=arms[:3], eval_split="validation")
    assert tuning.eval_config("esnli", model="m", out="e.json").split == "validation"
    assert tuning.train_config("esnli", "finetune", 0, out="r").split == "train"  # validation is not in train
    assert RationaleStudyConfig(out="x", student="s", random_ks=[3, 1], arms=["random"]).arm_names("cqa") == [
        "random-k1", "random-k3",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arms": ["finetune", "salience"]}, r"unknown arms \['salience'\]"),
        ({"arms": ["random"], "random_ks": []}, "--random-ks must be distinct positive word counts"),
        ({"random_ks": [0]}, "--random-ks must be distinct positive word counts"),
        ({"random_seed": -1}, "--random-seed must be non-negative"),
        ({"eval_split": "validation"}, r"--eval-split validation: tasks \['svamp', 'cqa'\] have no such split"),
        ({"tasks": ["esnli"], "arms": ["step-by-step"]}, "step-by-step applies to none of --tasks esnli"),
        ({"tasks": ["anli1"]}, r"unknown tasks \['anli1'\]"),
        ({"saliency_ks": [0, 3]}, "distinct positive word counts"),
        ({"saliency_ks": [3, 3]}, "distinct positive word counts"),
        ({"tasks": ["gsm-symbolic"], "arms": ["finetune", "step-by-step"]}, "step-by-step applies to none of --tasks"),
        ({"tasks": ["svamp"], "arms": ["gold"]}, "gold applies to none of --tasks svamp"),
        ({"seeds": [1, 1]}, "distinct non-negative seeds"),
        ({"train_limit": 0}, "--train-limit must be at least 1"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
        ({"student": None}, "--student is required"),
        ({"task_teachers": ["cqa"]}, "distinct TASK=MODEL pairs"),
        ({"task_teachers": ["cqa=a", "cqa=b"]}, "distinct TASK=MODEL pairs"),
        (
            {"tasks": ["svamp"], "arms": ["finetune"], "task_teachers": ["cqa=a"]},
            r"names tasks not in --tasks: \['cqa'\]",
        ),
    ],
)
def test_invalid_study_configs_are_refused(overrides, message):
    with pytest.raises(LmdistillError, match=message):
        RationaleStudyConfig(**{"out": "x", "student": "s", **overrides})


def test_the_shipped_config_loads():
    config = RationaleStudyConfig(**load_yaml(ROOT / "configs" / "rationales-svamp-cqa.yaml", RationaleStudyConfig))
    assert config.tasks == ["svamp", "cqa"] and config.seeds == [0, 1, 2] and config.saliency_ks == [1, 3, 5, 7, 10]
    assert config.arms == ["finetune", "saliency", "step-by-step", "gold"] and config.teacher == "default"
    assert config.teacher_of("cqa") == "runs/teacher-choice/ft-cqa/final"
    assert config.teacher_of("svamp") == "runs/teacher-choice/ft-svamp/final"
    assert (config.max_steps, config.batch_size, config.lr, config.method) == (100, 8, 1e-3, "saliency")
    assert (config.train_limit, config.test_limit) == (800, None)
    check = RationaleStudyConfig(**load_yaml(ROOT / "configs" / "rationales-svamp-ws12.yaml", RationaleStudyConfig))
    assert check.arm_names("svamp") == ["finetune", "saliency-k5", "step-by-step"] and len(check.runs()) == 6
    assert (check.teacher_of("svamp"), check.train_limit) == (config.teacher_of("svamp"), config.train_limit)
    assert config.arm_names("svamp")[-1] == "step-by-step" and config.arm_names("cqa")[-1] == "gold"
    assert len(config.runs()) == 3 * (7 + 8)


def test_check_resumable_lets_only_the_growable_lists_change(tmp_path):
    config = StudyConfig(out=str(tmp_path), arms=["random"], seeds=[0])
    (tmp_path / "study_config.yaml").write_text(yaml.safe_dump(vars(config)))
    grown = StudyConfig(out=str(tmp_path), arms=["random", "guide"], seeds=[0, 1], resume=True)
    check_resumable(grown, tmp_path, growable=("arms", "seeds"))
    with pytest.raises(LmdistillError, match="different arms"):
        check_resumable(grown, tmp_path, growable=("seeds",))
    with pytest.raises(LmdistillError, match="pass --resume"):
        check_resumable(StudyConfig(out=str(tmp_path)), tmp_path, growable=("arms", "seeds"))


def test_the_ig_baseline_reaches_the_extraction_and_matters_on_resume_only_for_integrated_gradients(tmp_path):
    def config(**overrides) -> RationaleStudyConfig:
        return RationaleStudyConfig(student="s", out=str(tmp_path), resume=True, **overrides)

    assert config().extract_config("cqa", out="r.jsonl").ig_baseline == "token"
    assert config(ig_baseline="zero").extract_config("cqa", out="r.jsonl").ig_baseline == "zero"
    for method in ("saliency", "integrated-gradients"):
        (tmp_path / "study_config.yaml").write_text(yaml.safe_dump(vars(config(method=method))))
        if method == "saliency":  # the IG settings do not shape saliency rationales
            check_study_resumable(config(method=method, ig_steps=7, ig_baseline="zero"), tmp_path)
        else:
            with pytest.raises(LmdistillError, match="different ig_baseline"):
                check_study_resumable(config(method=method, ig_baseline="zero"), tmp_path)


# ---------------------------------------------------------------------------------------------------- rationales


def test_smaller_k_as_prefixes_equal_a_direct_extraction(ws, tmp_path):
    """The study extracts once at the largest k: each smaller k is each record's first k words, exactly what an
    extraction at that k writes (scores, rationale text and all)."""
    for task in ("svamp", "cqa"):
        common = dict(teacher=str(ws / "teacher"), task=task, max_new_tokens=3, batch_size=4, progress=False)
        largest = tmp_path / f"{task}-k4.jsonl"
        run_extract(RationaleExtractConfig(**common, k=4, out=str(largest)))
        assert max(len(r["words"]) for r in read_records(largest)) == 4
        for k in (1, 2, 3):
            derived, direct = tmp_path / f"{task}-derived-k{k}.jsonl", tmp_path / f"{task}-direct-k{k}.jsonl"
            assert write_first_words(largest, derived, k) == len(SVAMP_TRAIN)
            run_extract(RationaleExtractConfig(**common, k=k, out=str(direct)))
            assert read_records(derived) == read_records(direct), (task, k)
            assert all(len(r["words"]) <= k for r in read_records(derived))
            # the derived file resumes as an extraction at k would: its settings say k
            assert run_extract(RationaleExtractConfig(**common, k=k, out=str(derived)))["new"] == 0
    by_input = tmp_path / "input-order.jsonl"
    run_extract(RationaleExtractConfig(**common, k=4, order="input", out=str(by_input)))
    with pytest.raises(LmdistillError, match="only with --order score"):
        write_first_words(by_input, tmp_path / "x.jsonl", 2)


def test_rationale_word_share_by_hand():
    examples = {
        "a": Example(id="a", inputs={"input": "..."}, label="math problem", choices=("math problem", "fridge", "oven")),
        "b": Example(id="b", inputs={"input": "..."}, label="( 84.0 / 2.0 )"),
    }
    records = [
        # math: in the label; Fridge: a choice, any case; fridges, cold: nowhere; prob: only part of a word
        {
            "id": "a",
            "label": "math problem",
            "words": [["math", 3.0], ["Fridge", 2.0], ["fridges", 1.0], ["cold", 0.5], ["prob", 0.1]],
        },  # fmt: skip
        # 84 and 2 occur in the equation; 42 does not
        {"id": "b", "label": "( 84.0 / 2.0 )", "words": [["84", 2.0], ["42", 1.0], ["2", 0.5]]},
    ]
    assert rationale_word_share_any_choice(records, examples) == pytest.approx(4 / 8)
    assert rationale_word_share_any_choice(records[:1], examples) == pytest.approx(2 / 5)
    assert rationale_word_share_any_choice([], examples) is None
    # the paper's measure: the gold answer only (Fridge, only a choice, no longer counts)
    assert rationale_word_share(records) == pytest.approx(3 / 8)
    assert rationale_word_share(records[:1]) == pytest.approx(1 / 5)
    assert rationale_word_share([]) is None
    assert word_in("84", "( 84.0 / 2.0 )") and not word_in("8", "( 84.0 / 2.0 )") and not word_in("4.0", "84.0")


def test_every_arm_kind_has_a_description_in_the_report_and_a_line_in_the_plot(tmp_path):
    def arm(k: int | None) -> dict:
        return {"k": k, "accuracy_mean": 0.5, "accuracy_std": 0.1, "per_seed": [{"accuracy": 0.5}], "seeds": [0, 1]}

    arms = {name: arm(None) for name in RATIONALE_STUDY_ARMS if name not in ("saliency", "random")}
    task = {"arms": {**arms, "saliency-k3": arm(3), "random-k3": arm(3)}, "teacher": None, "teacher_accuracy": 0.8}
    table = task_table(task)
    for name, kind in RATIONALE_STUDY_ARMS.items():
        assert kind.description and kind.description.format(k=3) in table
        assert (kind.style is None) == (name in ("saliency", "random"))  # the saliency and random arms: against k
    write_plot({"tasks": {"svamp": task}}, tmp_path / "accuracy_vs_k.png")
    assert (tmp_path / "accuracy_vs_k.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------- the study


@pytest.mark.integration
def test_a_tiny_study_writes_results_report_and_plot(tiny_study, ws, capsys):
    out = tiny_study
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"tasks", "config", "environment"} and list(results["tasks"]) == ["svamp", "cqa"]
    assert results["runs_finished"] == results["runs_planned"] == 9
    expected = {
        "svamp": ["finetune", "saliency-k1", "saliency-k2", "step-by-step"],
        "cqa": ["finetune", "saliency-k1", "saliency-k2", "step-by-step", "gold"],
    }
    for task, arms in expected.items():
        result = results["tasks"][task]
        teacher = json.loads((task_dir(out, task) / "teacher_eval.json").read_text())
        assert result["teacher_accuracy"] == teacher["accuracy"] and teacher["total"] == 2
        # --task-teachers: CQA's teacher evaluates and extracts CQA; SVAMP has --teacher
        teacher_dir = str(ws / ("teacher-cqa" if task == "cqa" else "teacher"))
        assert teacher["model"] == result["teacher"]["model"] == teacher_dir
        extraction = yaml.safe_load(Path(str(rationale_file(out, task, 2)) + ".config.yaml").read_text())
        assert extraction["teacher"] == teacher_dir
        assert list(result["arms"]) == arms
        for name, arm in result["arms"].items():
            assert set(arm) >= {"accuracy_mean", "accuracy_std", "k", "per_seed"}
            assert arm["k"] == (int(name[-1]) if name.startswith("saliency") else None)
            assert arm["accuracy_std"] is None  # one seed
            (run,) = arm["per_seed"]
            assert set(run) == {"seed", "accuracy", "correct", "total", "val_loss", "seconds"}
            assert run["total"] == 2 and arm["accuracy_mean"] == run["accuracy"] == run["correct"] / 2
            evaluation = json.loads((run_dir(out, task, name, 0) / "eval.json").read_text())
            assert evaluation["accuracy"] == run["accuracy"] and evaluation["split"] == "test"
            manifest = json.loads((run_dir(out, task, name, 0) / "data_manifest.json").read_text())
            assert manifest["rationale_source"] == RationaleStudyConfig.rationale_source(name)
            assert manifest["lambda_rationale"] == (0.0 if name == "finetune" else 1.0)
            assert manifest["train_with_rationale"] == (0 if name == "finetune" else manifest["train_examples"])
            if arm["k"]:
                assert manifest["rationales"] == str(rationale_file(out, task, arm["k"]))
            assert not (run_dir(out, task, name, 0) / "checkpoints").exists()  # removed once evaluated
        # rationales: k = 2 extracted, k = 1 its prefix; the word share recomputed from the files
        k1, k2 = (read_records(rationale_file(out, task, k)) for k in (1, 2))
        assert [r["words"][:1] for r in k2] == [r["words"] for r in k1] and len(k1) == 6
        examples = {e.id: e for e in load_task(task, "train")}
        for k, records in (("1", k1), ("2", k2)):
            assert result["rationale_word_share"][k] == pytest.approx(rationale_word_share(records))
            any_choice = rationale_word_share_any_choice(records, examples)
            assert result["rationale_word_share_any_choice"][k] == pytest.approx(any_choice)
    # the step-by-step rationales are the 540B model's: the training data holds them
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Rationale study of `{ws / 'student'}`") and f"cqa={ws / 'teacher-cqa'}" in report
    for name in expected["cqa"]:
        assert f"| `{name}` |" in report
    assert report.count("| teacher |") == 2 and "## SVAMP" in report and "gold answer or one of the choices" in report
    assert "occur in the gold answer (the paper's measure" in report
    assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "study_config.yaml").read_text())["saliency_ks"] == [1, 2]


@pytest.mark.integration
def test_resume_retrains_nothing_and_grown_seeds_run_only_the_new_runs(tiny_study, ws, monkeypatch, capsys):
    trained, evaluated = [], []
    real_train, real_eval = study_module.run_rationale_train, study_module.run_rationale_eval

    def train(config):
        trained.append((config.task, Path(config.out).parent.name, config.seed))
        return real_train(config)

    def evaluate(config):
        evaluated.append(config.model)
        return real_eval(config)

    monkeypatch.setattr(study_module, "run_rationale_train", train)
    monkeypatch.setattr(study_module, "run_rationale_eval", evaluate)
    before = json.loads((tiny_study / "results.json").read_text())
    assert study(ws, "study", "--resume") == 0
    assert trained == [] and evaluated == []
    after = json.loads((tiny_study / "results.json").read_text())
    assert after["tasks"] == before["tasks"]
    assert "report:" in capsys.readouterr().out

    assert study(ws, "study", "--resume", "--seeds", 0, 1, "--arms", "finetune") == 0
    assert trained == [("svamp", "finetune", 1), ("cqa", "finetune", 1)] and len(evaluated) == 2
    grown = json.loads((tiny_study / "results.json").read_text())
    # a launch naming one arm trains it and keeps the study's other arms in its config and results
    assert load_yaml(tiny_study / "study_config.yaml", RationaleStudyConfig)["seeds"] == [0, 1]
    for task in ("svamp", "cqa"):
        assert list(grown["tasks"][task]["arms"]) == list(before["tasks"][task]["arms"])
        arm = grown["tasks"][task]["arms"]["finetune"]
        accuracies = [r["accuracy"] for r in arm["per_seed"]]
        assert [r["seed"] for r in arm["per_seed"]] == [0, 1]
        assert arm["accuracy_mean"] == pytest.approx(statistics.mean(accuracies))
        assert arm["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert arm["per_seed"][0] == before["tasks"][task]["arms"]["finetune"]["per_seed"][0]

    # --report-only rewrites the outputs of the study (seeds 0 and 1 now) from what has finished, training nothing
    (tiny_study / "results.json").unlink()
    assert study(ws, "study", "--report-only") == 0
    assert trained == [("svamp", "finetune", 1), ("cqa", "finetune", 1)]
    assert json.loads((tiny_study / "results.json").read_text())["tasks"] == grown["tasks"]


@pytest.mark.integration
def test_a_fresh_machine_continues_from_the_committed_records(tiny_study, ws, tmp_path, monkeypatch):
    committed = tmp_path / "results"  # what a repository keeps: the config and the records, no run directories
    committed.mkdir()
    shutil.copy(tiny_study / "study_config.yaml", committed)
    shutil.copytree(tiny_study / "records", committed / "records")
    missing = study_module.record_path(committed, "svamp", "finetune", 0)
    original = json.loads(missing.read_text())
    missing.unlink()
    calls = []
    for name in ("run_rationale_train", "run_rationale_eval", "run_extract"):
        real = getattr(study_module, name)
        monkeypatch.setattr(study_module, name, lambda config, real=real, name=name: calls.append(name) or real(config))
    args = ["rationales", "study", "--config", str(ws / "study.yaml"), "--out", str(tmp_path / "fresh"),
            "--results", str(committed), "--no-progress"]  # fmt: skip
    assert main(args) == 2  # a results directory holding a study is continued only with --resume
    assert main([*args, "--resume"]) == 0
    assert calls == ["run_rationale_train", "run_rationale_eval"]  # no extraction, no teacher evaluation
    rebuilt = json.loads(missing.read_text())
    assert rebuilt["predictions"] == original["predictions"] and rebuilt["val_loss"] == original["val_loss"]
    results = json.loads((committed / "results.json").read_text())
    assert results["tasks"]["svamp"]["arms"]["finetune"]["per_seed"][0]["accuracy"] == original["accuracy"]


def _committed(tiny_study: Path, root: Path) -> Path:
    """What a repository keeps of the tiny study: its config, records and extraction, no run directories."""
    committed = root / "results"
    committed.mkdir()
    shutil.copy(tiny_study / "study_config.yaml", committed)
    for kept in ("records", "extraction"):
        shutil.copytree(tiny_study / kept, committed / kept)
    return committed


@pytest.mark.integration
def test_a_fresh_machine_continues_a_saliency_run_from_the_committed_extraction(tiny_study, ws, tmp_path, monkeypatch):
    committed = _committed(tiny_study, tmp_path)
    missing = study_module.record_path(committed, "cqa", "saliency-k1", 0)
    original = json.loads(missing.read_text())
    missing.unlink()

    def no_teacher(name):
        raise AssertionError(f"the teacher {name} was loaded: the committed extraction was not used")

    monkeypatch.setattr("lmdistill.commands.rationales_extract.load_teacher", no_teacher)
    fresh = tmp_path / "fresh"
    args = ["rationales", "study", "--config", str(ws / "study.yaml"), "--out", str(fresh),
            "--results", str(committed), "--no-progress", "--resume"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(missing.read_text())["predictions"] == original["predictions"]
    for k in (1, 2):  # the extraction resumed from the copy, the smaller k its prefix, as on the first machine
        assert rationale_file(fresh, "cqa", k).read_bytes() == rationale_file(tiny_study, "cqa", k).read_bytes()


@pytest.mark.integration
def test_workers_share_the_missing_runs_and_together_rebuild_them(tiny_study, ws, tmp_path, monkeypatch):
    committed = _committed(tiny_study, tmp_path)
    runs = RationaleStudyConfig(**{**yaml.safe_load((ws / "study.yaml").read_text()), "out": "x"}).runs()
    lost = [("svamp", "finetune", 0), ("svamp", "saliency-k1", 0), ("cqa", "finetune", 0)]
    study_runs = RationaleStudyConfig(**load_yaml(committed / "study_config.yaml", RationaleStudyConfig)).runs()
    recorded = sum(study_module.record_path(committed, *run).is_file() for run in study_runs)
    originals = {}
    for run in lost:
        originals[run] = json.loads(study_module.record_path(committed, *run).read_text())
        study_module.record_path(committed, *run).unlink()
    trained = []
    real = study_module.run_rationale_train
    run_of = lambda c: (c.task, Path(c.out).parent.name, c.seed)  # noqa: E731
    monkeypatch.setattr(study_module, "run_rationale_train", lambda c: trained.append(run_of(c)) or real(c))
    mine = {}
    for worker in (0, 1):
        args = ["rationales", "study", "--config", ws / "study.yaml", "--out", tmp_path / f"w{worker}",
                "--results", committed, "--no-progress", "--resume", "--workers", 2, "--worker", worker]  # fmt: skip
        assert main(list(map(str, args))) == 0
        mine[worker] = trained[:]
        trained.clear()
        finished = json.loads((committed / "results.json").read_text())["runs_finished"]
        assert finished == recorded - len(lost) + len(mine[0]) + (len(mine[1]) if worker else 0)
    # each worker trained the lost runs at its places in the study's order, and none twice
    for worker in (0, 1):
        assert mine[worker] == [run for run in lost if runs.index(run) % 2 == worker]
    assert finished == recorded
    for run in lost:
        rebuilt = json.loads(study_module.record_path(committed, *run).read_text())
        assert rebuilt["predictions"] == originals[run]["predictions"]


def test_a_worker_outside_the_workers_is_refused():
    with pytest.raises(LmdistillError, match=r"--worker must be in \[0, 1\] \(--workers 2\), got 2"):
        RationaleStudyConfig(out="x", student="s", workers=2, worker=2)
    with pytest.raises(LmdistillError, match="--workers must be at least 1"):
        RationaleStudyConfig(out="x", student="s", workers=0)
    assert RationaleStudyConfig(out="x", student="s", workers=3, worker=1).assigned(list(range(8))) == [1, 4, 7]


@pytest.mark.integration
def test_a_study_resumed_with_auto_precision_keeps_its_records_precision(tiny_study, ws, tmp_path, monkeypatch):
    monkeypatch.setattr("lmdistill.precision.fast_bf16", lambda device: True)  # this machine alone would pick bf16
    auto = tmp_path / "study.yaml"
    auto.write_text((ws / "study.yaml").read_text().replace("precision: fp32", "precision: auto"))
    committed = tmp_path / "results"
    committed.mkdir()
    saved = (tiny_study / "study_config.yaml").read_text()
    (committed / "study_config.yaml").write_text(saved.replace("precision: fp32", "precision: auto"))
    shutil.copytree(tiny_study / "records", committed / "records")  # every record ran in fp32
    missing = study_module.record_path(committed, "svamp", "finetune", 0)
    original = json.loads(missing.read_text())
    missing.unlink()
    args = ["rationales", "study", "--config", str(auto), "--out", str(tmp_path / "fresh"), "--results", str(committed)]
    assert main([*args, "--resume", "--no-progress"]) == 0
    rebuilt = json.loads(missing.read_text())
    assert rebuilt["precision"] == "fp32" and rebuilt["val_loss"] == original["val_loss"]


def test_paired_comparison_pairs_seeds_and_test_examples_by_hand():
    def record(seed, correct):
        predictions = [{"id": i, "correct": c} for i, c in zip("abcd", correct, strict=True)]
        return {"seed": seed, "accuracy": sum(correct) / 4, "predictions": predictions}

    finetune = [record(0, [1, 0, 0, 1]), record(1, [1, 1, 0, 0])]
    arm = [record(1, [1, 1, 1, 1]), record(0, [1, 1, 0, 1]), record(2, [0, 0, 0, 0])]  # seed 2: no pair
    c = study_module.paired_comparison(finetune, arm)
    assert c["seeds"] == [1, 0]
    # per example, the difference averaged over the two seeds: a 0, b (0 + 1) / 2, c (1 + 0) / 2, d (1 + 0) / 2
    assert c["difference"] == pytest.approx(0.375) and 0 <= c["low"] <= 0.375 <= c["high"] <= 0.5
    assert [(r["seed"], r["difference"], r["only_baseline"], r["only_arm"]) for r in c["per_seed"]] == [
        (1, 0.5, 0, 2), (0, 0.25, 0, 1)]  # fmt: skip
    assert [r["mcnemar_p"] for r in c["per_seed"]] == [pytest.approx(0.5), 1.0]  # 2 * P(X <= 0), X ~ B(2, 1/2)
    assert c["effect"] == (c["low"] > 0)
    assert study_module.paired_comparison(finetune, [record(5, [1, 1, 1, 1])]) is None
    with pytest.raises(LmdistillError, match="other examples than the runs compared"):
        study_module.paired_comparison(
            finetune, [{**record(0, [1, 1, 1, 1]), "predictions": [{"id": "z", "correct": 1}]}]
        )


def cli_error(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.integration
def test_a_study_is_not_overwritten_nor_resumed_with_other_settings(tiny_study, ws, capsys):
    base = ["rationales", "study", "--config", ws / "study.yaml", "--out", tiny_study, "--no-progress"]
    assert "already holds a study; pass --resume" in cli_error(capsys, *base)
    message = cli_error(capsys, *base, "--resume", "--max-steps", 3)
    assert message.startswith("lmdistill rationales study: error: ") and "different max_steps" in message
    assert "different method" in cli_error(capsys, *base, "--resume", "--method", "input-x-gradient")


def test_rationales_eval_of_a_teacher_spec(ws, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"id": "e0", "input": "the b or c", "label": "c", "choices": ["b", "c"]}])
    common = ["rationales", "eval", "--task", "jsonl", "--data", data, "--no-progress"]
    message = cli_error(capsys, *common, "--model", "default")
    assert "--model default is not a model directory" in message and "--out" in message
    assert "not a model directory" in cli_error(capsys, *common, "--model", tmp_path / "teacher.gguf")
    # with --out, a spec that is not a directory loads through load_teacher
    from lmdistill.models.load import load_teacher

    loaded = []

    def fake_load_teacher(spec):
        loaded.append(spec)
        return load_teacher(str(ws / "teacher"))

    monkeypatch.setattr(evaluate_module, "load_teacher", fake_load_teacher)
    assert main([str(a) for a in (*common, "--model", "default", "--out", tmp_path / "teacher.json")]) == 0
    results = json.loads((tmp_path / "teacher.json").read_text())
    assert loaded == ["default"] and results["model"] == "default" and results["total"] == 1
    assert results["model_name"] == str(ws / "teacher")


@pytest.mark.integration
def test_gsm_symbolic_has_a_gold_arm_and_no_step_by_step(ws, tmp_path):
    pytest.importorskip("reasoning_gym")
    args = ["rationales", "study", "--teacher", ws / "teacher", "--student", ws / "student", "--tasks",
            "gsm-symbolic", "--arms", "finetune", "saliency", "gold", "--saliency-ks", 2, "--seeds", 0, "--size", 6,
            "--test-limit", 2, "--max-steps", 1, "--batch-size", 2, "--val-fraction", 0.2, "--max-new-tokens", 2,
            "--precision", "fp32", "--no-progress", "--out", tmp_path / "gsm"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    result = json.loads((tmp_path / "gsm" / "results.json").read_text())["tasks"]["gsm-symbolic"]
    assert list(result["arms"]) == ["finetune", "saliency-k2", "gold"] and result["teacher"]["total"] == 2
    manifest = json.loads((run_dir(tmp_path / "gsm", "gsm-symbolic", "gold", 0) / "data_manifest.json").read_text())
    assert manifest["rationale_source"] == "gold" and manifest["train_with_rationale"] == manifest["train_examples"]
    assert len(read_records(rationale_file(tmp_path / "gsm", "gsm-symbolic", 2))) == 6


@pytest.mark.parametrize("choices", [True, False])
def test_rationales_eval_of_a_model_with_nan_weights_is_refused(tmp_path, capsys, choices):
    nan = tiny_teacher("llama")
    with torch.no_grad():
        nan.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    nan.save_pretrained(tmp_path / "nan")
    tiny_tokenizer().save_pretrained(tmp_path / "nan")
    row = {"id": "e0", "input": "the b or c", "label": "c"}
    write_jsonl(tmp_path / "data.jsonl", [{**row, "choices": ["b", "c"]} if choices else row])
    message = cli_error(
        capsys,
        "rationales",
        "eval",
        "--task",
        "jsonl",
        "--data",
        tmp_path / "data.jsonl",
        "--model",
        tmp_path / "nan",
        "--max-new-tokens",
        2,
        "--no-progress",
    )
    expected = "the model's log-probabilities are NaN: its weights or its forward pass give NaN"
    assert message == f"lmdistill rationales eval: error: {expected}"


def esnli_rows() -> list[dict]:
    """Made-up e-SNLI lines in words of the tiny tokenizer: 30 premises, three hypotheses each."""
    rows = []
    for p in range(30):
        x, y = "bcdefghijk"[p % 10], "mnpqrstuvw"[p // 3]
        for label, hypothesis in enumerate((f"a {x} is by the {y}", f"the {x} was at {y}", f"no {x} is in {y}")):
            premise = f"the {x} is on the {y} by {p % 7}."
            rows.append({"premise": premise, "hypothesis": hypothesis, "label": label, "explanation_1": f"{x} {y}"})
    return rows


@pytest.mark.integration
def test_a_tiny_esnli_study_with_random_and_gold_arms(ws, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "reasoning" / "esnli" / "esnli_valid.json", esnli_rows())
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "reasoning"))
    args = ["rationales", "study", "--teacher", ws / "teacher", "--student", ws / "student", "--tasks", "esnli",
            "--arms", "finetune", "saliency", "random", "gold", "--saliency-ks", 3, "--random-ks", 1, 3,
            "--random-seed", 4, "--seeds", 0, "--train-limit", 12, "--test-limit", 4, "--max-steps", 2,
            "--batch-size", 2, "--val-fraction", 0.2, "--precision", "fp32", "--no-progress",
            "--out", tmp_path / "s"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    out = tmp_path / "s"
    result = json.loads((out / "results.json").read_text())["tasks"]["esnli"]
    assert list(result["arms"]) == ["finetune", "saliency-k3", "random-k1", "random-k3", "gold"]
    assert [arm["k"] for arm in result["arms"].values()] == [None, 3, 1, 3, None]
    evaluation = json.loads((run_dir(out, "esnli", "random-k3", 0) / "eval.json").read_text())
    test_ids = [e.id for e in load_task("esnli", "test", limit=4)]
    assert evaluation["split"] == "test" and [p["id"] for p in evaluation["predictions"]] == test_ids
    train = load_task("esnli", "train", limit=12)
    random_k3 = read_records(random_file(out, "esnli", 3))
    assert random_k3 == random_records(train, TASKS["esnli"].template, 3, seed=4, drop_stop_words=True)
    assert [r["words"][:1] for r in random_k3] == [r["words"] for r in read_records(random_file(out, "esnli", 1))]
    saliency = read_records(rationale_file(out, "esnli", 3))
    assert [r["id"] for r in saliency] == [r["id"] for r in random_k3] == [e.id for e in train]
    assert [r["rationale"] for r in saliency] != [r["rationale"] for r in random_k3]
    for arm, rationales in (("random-k3", random_file(out, "esnli", 3)), ("gold", None)):
        manifest = json.loads((run_dir(out, "esnli", arm, 0) / "data_manifest.json").read_text())
        assert manifest["rationales"] == (str(rationales) if rationales else None) and manifest["split"] == "train"
        assert manifest["train_with_rationale"] == manifest["train_examples"]
    assert set(result["rationale_word_share"]) == set(result["rationale_word_share_any_choice"]) == {"3"}
    # saliency-k3 against the control of its k, random-k3 (random-k1 has no saliency arm of its k)
    assert [name for name, arm in result["arms"].items() if "vs_random" in arm] == ["saliency-k3"]
    (against_random,) = result["arms"]["saliency-k3"]["vs_random"]["per_seed"]
    accuracies = {name: arm["accuracy_mean"] for name, arm in result["arms"].items()}
    assert against_random["difference"] == accuracies["saliency-k3"] - accuracies["random-k3"]
    report = (out / "report.md").read_text()
    assert "| arm | vs random-k (points) |" in report and report.count("| arm | vs finetune (points) |") == 1
    assert "## e-SNLI" in report and "| `random-k1` | 1 of the same candidate words drawn at random | 1 |" in report
    assert "`random-k` arms: k of the same candidate words drawn at random (seed 4" in report
