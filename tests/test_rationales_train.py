"""`rationales train` and `rationales eval`: the multitask loss, its normalization under accumulation, λ = 0,
resume, errors, and extract -> train -> eval through the command line on tiny models."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import save_tiny_teacher, torchrun
from transformers import AutoModelForCausalLM

from lmdistill.cli import main
from lmdistill.commands.rationales_train import run_rationale_train
from lmdistill.config import RationaleTrainConfig
from lmdistill.errors import LmdistillError
from lmdistill.rationales import answers as answers_module
from lmdistill.rationales.tasks import TASKS, Example, is_correct, load_task, render_prompt
from lmdistill.train import rationale_data as train_module
from lmdistill.train.rationale_data import LABEL, RATIONALE, MultitaskLoss, TargetSequence, pad_right

# Words of the tiny tokenizer (conftest.WORDS, single letters, digits), so that nothing is <unk>.
ROWS = [
    {"id": "e0", "input": "the cat is on the mat", "label": "c", "choices": ["c", "h", "b"]},
    {"id": "e1", "input": "it was 3 and 4", "label": "7"},
    {"id": "e2", "input": "this is a test of the words", "label": "b", "choices": ["b", "c"]},
    {"id": "e3", "input": "x y z and q", "label": "q", "choices": ["x", "q"]},
    {"id": "e4", "input": "1 2 3 4 5 6", "label": "2 1"},
    {"id": "e5", "input": "a b c d e f g h", "label": "h", "choices": ["a", "h", "d"]},
    {"id": "e6", "input": "on the way to the sea", "label": "s e a"},
    {"id": "e7", "input": "it is 9 by 9", "label": "8 1"},
    {"id": "e8", "input": "be at the door by 5", "label": "5", "choices": ["5", "6"]},
    {"id": "e9", "input": "from this to that", "label": "t", "choices": ["t", "f"]},
]
# Rationales of different lengths: a normalization per micro-batch instead of per step would show.
RATIONALES = {
    "e0": "cat mat",
    "e1": "3 4",
    "e2": "test of the words a b c d",
    "e3": "q",
    "e4": "1 2 3 4 5 6 7 8",
    "e5": "h",
    "e6": "sea way to the",
    "e7": "9 9 9",
    "e8": "door 5",
    "e9": "this that t",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny teacher, a student from `lmdistill init`, made-up examples and a rationales file for them."""
    root = tmp_path_factory.mktemp("rtrain")
    save_tiny_teacher(root / "teacher")
    args = ["init", "--teacher", root / "teacher", "--method", "guide", "--hidden-size", 16, "--num-layers", 2,
            "--num-heads", 2, "--num-kv-heads", 1, "--out", root / "student"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    write_jsonl(root / "data.jsonl", ROWS)
    records = [{"id": r["id"], "label": r["label"], "rationale": RATIONALES[r["id"]]} for r in ROWS]
    write_jsonl(root / "rationales.jsonl", records)
    return root


def config(ws: Path, out: str, **overrides) -> RationaleTrainConfig:
    settings = dict(
        student=str(ws / "student"),
        out=str(ws / out),
        task="jsonl",
        data=str(ws / "data.jsonl"),
        rationales=str(ws / "rationales.jsonl"),
        max_steps=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        precision="fp32",
        progress=False,
        log_every=1,
        val_fraction=0.2,
    )
    settings.update(overrides)
    return RationaleTrainConfig(**settings)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- the loss


def rows() -> list[TargetSequence]:
    return [
        TargetSequence(ids=(0, 5, 6, 7, 8, 9, 1), start=4, term=LABEL),
        TargetSequence(ids=(0, 5, 6, 10, 11, 12, 13, 14, 15, 1), start=3, term=RATIONALE),
        TargetSequence(ids=(0, 20, 21, 22, 1), start=4, term=LABEL),
        TargetSequence(ids=(0, 20, 30, 31, 1), start=2, term=RATIONALE),
    ]


def test_the_loss_is_the_mean_target_cross_entropy_of_each_term(ws):
    """Only target tokens count, each term normalized by its own count: checked against full logits by hand."""
    lm = AutoModelForCausalLM.from_pretrained(ws / "student")
    ids, labels, row_terms = pad_right(rows(), pad_id=1)
    assert ids.shape == (4, 10) and (labels[:, -1] == -100).all()
    logits = lm(input_ids=ids).logits
    sums, counts = [0.0, 0.0], [0, 0]
    for i, row in enumerate(rows()):
        for t in range(row.start, len(row.ids)):  # target token t is predicted at position t - 1
            sums[row.term] += F.cross_entropy(logits[i, t - 1], torch.tensor(row.ids[t])).item()
            counts[row.term] += 1
    assert counts == [4, 10]
    total, label, rationale = MultitaskLoss(lm)(
        ids, labels, row_terms=row_terms, weights=(1.0, 0.3), num_items=tuple(counts)
    )
    assert label.item() == pytest.approx(sums[0] / 4, rel=1e-5)
    assert rationale.item() == pytest.approx(sums[1] / 10, rel=1e-5)
    assert total.item() == pytest.approx(sums[0] / 4 + 0.3 * sums[1] / 10, rel=1e-5)
    # Whatever the prompt's labels or the padding hold, the loss is the same: they are masked.
    other_ids = ids.clone()
    other_ids[0, 7:] = 40  # padding of row 0 replaced by other tokens
    again = MultitaskLoss(lm)(other_ids, labels, row_terms=row_terms, weights=(1.0, 0.3), num_items=tuple(counts))
    assert torch.equal(again[0], total)
    unmasked = labels.clone()
    unmasked[labels == -100] = 3
    changed = MultitaskLoss(lm)(ids, unmasked, row_terms=row_terms, weights=(1.0, 0.3), num_items=tuple(counts))
    assert changed[0].item() != pytest.approx(total.item(), rel=1e-3)  # the check above can fail


def test_with_lambda_zero_the_rationale_rows_add_no_gradient(ws):
    lm = AutoModelForCausalLM.from_pretrained(ws / "student")
    loss = MultitaskLoss(lm)
    label_rows = [r for r in rows() if r.term == LABEL]

    def gradient(batch: list[TargetSequence], weight: float) -> list[torch.Tensor]:
        lm.zero_grad()
        ids, labels, row_terms = pad_right(batch, pad_id=1)
        counts = tuple(sum(r.targets for r in batch if r.term == k) for k in (LABEL, RATIONALE))
        total, _, _ = loss(ids, labels, row_terms=row_terms, weights=(1.0, weight), num_items=counts)
        total.backward()
        return [p.grad.clone() for p in lm.parameters()]

    alone = gradient(label_rows, 1.0)
    for a, b in zip(alone, gradient(rows(), 0.0), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # other batch shapes: other float32 rounding
    assert any(not torch.allclose(a, b) for a, b in zip(alone, gradient(rows(), 1.0)))


# ---------------------------------------------------------------------------------------------------- training


def test_lambda_zero_is_plain_fine_tuning_bit_for_bit(ws):
    run_rationale_train(config(ws, "none", rationale_source="none", rationales=None))
    summary = run_rationale_train(config(ws, "lambda0", lambda_rationale=0.0))
    assert summary["data"]["train_with_rationale"] == 0
    run_rationale_train(config(ws, "lambda1"))
    a, b, c = (weights(ws / run / "final") for run in ("none", "lambda0", "lambda1"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a)  # rationales do change the training
    assert all(r["rationale"] > 0 for r in metrics(ws / "lambda1")) and all(
        r["rationale"] == 0 for r in metrics(ws / "lambda0")
    )


def test_gradient_accumulation_1x4_equals_2x2(ws):
    run_rationale_train(config(ws, "accum-1x4", batch_size=4, grad_accum=1, max_steps=5))
    run_rationale_train(config(ws, "accum-2x2", batch_size=2, grad_accum=2, max_steps=5))
    for a, b in zip(metrics(ws / "accum-1x4"), metrics(ws / "accum-2x2"), strict=True):
        for key in ("loss", "label", "rationale", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    a, b = weights(ws / "accum-1x4" / "final"), weights(ws / "accum-2x2" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)


def test_the_step_normalizes_by_the_step_s_token_counts(ws):
    """The normalizers are the global counts of the step's examples, per term (not per micro-batch)."""
    from lmdistill.models.load import load_hf_directory

    _, tokenizer, _ = load_hf_directory(ws / "student", torch.float32)
    cfg = config(ws, "unused")
    examples = load_task("jsonl", "train", data=cfg.data)
    data = train_module.build_data(cfg, tokenizer, examples, RATIONALES)
    assert len(data) == 8 and len(data.val) == 2
    indices = np.arange(4)
    options = data.step_options(indices)
    expected = [sum(s.targets for i in indices for s in data.train[i] if s.term == k) for k in (LABEL, RATIONALE)]
    assert list(options["num_items"]) == expected and options["weights"] == (1.0, 1.0)
    ids, labels, extras = data.batch(indices, torch.device("cpu"))
    assert ids.shape[0] == 8 and int((labels != -100).sum()) == sum(expected)
    assert extras.keys() == {"row_terms"} and data.teacher_targets(ids, indices) == {}  # no teacher
    # a label target is the label's words then the end of the sequence
    row = data.train[0][0]
    assert row.ids[-1] == tokenizer.eos_token_id and row.term == LABEL


def test_resume_after_an_interruption_equals_an_uninterrupted_run(ws, monkeypatch):
    run_rationale_train(config(ws, "straight", max_steps=6, save_every=3))
    real, calls = train_module.chunked_distill_loss, {"n": 0}

    def crash_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # two terms per micro-batch: calls 9 and 10 are step 5's
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "chunked_distill_loss", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_rationale_train(config(ws, "crashed", max_steps=6, save_every=3))
    monkeypatch.setattr(train_module, "chunked_distill_loss", real)
    assert (ws / "crashed" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (ws / "crashed" / "final").exists()
    run_rationale_train(config(ws, "crashed", max_steps=6, save_every=3, resume=True))
    a, b = weights(ws / "straight" / "final"), weights(ws / "crashed" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight, resumed = metrics(ws / "straight"), metrics(ws / "crashed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(straight, resumed, strict=True):
        assert {k: v for k, v in x.items() if k != "tokens_per_s"} == {
            k: v for k, v in y.items() if k != "tokens_per_s"
        }


def test_resume_refuses_another_objective(ws):
    if not (ws / "straight" / "final").exists():
        run_rationale_train(config(ws, "straight", max_steps=6, save_every=3))
    shutil.copytree(ws / "straight" / "checkpoints", ws / "objective" / "checkpoints")
    with pytest.raises(LmdistillError, match=r"step-000006 was trained with --lambda-rationale 1.0 \(now 0.0\);"):
        run_rationale_train(config(ws, "objective", max_steps=6, lambda_rationale=0.0, resume=True))


def test_a_gpt2_student_is_refused_a_max_len_beyond_its_positions(ws):
    gpt2 = save_tiny_teacher(ws / "student-gpt2", kind="gpt2")  # n_positions 64
    with pytest.raises(LmdistillError, match=r"--max-len 65 exceeds the 64 learned positions of the student"):
        run_rationale_train(config(ws, "gpt2", student=str(gpt2), max_len=65))


@pytest.mark.integration
def test_two_processes_match_one_with_the_same_global_batch(ws):
    """torchrun, 2 gloo processes x 2 examples = 1 process x 4: the per-term counts are global."""
    run_rationale_train(config(ws, "ddp-1", batch_size=4, max_steps=3))
    args = ["rationales", "train", "--student", ws / "student", "--task", "jsonl", "--data", ws / "data.jsonl",
            "--rationales", ws / "rationales.jsonl", "--max-steps", 3, "--batch-size", 2, "--lr", 3e-3,
            "--warmup-steps", 1, "--precision", "fp32", "--no-progress", "--log-every", 1, "--val-fraction", 0.2,
            "--out", ws / "ddp-2"]  # fmt: skip
    torchrun(*args)
    for a, b in zip(metrics(ws / "ddp-1"), metrics(ws / "ddp-2"), strict=True):
        assert a.keys() == b.keys()
        for key in {"loss", "label", "rationale", "tokens", "val_loss"} & a.keys():
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    a, b = weights(ws / "ddp-1" / "final"), weights(ws / "ddp-2" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------- the commands


def run(*args) -> int:
    return main([str(a) for a in args])


def test_extract_train_eval_through_the_cli(ws, tmp_path, capsys):
    data, rationales = ws / "data.jsonl", tmp_path / "saliency.jsonl"
    assert run("rationales", "extract", "--teacher", ws / "teacher", "--task", "jsonl", "--data", data,
               "--out", rationales, "--k", 3, "--max-new-tokens", 3, "--progress", "false") == 0  # fmt: skip
    assert len(rationales.read_text().splitlines()) == len(ROWS)
    out = tmp_path / "run"
    assert run("rationales", "train", "--student", ws / "student", "--task", "jsonl", "--data", data,
               "--rationales", rationales, "--lambda-rationale", 0.5, "--max-steps", 3, "--batch-size", 4,
               "--lr", 3e-3, "--precision", "fp32", "--no-progress", "--out", out) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "trained on 9 examples" in printed and "lambda 0.5" in printed
    assert {"config.yaml", "metrics.jsonl", "data_manifest.json", "summary.json", "final"} <= {
        p.name for p in out.iterdir()
    }
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["rationale_source"] == "file" and manifest["train_with_rationale"] >= 1
    assert run("rationales", "eval", "--model", out / "final", "--task", "jsonl", "--data", data, "--split", "train",
               "--max-new-tokens", 3, "--no-progress") == 0  # fmt: skip
    results = json.loads((out / "final" / "rationales_eval.json").read_text())
    assert results["total"] == len(ROWS) and [p["id"] for p in results["predictions"]] == [r["id"] for r in ROWS]
    assert results["accuracy"] == results["correct"] / results["total"]
    for prediction, example in zip(results["predictions"], load_task("jsonl", "train", data=data)):
        if example.choices:
            assert prediction["answer"] in example.choices
        assert prediction["correct"] == is_correct(prediction["answer"], example)
    assert "accuracy" in capsys.readouterr().out
    # the run's config.yaml reproduces its settings through --config
    again = tmp_path / "again"
    assert run("rationales", "train", "--config", out / "config.yaml", "--max-steps", 1, "--out", again) == 0
    saved = yaml.safe_load((again / "config.yaml").read_text())
    assert saved["lambda_rationale"] == 0.5 and saved["rationales"] == str(rationales) and saved["max_steps"] == 1


def test_training_on_labels_makes_the_student_answer_them(ws, tmp_path):
    """Can fail: a student trained on the choice examples must then pick their labels (it starts below that)."""
    rows = [r for r in ROWS if "choices" in r]
    data = write_jsonl(tmp_path / "choices.jsonl", rows)
    common = ["--task", "jsonl", "--data", data, "--split", "train", "--no-progress"]
    assert run("rationales", "eval", "--model", ws / "student", *common, "--out", tmp_path / "before.json") == 0
    before = json.loads((tmp_path / "before.json").read_text())["accuracy"]
    assert run("rationales", "train", "--student", ws / "student", "--task", "jsonl", "--data", data,
               "--rationale-source", "none", "--max-steps", 40, "--batch-size", 5, "--lr", 1e-2,
               "--val-fraction", 0.1, "--precision", "fp32", "--no-progress",
               "--out", tmp_path / "ft") == 0  # fmt: skip
    assert (
        run("rationales", "eval", "--model", tmp_path / "ft" / "final", *common, "--out", tmp_path / "after.json") == 0
    )
    after = json.loads((tmp_path / "after.json").read_text())["accuracy"]
    assert before < 1.0 and after > before, (before, after)


def test_svamp_answers_are_scored_by_the_value_of_the_equation(ws, tmp_path, monkeypatch):
    data = write_jsonl(
        tmp_path / "svamp.json",
        [{"input": "it was 3 and 4", "label": "( 3.0 + 4.0 )"}, {"input": "it is 9 by 9", "label": "( 9.0 * 9.0 )"}],
    )
    answers = iter(["4 + 3", "80"])
    monkeypatch.setattr(
        answers_module, "generate", lambda model, tokenizer, prompts, **kw: [next(answers) for _ in prompts]
    )
    assert run("rationales", "eval", "--model", ws / "student", "--task", "svamp", "--data", data,
               "--no-progress", "--out", tmp_path / "svamp.json.eval") == 0  # fmt: skip
    results = json.loads((tmp_path / "svamp.json.eval").read_text())
    assert [p["correct"] for p in results["predictions"]] == [True, False] and results["accuracy"] == 0.5


def cli_error(capsys, command: str, *args) -> str:
    assert run("rationales", command, *args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"lmdistill rationales {command}: error: "), err
    return last


def test_errors_are_one_line(ws, tmp_path, capsys):
    base = ["--student", ws / "student", "--task", "jsonl", "--data", ws / "data.jsonl", "--precision", "fp32",
            "--no-progress", "--max-steps", 1]  # fmt: skip
    assert "rationales file" in cli_error(capsys, "train", *base, "--rationales", tmp_path / "missing.jsonl", "--out",
                                          tmp_path / "a")  # fmt: skip
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "zz1", "label": "c", "rationale": "x"}])
    message = cli_error(capsys, "train", *base, "--rationales", other, "--out", tmp_path / "b")
    assert "none of the 1 ids" in message and "'zz1'" in message
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"id": "e0", "label": "h", "rationale": "x"}])
    assert "extracted from other data" in cli_error(
        capsys, "train", *base, "--rationales", wrong, "--out", tmp_path / "c"
    )
    assert "--rationales FILE is required" in cli_error(capsys, "train", *base, "--out", tmp_path / "d")
    assert "--rationales applies to --rationale-source file" in cli_error(
        capsys, "train", *base, "--rationale-source", "gold", "--rationales", other, "--out", tmp_path / "e"
    )
    assert "no example of task jsonl has a rationale" in cli_error(
        capsys, "train", *base, "--rationale-source", "gold", "--out", tmp_path / "f"
    )
    assert "--lambda-rationale must be non-negative" in cli_error(
        capsys, "train", *base, "--lambda-rationale", -1, "--rationales", other, "--out", tmp_path / "g"
    )
    assert "--student and --out are required" in cli_error(capsys, "train", "--task", "gsm-symbolic",
                                                           "--rationale-source", "none")  # fmt: skip
    assert "--model is required" in cli_error(capsys, "eval", "--task", "jsonl", "--data", ws / "data.jsonl")
    assert "does not exist" in cli_error(capsys, "eval", "--model", ws / "student", "--task", "jsonl", "--data",
                                         tmp_path / "none.jsonl")  # fmt: skip


def test_a_record_without_rationale_text_trains_only_the_label(ws, tmp_path):
    records = [{"id": "e0", "label": "c", "rationale": ""}, {"id": "e1", "label": "7", "rationale": "3 4"}]
    path = write_jsonl(tmp_path / "few.jsonl", records)
    cfg = config(ws, "unused", rationales=str(path))
    found = train_module.rationale_targets(load_task("jsonl", "train", data=cfg.data), cfg)
    assert found == {"e1": "3 4"}
    with pytest.raises(LmdistillError, match="--rationale-source llm: no example"):
        train_module.rationale_targets(
            load_task("jsonl", "train", data=cfg.data), config(ws, "x", rationale_source="llm", rationales=None)
        )


def test_the_540b_model_and_gold_rationales_are_sources_too(ws, tmp_path, monkeypatch):
    root = tmp_path / "reasoning"
    (root / "svamp" / "llm").mkdir(parents=True)
    write_jsonl(root / "svamp" / "svamp_train.json", [{"input": "it was 3 and 4", "label": "( 3.0 + 4.0 )"}] * 3)
    outputs = ["3 and 4 is 7. The answer is 7.\n\nQ: next", "no marker", "4 and 3. The answer is 7."]
    (root / "svamp" / "llm" / "train_CoT_0.json").write_text(json.dumps(outputs))
    monkeypatch.setenv("LMDISTILL_SHARED_DATA", str(root))
    cfg = config(ws, "llm", task="svamp", data=None, rationale_source="llm", rationales=None)
    found = train_module.rationale_targets(load_task("svamp", "train"), cfg)
    assert found == {"train-0": "3 and 4 is 7.", "train-2": "4 and 3."}
    summary = run_rationale_train(dataclasses.replace(cfg, max_steps=1, val_fraction=0.3))
    assert summary["data"]["train_with_rationale"] + summary["data"]["heldout_examples"] >= 2
    pytest.importorskip("reasoning_gym")
    gsm = config(ws, "gsm", task="gsm-symbolic", data=None, rationale_source="gold", rationales=None, size=4)
    examples = load_task("gsm-symbolic", "train", size=4)
    assert train_module.rationale_targets(examples, gsm) == {e.id: e.rationale for e in examples}


# ---------------------------------------------------------------------------------------------------- sequences


def word_tokenizer(*texts: str):
    """A word-level fast tokenizer knowing every word and punctuation run of ``texts`` (nothing is <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = sorted({p for t in texts for p, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *pieces])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


def sequence_tokens(tokenizer, sequence: TargetSequence) -> tuple[list[str], list[str]]:
    """The prompt's tokens and the target's."""
    tokens = tokenizer.convert_ids_to_tokens(list(sequence.ids))
    return tokens[: sequence.start], tokens[sequence.start :]


def test_explain_and_predict_sequences_end_in_different_cues(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = RationaleTrainConfig(student="s", out="o", task="jsonl", data=str(data), rationales="r", val_fraction=0.2)
    texts = [f"{r['input']} {r['label']} {' '.join(r.get('choices', []))}" for r in ROWS]
    tokenizer = word_tokenizer("predict explain Answer Rationale Choices : ( )", *RATIONALES.values(), *texts)
    built = train_module.build_data(cfg, tokenizer, load_task("jsonl", "train", data=data), RATIONALES)
    for predict, explain in built.train + built.val:
        (predict_prompt, label), (explain_prompt, rationale) = (
            sequence_tokens(tokenizer, s) for s in (predict, explain)
        )
        assert predict_prompt[-2:] == ["Answer", ":"] and explain_prompt[-2:] == ["Rationale", ":"]
        assert predict_prompt[0] == "predict" and explain_prompt[0] == "explain"
        assert predict_prompt[1:-2] == explain_prompt[1:-2]  # the same example text and template otherwise
        assert "<unk>" not in label + rationale and label[-1] == rationale[-1] == "</s>"


def test_long_prompts_lose_the_example_s_text_and_keep_prefix_cue_and_target():
    nli = Example(id="n", inputs={"premise": "a b c d e f", "hypothesis": "g h i j"}, label="neutral")
    prompt = render_prompt(nli, TASKS["esnli"].template, "explain")
    tokenizer = word_tokenizer(prompt.text, "one two three")
    whole, cut = train_module.encode(tokenizer, prompt, "one two three", RATIONALE, 100)
    assert not cut and len(whole.ids) == 28  # 24 prompt tokens, 3 target words, end of sequence
    # 4 tokens too many: the longest span loses its last token until it ties, then the earliest: 6 + 4 -> 3 + 3
    short, cut = train_module.encode(tokenizer, prompt, "one two three", RATIONALE, 24)
    prompt_tokens, target = sequence_tokens(tokenizer, short)
    assert cut and len(short.ids) == 24 and target == ["one", "two", "three", "</s>"]
    assert " ".join(prompt_tokens) == (
        "explain : Premise : a b c Hypothesis : g h i Entailment , neutral or contradiction ? Rationale :"
    )
    # at the limit the whole example text is gone; one token less and the rest does not fit
    bare, _ = train_module.encode(tokenizer, prompt, "one two three", RATIONALE, 18)
    assert " ".join(sequence_tokens(tokenizer, bare)[0]) == (
        "explain : Premise : Hypothesis : Entailment , neutral or contradiction ? Rationale :"
    )
    with pytest.raises(LmdistillError, match="--max-len 17 is too short: .* take 18 tokens"):
        train_module.encode(tokenizer, prompt, "one two three", RATIONALE, 17)


def test_build_data_cuts_inside_the_example_and_refuses_in_one_line(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": "long", "input": "w1 w2 w3 w4 w5 w6 w7 w8", "label": "w9"}])
    tokenizer = word_tokenizer("predict : Answer w1 w2 w3 w4 w5 w6 w7 w8 w9")
    cfg = RationaleTrainConfig(student="s", out="o", task="jsonl", data=str(data), rationale_source="none", max_len=7,
                               val_fraction=0.5)  # fmt: skip
    examples = load_task("jsonl", "train", data=data) * 2
    examples[1] = dataclasses.replace(examples[1], id="long-2")
    built = train_module.build_data(cfg, tokenizer, examples, {})
    (sequence,) = built.train[0]
    assert tokenizer.convert_ids_to_tokens(list(sequence.ids)) == ["predict", ":", "w1", "Answer", ":", "w9", "</s>"]
    assert built.manifest["sequences_cut"] == 2
    with pytest.raises(LmdistillError, match=r"^the predict: sequence of example 'long': --max-len 5 is too short"):
        train_module.build_data(dataclasses.replace(cfg, max_len=5), tokenizer, examples, {})
