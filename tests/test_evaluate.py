"""`lmdistill eval` and the records of every run: non-finite losses, an undefined gap closed, the precision used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_teacher, tiny_teacher, tiny_tokenizer, write_corpus

from lmdistill import precision as precision_module
from lmdistill.cli import main
from lmdistill.config import TrainConfig
from lmdistill.evaluation import gap_closed, gap_closed_forms, heldout_loss, mixture_scores, spread_blocks
from lmdistill.precision import resolve_precision, study_precision
from lmdistill.provenance import environment, recorded_precision
from lmdistill.train.loop import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two tiny models, one with NaN weights, one over-confident (worse than chance), and a corpus."""
    root = tmp_path_factory.mktemp("eval")
    save_tiny_teacher(root / "a")
    _save(tiny_teacher("llama", seed=1), root / "b")
    nan = tiny_teacher("llama")
    with torch.no_grad():
        nan.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    _save(nan, root / "nan")
    sharp = tiny_teacher("llama", seed=2)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(100.0)  # confidently wrong: far worse than the uniform guess
    _save(sharp, root / "sharp")
    write_corpus(root / "corpus")
    return root


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))


def run_eval_cli(ws: Path, out: Path, *args: object) -> int:
    common = ["--data", ws / "corpus", "--seq-len", 16, "--val-fraction", 0.2, "--out", out]
    return main(["eval", *map(str, [*args, *common])])


def test_gap_closed_is_undefined_unless_the_teacher_beats_the_baseline():
    # a teacher worse than the baseline: (3 - 4) / (3 - 5) would be +0.5 for a method worse than the baseline
    assert math.isnan(gap_closed(base=3.0, method=4.0, teacher=5.0))
    assert gap_closed_forms(
        {"val_loss": 3.0, "val_ppl": math.exp(3.0)},
        {"val_loss": 4.0, "val_ppl": math.exp(4.0)},
        {"val_loss": 5.0, "val_ppl": math.exp(5.0)},
    ) == {"gap_closed_loss": None, "gap_closed_ppl": None}
    shares = gap_closed_forms(*({"val_loss": v, "val_ppl": math.exp(v)} for v in (5.0, 4.0, 3.0)))
    assert shares["gap_closed_loss"] == pytest.approx(0.5)
    assert shares["gap_closed_ppl"] == pytest.approx((math.exp(5) - math.exp(4)) / (math.exp(5) - math.exp(3)))


def test_eval_with_a_teacher_worse_than_the_baseline_reports_the_gap_closed_undefined(ws, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert run_eval_cli(ws, out, "--model", ws / "b", "--teacher", ws / "sharp", "--baseline", ws / "a") == 0
    results = json.loads(out.read_text())
    assert results["teacher"]["val_loss"] > results["baseline"]["val_loss"]  # the case under test
    assert results["gap_closed_loss"] is None and results["gap_closed_ppl"] is None
    assert "gap closed: undefined: the teacher is not better than the baseline" in capsys.readouterr().out
    # the other way round the gap is defined: the same formula as before
    assert run_eval_cli(ws, out, "--model", ws / "b", "--teacher", ws / "a", "--baseline", ws / "sharp") == 0
    results = json.loads(out.read_text())
    losses = {k: results[k]["val_loss"] for k in ("baseline", "model", "teacher")}
    expected = (losses["baseline"] - losses["model"]) / (losses["baseline"] - losses["teacher"])
    assert results["gap_closed_loss"] == pytest.approx(expected)
    assert "% (loss)" in capsys.readouterr().out


@pytest.mark.parametrize("role", ["--model", "--teacher", "--baseline"])
def test_eval_of_a_model_with_nan_weights_is_refused_naming_it(ws, tmp_path, capsys, role):
    roles = {"--model": ws / "a", "--teacher": ws / "a", "--baseline": ws / "b", role: ws / "nan"}
    out = tmp_path / "eval.json"
    assert run_eval_cli(ws, out, *(x for pair in roles.items() for x in pair)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lmdistill eval: error: the {role} {ws / 'nan'} has a non-finite held-out loss (nan)"), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "recorded", "expected"),
    [
        ("auto", ["fp32", "fp32"], "fp32"),  # a resumed study keeps its runs' precision, whatever this machine has
        ("auto", ["bf16"], "bf16"),
        ("auto", [], "auto"),  # nothing finished: this machine decides
        ("auto", ["bf16", "fp32"], "auto"),  # already mixed: nothing to keep
        ("bf16", ["fp32"], "bf16"),  # a set precision is never overridden
    ],
)
def test_a_study_s_auto_precision_follows_its_finished_runs(setting, recorded, expected):
    assert study_precision(setting, recorded) == expected


@pytest.mark.parametrize(
    ("fast", "expected"),
    [
        (True, ("bf16", "auto: CPU with AVX512-BF16/AMX")),
        (False, ("fp32", "auto: CPU without AVX512-BF16/AMX, bf16 would be emulated")),
    ],
)
def test_the_precision_auto_resolves_to_is_recorded_by_eval_and_train(ws, tmp_path, monkeypatch, fast, expected):
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device, cpuinfo=None: fast)
    assert resolve_precision(CPU, "auto") == expected
    assert resolve_precision(CPU, "fp32") == ("fp32", "set to fp32")
    assert resolve_precision(CPU, "bf16") == ("bf16", "set to bf16")

    assert run_eval_cli(ws, tmp_path / "auto.json", "--model", ws / "a", "--precision", "auto") == 0
    auto = json.loads((tmp_path / "auto.json").read_text())
    assert (auto["environment"]["precision"], auto["environment"]["precision_reason"]) == expected
    assert auto["config"]["precision"] == "auto"
    # the record is what ran: the loss is that of the resolved precision
    losses = {}
    for precision in ("bf16", "fp32"):
        assert run_eval_cli(ws, tmp_path / f"{precision}.json", "--model", ws / "a", "--precision", precision) == 0
        losses[precision] = json.loads((tmp_path / f"{precision}.json").read_text())["model"]["val_loss"]
    assert losses["bf16"] != losses["fp32"] and auto["model"]["val_loss"] == losses[expected[0]]

    run = tmp_path / "run"
    config = TrainConfig(student=str(ws / "a"), out=str(run), data=[str(ws / "corpus")], seq_len=16, batch_size=2,
                         max_steps=1, precision="auto", progress=False, eval_tokens=32, val_fraction=0.2)  # fmt: skip
    run_train(config)
    env = json.loads((run / "environment.json").read_text())
    assert (env["precision"], env["precision_reason"]) == expected
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "auto"  # the setting, as written
    assert recorded_precision([run, tmp_path / "no-such-run"]) == expected


def test_recorded_precision_of_runs_that_differ(tmp_path):
    for name, precision in (("a", ("bf16", "auto: CUDA GPU with bf16")), ("b", ("fp32", "set to fp32"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "environment.json").write_text(json.dumps(environment(precision)))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "environment.json").write_text(json.dumps(environment()))  # from before the record
    assert recorded_precision([tmp_path / "old"]) is None
    precision, reason = recorded_precision([tmp_path / n for n in ("a", "b", "old")])
    assert precision == "mixed"
    assert reason == "bf16 in 1 run (auto: CUDA GPU with bf16); fp32 in 1 run (set to fp32)"


def test_evaluation_blocks_are_spread_evenly_over_the_split_and_all_taken_when_fewer():
    blocks = np.arange(100 * 4).reshape(100, 4)
    chosen = spread_blocks(blocks, 5 * 4 + 3)  # 5 whole blocks
    np.testing.assert_array_equal(chosen[:, 0] // 4, [0, 25, 50, 74, 99])  # first and last block included
    np.testing.assert_array_equal(spread_blocks(blocks, 10**6), blocks)
    np.testing.assert_array_equal(spread_blocks(blocks, 1), blocks[:1])


def test_the_mixture_score_weights_each_source_by_its_share_of_the_training_tokens():
    tiny_lm = tiny_teacher("llama")
    blocks = {"a": np.zeros((2, 8), dtype=np.int64), "b": np.ones((3, 8), dtype=np.int64)}
    scores = mixture_scores(tiny_lm, blocks, {"a": 0.25, "b": 0.75}, batch_size=2)
    alone = {name: heldout_loss(tiny_lm, b, batch_size=2) for name, b in blocks.items()}
    assert scores["a"] == alone["a"] and scores["b"] == alone["b"]
    assert scores["mixture"] == pytest.approx(0.25 * alone["a"] + 0.75 * alone["b"])


@pytest.mark.parametrize("fast", [True, False])
def test_eval_runs_the_teacher_in_its_dtype_and_records_it(ws, tmp_path, capsys, monkeypatch, fast):
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device, cpuinfo=None: fast)
    results = {}
    for dtype in ("auto", "fp32", "bf16", "int8"):
        out = tmp_path / f"{dtype}.json"
        args = ("--model", ws / "b", "--teacher", ws / "a", "--teacher-dtype", dtype, "--precision", "fp32")
        assert run_eval_cli(ws, out, *args) == 0
        results[dtype] = json.loads(out.read_text())
        env = results[dtype]["environment"]
        assert results[dtype]["teacher"]["dtype"] == env["teacher_dtype"]
        assert f"(in {env['teacher_dtype']})" in capsys.readouterr().out
    auto = results["auto"]["environment"]
    assert (auto["teacher_dtype"], auto["teacher_dtype_reason"]) == resolve_precision(CPU, "auto")
    assert auto["teacher_dtype"] == ("bf16" if fast else "fp32") and auto["precision"] == "fp32"
    assert results["int8"]["environment"]["teacher_dtype_reason"] == "set to int8"
    loss = {dtype: r["teacher"]["val_loss"] for dtype, r in results.items()}
    assert loss["auto"] == loss["bf16" if fast else "fp32"]
    assert loss["bf16"] != loss["fp32"] != loss["int8"]
    assert loss["bf16"] == pytest.approx(loss["fp32"], rel=0.01)
    assert loss["int8"] == pytest.approx(loss["fp32"], rel=0.01)
    assert len({r["model"]["val_loss"] for r in results.values()}) == 1  # the model keeps its own --precision
