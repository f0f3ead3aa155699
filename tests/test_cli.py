"""`lmdistill init` through the real command line on tiny teachers saved as Hugging Face directories."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import save_tiny_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.cli import main

SMALL = [
    "--hidden-size",
    "16",
    "--num-layers",
    "2",
    "--num-heads",
    "2",
    "--num-kv-heads",
    "1",
    "--intermediate-size",
    "24",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def run(*args) -> int:
    return main(["init", *map(str, args)])


def test_init_writes_a_loadable_student_and_its_report(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert run("--teacher", teacher_dir, "--method", "guide", *SMALL, "--out", out) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "init_report.json", "init_config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".student.partial-*"))
    student = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    report = json.loads((out / "init_report.json").read_text())
    assert report["method"] == "guide" and report["pca"] == "uncentered"
    assert report["student"]["shape"]["hidden_size"] == 16 and report["student"]["shape"]["num_layers"] == 2
    assert report["student"]["parameters"] == student.num_parameters()
    assert report["teacher"]["parameters"] > report["student"]["parameters"]
    assert 0 < report["explained_variance"] <= 1
    assert report["init_seconds"] > 0
    for name in ("student", "random", "teacher"):
        assert math.isfinite(report["step0"]["loss"][name])
    assert report["environment"]["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert "explained variance" in printed and str(out) in printed


def test_saved_config_reproduces_the_student(teacher_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run("--teacher", teacher_dir, "--method", "guide-all", *SMALL, "--seed", 3, "--out", first) == 0
    config = yaml.safe_load((first / "init_config.yaml").read_text())
    assert config["seed"] == 3 and config["method"] == "guide-all"
    assert run("--config", first / "init_config.yaml", "--out", second) == 0
    a, b = (AutoModelForCausalLM.from_pretrained(p) for p in (first, second))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def error_of(capsys, *args) -> str:
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # earlier lines are progress output (loading weights)
    assert last.startswith("lmdistill init: error: "), err
    return last


def test_bad_inputs_give_one_line_errors(teacher_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert "--hidden-size 64 is larger than the teacher's 32" in error_of(
        capsys, "--teacher", teacher_dir, "--hidden-size", 64, "--out", out
    )
    assert "does not exist" in error_of(capsys, "--teacher", tmp_path / "missing", "--out", out)
    assert "--out is required" in error_of(capsys, "--teacher", teacher_dir)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("hidden_sise: 16\n")
    assert "unknown keys ['hidden_sise']" in error_of(capsys, "--config", bad_yaml, "--out", out)
    bad_yaml.write_text("hidden_size: 16.5\n")
    assert "--hidden-size: 16.5 is not valid" in error_of(capsys, "--config", bad_yaml, "--out", out)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert "exists and is not empty" in error_of(capsys, "--teacher", teacher_dir, "--out", occupied)
    assert (occupied / "keep.txt").exists()


def test_unknown_command_and_unknown_choice_are_refused(capsys):
    assert main(["distil"]) == 2
    assert "unknown command 'distil'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["init", "--method", "magic", "--out", "x"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_command_table_is_the_documented_one():
    from pathlib import Path

    from lmdistill.cli import COMMANDS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    documented = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert documented == list(COMMANDS)
    for name, (_, _, description) in COMMANDS.items():
        assert f"| `{name}` | {description} |" in section
