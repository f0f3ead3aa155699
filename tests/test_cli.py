"""`lmdistill init` through the real command line on tiny teachers saved as Hugging Face directories."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize, save_tiny_teacher, tiny_config, tiny_tokenizer, write_corpus
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.cli import main
from lmdistill.data.packed import prepare_data
from lmdistill.init.guide import PCA_MODES, pca_projection, token_distribution

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


FREQUENCY_DATA = ["--seq-len", "16", "--val-fraction", "0.2"]


def embeddings(directory: Path) -> torch.Tensor:
    return load_file(directory / "model.safetensors")["model.embed_tokens.weight"]


def test_pca_frequency_weights_the_rows_by_the_training_blocks_and_reports_every_mode(
    teacher_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "freq"
    assert (
        run("--teacher", teacher_dir, *SMALL, "--pca", "frequency", "--data", corpus, *FREQUENCY_DATA, "--out", out)
        == 0
    )
    report = json.loads((out / "init_report.json").read_text())
    assert report["pca"] == "frequency" and list(report["explained_energy"]) == list(PCA_MODES)
    data = prepare_data([str(corpus)], AutoTokenizer.from_pretrained(teacher_dir), 16, val_fraction=0.2)
    assert report["token_counts"]["tokens"] == data.train.size and len(data.val)  # the training blocks only
    assert report["token_counts"]["data"] == data.fingerprint
    teacher = embeddings(teacher_dir)
    m = pca_projection(teacher, 16, "frequency", frequencies=token_distribution(data.train, teacher.shape[0])).matrix
    torch.testing.assert_close(embeddings(out), teacher @ m, rtol=0, atol=1e-6)
    energy = report["explained_energy"]
    assert energy["frequency"]["used_tokens"] > energy["uncentered"]["used_tokens"]
    assert energy["frequency"]["table"] == report["explained_variance"] < energy["uncentered"]["table"]
    assert "of the used tokens' energy: uncentered" in capsys.readouterr().out


def test_data_leaves_the_other_modes_unchanged_and_adds_their_used_token_energy(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    plain, counted = tmp_path / "plain", tmp_path / "counted"
    assert run("--teacher", teacher_dir, *SMALL, "--out", plain) == 0
    assert run("--teacher", teacher_dir, *SMALL, "--data", corpus, *FREQUENCY_DATA, "--out", counted) == 0
    assert torch.equal(embeddings(plain), embeddings(counted))
    without, with_data = (json.loads((d / "init_report.json").read_text()) for d in (plain, counted))
    assert without["explained_energy"] is None and without["token_counts"] is None
    assert with_data["explained_energy"]["uncentered"]["table"] == with_data["explained_variance"]
    assert with_data["explained_variance"] == without["explained_variance"]


def test_training_data_beyond_the_teacher_vocabulary_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))
    config = tiny_config("llama")
    config.vocab_size = 64  # the tokenizer has 96 ids
    teacher = tmp_path / "teacher"
    randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "doc00.txt").write_text((corpus / "doc00.txt").read_text() + " w80")
    args = (
        "--teacher",
        teacher,
        *SMALL,
        "--pca",
        "frequency",
        "--data",
        corpus,
        *FREQUENCY_DATA,
        "--out",
        tmp_path / "s",
    )
    assert "holds token id 80, beyond the teacher's embedding table of 64 rows" in error_of(capsys, *args)
    short = ("--teacher", teacher, "--pca", "frequency", "--seq-len", 1, "--out", tmp_path / "s")
    assert "--seq-len must be at least 2" in error_of(capsys, *short)


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


def no_teacher_weights(monkeypatch):
    """Make loading the teacher's weights fail, so that a test shows a refusal comes before it."""

    def load_teacher(spec, *args, **kwargs):
        raise AssertionError(f"the teacher {spec} was loaded before the refusal")

    monkeypatch.setattr("lmdistill.commands.init.load_teacher", load_teacher)


@pytest.mark.parametrize(
    "where, relation", [("teacher", "is"), ("link", "is"), ("teacher/sub", "is inside"), (".", "contains")]
)
def test_out_overlapping_the_teacher_is_refused_even_with_overwrite(tmp_path, capsys, where, relation):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    (tmp_path / "link").symlink_to(teacher)
    files = sorted(p.name for p in teacher.iterdir())
    message = error_of(capsys, "--teacher", teacher, *SMALL, "--out", tmp_path / where, "--overwrite")
    assert f"{relation} the teacher {teacher}: choose --out outside it" in message
    assert sorted(p.name for p in teacher.iterdir()) == files


def test_out_that_cannot_be_written_is_refused_before_any_work(teacher_dir, tmp_path, capsys, monkeypatch):
    no_teacher_weights(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for args in ([], ["--overwrite"]):
        assert f"--out {a_file} is a file, not a directory" in error_of(
            capsys, "--teacher", teacher_dir, "--out", a_file, *args
        )
    under_a_file = a_file / "a" / "student"
    assert f"cannot create --out {under_a_file}: {a_file} is a file, not a directory" in error_of(
        capsys, "--teacher", teacher_dir, "--out", under_a_file
    )
    # Tests run as root, which writes into read-only directories, so os.access reports the read-only one here.
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != read_only and access(path, mode, **kw))
    assert f"cannot write --out {read_only / 'new' / 'student'}: no permission to write in {read_only}" in error_of(
        capsys, "--teacher", teacher_dir, "--out", read_only / "new" / "student"
    )
    assert not (read_only / "new").exists()


def test_shapes_the_config_class_refuses_are_refused_before_the_teacher_loads(tmp_path, capsys, monkeypatch):
    teacher = save_tiny_teacher(tmp_path / "teacher", num_key_value_heads=1)  # hidden 32, 4 heads of 8, 1 KV head
    no_teacher_weights(monkeypatch)
    shape = ["--hidden-size", 32, "--num-layers", 2, "--num-heads", 3, "--num-kv-heads", 1, "--intermediate-size", 32]
    message = error_of(capsys, "--teacher", teacher, "--method", "random", *shape, "--out", tmp_path / "student")
    assert (
        "LlamaConfig refuses this student shape: The hidden size (32) is not a multiple of the number of attention "
        "heads (3); change those sizes"
    ) in message
    assert not (tmp_path / "student").exists()


def test_unsupported_model_type_is_refused_from_its_config(tmp_path, capsys, monkeypatch):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(bert)
    no_teacher_weights(monkeypatch)
    assert "model type 'bert' is not supported" in error_of(capsys, "--teacher", bert, "--out", tmp_path / "s")


def test_unknown_flags_are_refused_with_the_closest_flag(capsys):
    from lmdistill.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([*name.split(), "--out", "x", "--sead", "1", "--no-such-flag"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"lmdistill {name}: error: unrecognized arguments: --sead 1 --no-such-flag" in err, err
        assert "Traceback" not in err and "HfArgumentParser" not in err
    with pytest.raises(SystemExit):
        main(["init", "--hidden-sise=32", "--out", "x"])
    assert "unrecognized arguments: --hidden-sise=32; did you mean --hidden-size?" in capsys.readouterr().err


def test_a_group_lists_its_commands(capsys):
    from lmdistill.cli import COMMANDS

    group = [name for name in COMMANDS if name.startswith("rationales ")]
    for argv, code in ((["rationales", "--help"], 0), (["rationales", "-h"], 0), (["rationales"], 2)):
        assert main(argv) == code
        printed = capsys.readouterr()
        text = printed.out if code == 0 else printed.err
        assert "unknown command" not in text
        rows = text.split("usage: lmdistill rationales COMMAND", 1)[1].split("commands:\n", 1)[1].splitlines()
        assert [" ".join(row.split()[:2]) for row in rows] == group
    assert main(["rationales", "distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'rationales distil'" in err and "rationales extract" in err


def option_help(name: str, capsys) -> dict[str, str]:
    """`lmdistill NAME --help`, as option -> its help text on one line."""
    with pytest.raises(SystemExit) as exit_info:
        main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + text)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


def test_every_option_states_its_default_once(capsys):
    from lmdistill.cli import COMMANDS

    for name in COMMANDS:
        for option, text in option_help(name, capsys).items():
            assert text.count("(default:") <= 1, f"lmdistill {name} {option}: {text}"
    assert "(default: the teacher's)" in option_help("init", capsys)["--hidden_size"]
    assert option_help("eval", capsys)["--precision"].endswith("(default: auto)")
