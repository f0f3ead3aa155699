"""Saliency rationales: task loaders, prompts, attribution identities, word merging, and `rationales extract`."""

from __future__ import annotations

import json
import random
import re
import typing

import pytest
import torch
import yaml
from conftest import save_tiny_teacher, tiny_teacher

from lmdistill.cli import main
from lmdistill.commands.rationales_extract import extract_batch
from lmdistill.config import RationaleExtractConfig, RationaleTask
from lmdistill.errors import LmdistillError
from lmdistill.rationales import attribution
from lmdistill.rationales.attribution import (
    answer_attributions,
    attribute,
    choice_logprobs,
    choose,
    continuation_logprob,
)
from lmdistill.rationales.records import random_records
from lmdistill.rationales.tasks import (
    SHARED_DATA_ENV,
    TASKS,
    Example,
    arithmetic_value,
    is_correct,
    load_task,
    premise_split,
    render_prompt,
    shared_data_root,
    task_splits,
)
from lmdistill.rationales.words import (
    STOP_WORDS,
    Word,
    random_words,
    rationale_text,
    select_words,
    split_words,
    word_scores,
)

METHODS = ["saliency", "input-x-gradient", "integrated-gradients"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------- task loaders


@pytest.fixture
def made_up_root(tmp_path, monkeypatch):
    """A shared-data root with a few lines of every task in its real format, and 540B-model rationale files."""
    root = tmp_path / "reasoning"
    for folder in ("svamp/llm", "cqa/llm", "anli1", "esnli"):
        (root / folder).mkdir(parents=True)
    write_jsonl(
        root / "svamp/svamp_train.json",
        [
            {"input": "Luke scored 84 points in 2 rounds. How many per round?", "label": "( 84.0 / 2.0 )"},
            {"input": "Faye has 7 rows of 30 crayons. How many crayons?", "label": "( 7.0 * 30.0 )"},
            {"input": "Ann had 5 pens and lost 2. How many are left?", "label": "( 5.0 - 2.0 )"},
        ],
    )
    (root / "svamp/llm/train_CoT_0.json").write_text(
        json.dumps(["He scored 84 in 2 rounds. The answer is (84 / 2).\n\nQ: next question", "no marker here"])
    )
    (root / "svamp/llm/train_CoT_1.json").write_text(json.dumps(["5 - 2 = 3. The answer is (5 - 2)."]))
    cqa = {
        "id": "abc",
        "question": "Where do you keep milk cold?",
        "choices": ["oven", "fridge", "shelf"],
        "answer": "fridge",
        "abstractive_explanation": "fridges keep things cold",
        "extractive_explanation": "cold",
    }
    write_jsonl(root / "cqa/cqa_train.json", [cqa])
    (root / "cqa/llm/train_CoT_0.json").write_text(
        json.dumps(["Milk must stay cold. So the answer is (b) fridge.\n\nQ: another"])
    )
    nli = {"premise": "Two women are hugging.", "hypothesis": "Two people embrace.", "label": 0}
    write_jsonl(root / "anli1/anli1_valid.json", [{**nli, "uid": "u1", "reason": "hugging is embracing"}])
    write_jsonl(root / "esnli/esnli_valid.json", [{**nli, "label": 2, "explanation_1": "e1", "explanation_2": "e2"}])
    monkeypatch.setenv(SHARED_DATA_ENV, str(root))
    return root


def test_every_task_format_loads_from_made_up_files(made_up_root):
    svamp = load_task("svamp", "train")
    assert [e.id for e in svamp] == ["train-0", "train-1", "train-2"]
    assert svamp[0].inputs == {"input": "Luke scored 84 points in 2 rounds. How many per round?"}
    assert svamp[0].label == "( 84.0 / 2.0 )" and svamp[0].choices == ()
    # 540B-model rationales: text before the next few-shot "Q:", cut at the answer phrase; None without it
    assert [e.llm_rationale for e in svamp] == ["He scored 84 in 2 rounds.", None, "5 - 2 = 3."]

    (cqa,) = load_task("cqa", "train")
    assert cqa == Example(
        id="abc",
        inputs={"input": "Where do you keep milk cold?"},
        label="fridge",
        choices=("oven", "fridge", "shelf"),
        rationale="fridges keep things cold",
        llm_rationale="Milk must stay cold.",
    )
    (anli,) = load_task("anli1", "valid")
    assert anli.id == "u1" and anli.label == "entailment" and anli.rationale == "hugging is embracing"
    assert anli.inputs == {"premise": "Two women are hugging.", "hypothesis": "Two people embrace."}
    assert anli.choices == ("entailment", "neutral", "contradiction")
    (esnli,) = load_task("esnli", "valid")
    assert esnli.id == "valid-0" and esnli.label == "contradiction" and esnli.rationale == "e1"

    assert [e.id for e in load_task("svamp", "train", limit=2)] == ["train-0", "train-1"]
    # --data reads a file in the task's format from anywhere, without the 540B rationales
    (copy,) = load_task("cqa", "test", data=made_up_root / "cqa/cqa_train.json")
    assert copy.label == "fridge" and copy.llm_rationale is None


def test_generic_jsonl_format(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "q1", "input": "Is the sky blue?", "label": "yes", "choices": ["yes", "no"], "rationale": "sky"},
            "",
            {"input": "2 + 2", "label": 4, "extra": "ignored"},
            {"id": 7, "input": "Name a colour.", "label": "red"},
        ],
    )
    examples = load_task("jsonl", "train", data=path)
    assert examples == [
        Example(id="q1", inputs={"input": "Is the sky blue?"}, label="yes", choices=("yes", "no"), rationale="sky"),
        Example(id="train-1", inputs={"input": "2 + 2"}, label="4"),
        Example(id="7", inputs={"input": "Name a colour."}, label="red"),
    ]


def loader_error(*args, **kwargs) -> str:
    with pytest.raises(LmdistillError) as info:
        load_task(*args, **kwargs)
    return str(info.value)


def test_loader_errors_say_what_and_where(made_up_root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    assert "line 2 is not valid JSON" in loader_error(
        "jsonl", "train", data=write_jsonl(bad, ['{"input": "a", "label": "b"}', "{oops"])
    )
    assert "line 1: missing field 'input'" in loader_error("jsonl", "train", data=write_jsonl(bad, ['{"label": "b"}']))
    assert "line 1 must be a JSON object" in loader_error("jsonl", "train", data=write_jsonl(bad, ["[1, 2]"]))
    assert "line 1: the label 'c' is not one of the choices" in loader_error(
        "jsonl", "train", data=write_jsonl(bad, [{"input": "a", "label": "c", "choices": ["a", "b"]}])
    )
    assert "field 'choices' must be a non-empty list" in loader_error(
        "jsonl", "train", data=write_jsonl(bad, [{"input": "a", "label": "a", "choices": "a"}])
    )
    assert "the id 'x' occurs twice" in loader_error(
        "jsonl", "train", data=write_jsonl(bad, [{"id": "x", "input": "a", "label": "b"}] * 2)
    )
    assert "holds no examples" in loader_error("jsonl", "train", data=write_jsonl(bad, [""]))
    assert "does not exist" in loader_error("jsonl", "train", data=tmp_path / "missing.jsonl")
    assert "--task jsonl reads the file given by --data" in loader_error("jsonl", "train")
    assert "unknown task 'gsm8k'" in loader_error("gsm8k", "train")
    assert "task anli1 has the splits valid, not 'train'" in loader_error("anli1", "train")
    assert "must be 0 (entailment), 1 (neutral) or 2 (contradiction), got 3" in loader_error(
        "anli1", "valid", data=write_jsonl(bad, [{"uid": "u", "premise": "p", "hypothesis": "h", "label": 3}])
    )
    (made_up_root / "svamp/llm/train_CoT_1.json").write_text("[]")
    assert "holds 2 train rationales for 3 examples" in loader_error("svamp", "train")
    (made_up_root / "cqa/cqa_train.json").unlink()
    message = loader_error("cqa", "train")
    assert str(made_up_root / "cqa/cqa_train.json") in message and SHARED_DATA_ENV in message


SHARED_COUNTS = {("svamp", "train"): 800, ("svamp", "test"): 200, ("cqa", "train"): 9741, ("cqa", "test"): 1221,
                 ("anli1", "valid"): 1000, ("esnli", "valid"): 9842, ("esnli", "train"): 6671,
                 ("esnli", "validation"): 703, ("esnli", "test"): 2468}  # fmt: skip


@pytest.mark.skipif(not (shared_data_root() / "svamp").is_dir(), reason="shared task data not present")
@pytest.mark.parametrize(("task", "split"), list(SHARED_COUNTS))
def test_the_shared_data_loads(task, split):
    examples = load_task(task, split)
    assert len(examples) == SHARED_COUNTS[task, split]
    if task in ("svamp", "cqa"):  # the 540B-model rationales are aligned with every example, almost all parseable
        assert sum(e.llm_rationale is not None for e in examples) >= 0.98 * len(examples)
    if task == "cqa":
        assert all(len(e.choices) == 5 and e.label in e.choices for e in examples)


def premise_key(example: Example) -> str:
    return " ".join(re.findall(r"\w+", example.inputs["premise"].casefold()))


def test_esnli_splits_by_premise(tmp_path, monkeypatch):
    """train, validation and test divide the valid file by premise (case and punctuation aside), deterministically."""
    rows = []
    for p in range(60):
        for h, label in enumerate((0, 1, 2)):  # three hypotheses per premise, one written otherwise
            premise = f"Premise number {p} here." if h < 2 else f"premise NUMBER {p} here"
            rows.append({"premise": premise, "hypothesis": f"h{h}", "label": label, "explanation_1": f"e{p}-{h}"})
    (tmp_path / "esnli").mkdir()
    write_jsonl(tmp_path / "esnli/esnli_valid.json", rows)
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    whole = load_task("esnli", "valid")
    splits = {split: load_task("esnli", split) for split in ("train", "validation", "test")}
    assert sorted(e.id for part in splits.values() for e in part) == sorted(e.id for e in whole)  # ids of the file
    premises = {split: {premise_key(e) for e in part} for split, part in splits.items()}
    assert len(set.union(*premises.values())) == 60 == sum(map(len, premises.values()))  # no premise on two sides
    assert all(len(part) == 3 * len(premises[split]) for split, part in splits.items())
    assert all(premise_split(e.inputs["premise"]) == split for split, part in splits.items() for e in part)
    assert [len(premises[s]) for s in ("train", "validation", "test")] == [48, 2, 10]  # pinned: the rule is fixed
    assert load_task("esnli", "test") == splits["test"] and load_task("esnli", "test", limit=2) == splits["test"][:2]
    assert all(e.rationale == rows[int(e.id.removeprefix("valid-"))]["explanation_1"] for e in splits["test"])
    with pytest.raises(LmdistillError, match="task esnli has the splits valid, train, validation, test, not 'dev'"):
        load_task("esnli", "dev")
    with pytest.raises(LmdistillError, match="task anli1 has the splits valid, not 'validation'"):
        load_task("anli1", "validation")


@pytest.mark.skipif(not (shared_data_root() / "esnli").is_dir(), reason="shared task data not present")
def test_the_shared_esnli_splits_share_no_premise():
    premises = {split: {premise_key(e) for e in load_task("esnli", split)} for split in ("train", "validation", "test")}
    assert not premises["train"] & premises["test"] and not premises["validation"] & (
        premises["train"] | premises["test"]
    )
    assert len(load_task("esnli", "test")) >= 2000
    assert task_splits("esnli") == ("valid", "train", "validation", "test") and task_splits("svamp") == (
        "train",
        "test",
    )


def test_gsm_symbolic_is_generated_with_disjoint_splits_and_gold_rationales():
    pytest.importorskip("reasoning_gym")
    train = load_task("gsm-symbolic", "train", size=50, seed=3)
    assert load_task("gsm-symbolic", "train", size=50, seed=3, limit=4) == train[:4]  # prefix-stable
    test = load_task("gsm-symbolic", "test", size=50, seed=3)
    assert not {e.inputs["input"] for e in train} & {e.inputs["input"] for e in test}
    assert load_task("gsm-symbolic", "train", size=50, seed=4)[0] != train[0]
    for e in train:
        assert arithmetic_value(e.label) is not None and e.rationale and "####" not in e.rationale
        assert not e.inputs["input"].endswith("Do not include units.")
    with pytest.raises(LmdistillError, match="does not apply to gsm-symbolic"):
        load_task("gsm-symbolic", "train", data="x.jsonl")


def test_the_config_lists_every_task():
    assert set(typing.get_args(RationaleTask)) == set(TASKS)


# ---------------------------------------------------------------------------------------------------- prompts


def test_prompts_mark_exactly_the_examples_own_text():
    example = Example(id="1", inputs={"input": "Where is milk?"}, label="fridge", choices=("oven", "fridge"))
    prompt = render_prompt(example, TASKS["cqa"].template)
    assert prompt.text == "predict: Where is milk?\nChoices: (a) oven (b) fridge\nAnswer:"
    assert [prompt.text[a:b] for a, b in prompt.spans] == ["Where is milk?", "oven", "fridge"]
    explain = render_prompt(example, TASKS["cqa"].template, mode="explain")
    assert explain.text.startswith("explain: Where is milk?\n")
    plain = render_prompt(Example(id="2", inputs={"input": "2 + 3"}, label="5"), "{input}{choices}\nAnswer:")
    assert plain.text == "predict: 2 + 3\nAnswer:" and plain.spans == ((9, 14),)
    nli = Example(id="3", inputs={"premise": "P.", "hypothesis": "H."}, label="neutral", choices=("a", "b"))
    prompt = render_prompt(nli, TASKS["anli1"].template)
    assert [prompt.text[a:b] for a, b in prompt.spans] == ["P.", "H."]  # the class names are template text


@pytest.mark.parametrize("task", list(TASKS))
def test_explain_prompts_end_in_their_own_cue(task):
    """The label and the rationale follow different cues: explain: ends in Rationale:, predict: in the task's own."""
    inputs = {"premise": "P.", "hypothesis": "H."} if "premise" in TASKS[task].fields else {"input": "Where is it?"}
    example = Example(id="1", inputs=inputs, label="b", choices=("a", "b"))
    predict = render_prompt(example, TASKS[task].template, "predict")
    explain = render_prompt(example, TASKS[task].template, "explain")
    cue = TASKS[task].template.rsplit("\n", 1)[1]
    assert cue in ("Answer:", "Equation:") and predict.text.endswith("\n" + cue)
    assert explain.text == "explain" + predict.text.removeprefix("predict").removesuffix(cue) + "Rationale:"
    assert [explain.text[a:b] for a, b in explain.spans] == [predict.text[a:b] for a, b in predict.spans]
    # a template whose last line holds a field has no cue of its own: the explain prompt gets one
    bare = render_prompt(example, "Q: {input} A:" if "input" in inputs else "{premise} {hypothesis}", "explain")
    assert bare.text.endswith("\nRationale:") and bare.text.count("Rationale:") == 1


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{question}\nAnswer:", "{question} is not one of task cqa's: {input}, {choices}"),
        ("{choices}\nAnswer:", "shows none of the example's text"),
        ("{input:>10}", "must be a plain name"),
        ("{input", "is not valid"),
    ],
)
def test_bad_templates_are_refused(template, message):
    with pytest.raises(LmdistillError, match=message.replace("{", r"\{").replace("}", r"\}")):
        RationaleExtractConfig(task="cqa", template=template, out="x.jsonl")


def test_answers_are_checked_by_choice_number_or_text():
    mc = Example(id="1", inputs={"input": "q"}, label="fridge", choices=("oven", "fridge"))
    assert is_correct("fridge", mc) and not is_correct("oven", mc)
    svamp = Example(id="2", inputs={"input": "q"}, label="( 84.0 / 2.0 )")
    for answer in ("42", "84 / 2", "(84/2)", "84 / 2 = 42", "42.0."):
        assert is_correct(answer, svamp), answer
    for answer in ("41", "84 * 2", "forty-two", ""):
        assert not is_correct(answer, svamp), answer
    assert arithmetic_value("1,250 + 3") == 1253.0 and arithmetic_value("1 / 0") is None
    assert arithmetic_value("__import__('os')") is None and arithmetic_value("2 ** 3") is None
    text = Example(id="3", inputs={"input": "q"}, label="Red")
    assert is_correct(" red.", text) and not is_correct("blue", text)


# ---------------------------------------------------------------------------------------------------- words

# "predict: Don't feed the cat-food, 12.5 (kg)!\nAnswer:" with the example's text at [9, 44), tokenized like a
# byte-level BPE (leading spaces inside tokens), with a special token first.
TEXT = "predict: Don't feed the cat-food, 12.5 (kg)!\nAnswer:"
SPANS = [(9, 44)]
TOKENS = [  # (piece, start, end, score, special)
    ("<s>", 0, 0, 100.0, True),
    ("predict", 0, 7, 50.0, False),
    (":", 7, 8, 40.0, False),
    (" Don", 8, 12, 1.0, False),
    ("'t", 12, 14, 2.0, False),
    (" feed", 14, 19, 3.0, False),
    (" the", 19, 23, 9.0, False),
    (" cat", 23, 27, 4.0, False),
    ("-", 27, 28, 0.5, False),
    ("food", 28, 32, 0.25, False),
    (",", 32, 33, 30.0, False),
    (" 12", 33, 36, 0.125, False),
    (".", 36, 37, 0.0625, False),
    ("5", 37, 38, 1.0, False),
    (" (", 38, 40, 7.0, False),
    ("kg", 40, 42, 6.0, False),
    (")!", 42, 44, 20.0, False),
    ("\n", 44, 45, 10.0, False),
    ("Answer", 45, 51, 70.0, False),
    (":", 51, 52, 80.0, False),
]


def test_words_merge_sub_word_pieces_and_skip_template_special_and_punctuation():
    assert [TEXT[a:b] for _, a, b, _, _ in TOKENS[1:]] == [t for t, *_ in TOKENS[1:]]  # the offsets are right
    words = split_words(TEXT, SPANS)
    assert words == [
        Word("Don't", 9, 14),
        Word("feed", 15, 19),
        Word("the", 20, 23),
        Word("cat-food", 24, 32),
        Word("12.5", 34, 38),
        Word("kg", 40, 42),
    ]
    scores = word_scores(words, [(a, b) for _, a, b, _, _ in TOKENS], [s for *_, s, _ in TOKENS],
                         [sp for *_, sp in TOKENS])  # fmt: skip
    assert scores == [3.0, 3.0, 9.0, 4.75, 1.1875, 6.0]  # " (" and ")!" touch "kg" without overlapping it
    # the special token's (0, 0) offsets would overlap nothing anyway; flagged, even a real range is skipped
    assert word_scores(words[:1], [(9, 14)], [5.0], [True]) == [0.0]
    assert split_words("!!! -- (a) ...", [(0, 14)]) == [Word("a", 8, 9)]


def test_selection_drops_stop_words_and_duplicates_and_keeps_top_k():
    words = [Word(w, i, i + 1) for i, w in enumerate(["The", "cat", "sat", "the", "Cat", "mat", "on"])]
    scores = [9.0, 1.0, 3.0, 8.0, 5.0, 3.0, 7.0]
    assert "the" in STOP_WORDS and "on" in STOP_WORDS and "not" not in STOP_WORDS
    assert select_words(words, scores, 3) == [("Cat", 5.0), ("sat", 3.0), ("mat", 3.0)]  # tie: input order
    assert select_words(words, scores, 3, order="input") == [("sat", 3.0), ("Cat", 5.0), ("mat", 3.0)]
    assert select_words(words, scores, 2, drop_stop_words=False) == [("The", 9.0), ("on", 7.0)]
    assert select_words(words, scores, 10) == [("Cat", 5.0), ("sat", 3.0), ("mat", 3.0)]
    assert rationale_text([("Cat", 5.0), ("sat", 3.0)]) == "Cat sat"


def test_random_words_draw_only_candidates_reproducibly_and_unlike_saliency():
    prompt = render_prompt(Example(id="x", inputs={"input": "The cat sat on the mat; the Cat, a dog!"}, label="c"),
                           "{input}\nAnswer:")  # fmt: skip
    words = split_words(prompt.text, prompt.spans)
    scores = [float(len(words) - i) for i in range(len(words))]  # saliency ranks them in input order
    candidates = {w for w, _ in select_words(words, scores, 100)}
    assert candidates == {"cat", "sat", "mat", "dog"}  # the first "cat"; no stop word, no template word
    draws = [random_words(words, 2, random.Random(f"7:{i}")) for i in range(40)]
    for drawn in draws:
        assert len(drawn) == 2 and len({w for w, _ in drawn}) == 2 and {w for w, _ in drawn} <= candidates
        assert all(score is None for _, score in drawn)
    assert draws == [random_words(words, 2, random.Random(f"7:{i}")) for i in range(40)]  # the same seeds, the same
    assert {w for drawn in draws for w, _ in drawn} == candidates  # every candidate gets drawn
    saliency = [w for w, _ in select_words(words, scores, 2)]
    assert saliency == ["cat", "sat"] and sum([w for w, _ in d] != saliency for d in draws) >= 30
    longest = random_words(words, 10, random.Random("7:0"))
    assert random_words(words, 1, random.Random("7:0")) == longest[:1] and len(longest) == 4  # prefixes; at most all
    with_stop = {w for w, _ in random_words(words, 10, random.Random(0), drop_stop_words=False)}
    assert with_stop == candidates | {"The", "on", "a"}


def test_random_records_are_seeded_per_example():
    examples = [Example(id=f"e{i}", inputs={"input": f"w{i} x{i} y{i} z{i} v{i}"}, label=f"w{i}") for i in range(6)]
    records = random_records(examples, "{input}\nAnswer:", 3, seed=1, drop_stop_words=True)
    assert random_records(examples[3:], "{input}\nAnswer:", 3, seed=1, drop_stop_words=True) == records[3:]
    other = random_records(examples, "{input}\nAnswer:", 3, seed=2, drop_stop_words=True)
    assert other != records and [r["id"] for r in other] == [r["id"] for r in records]
    for record, example in zip(records, examples):
        assert set(record) == {"id", "label", "words", "rationale"} and record["label"] == example.label
        assert record["rationale"] == " ".join(w for w, _ in record["words"]) and len(record["words"]) == 3
        assert {w for w, _ in record["words"]} <= set(example.inputs["input"].split())


# ---------------------------------------------------------------------------------------------------- attribution


def linear_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(3, 5, 4, generator=generator)  # [B, T, d]
    weights = torch.randn(3, 5, 4, generator=generator)

    def forward(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (e * w).sum((1, 2)) + 0.5  # [B]

    return embeds, weights, forward


@pytest.mark.parametrize("reduction", ["l1", "l2"])
def test_attribution_of_a_linear_model_is_its_analytic_per_token_contribution(reduction):
    embeds, weights, forward = linear_case()
    everywhere = torch.ones(3, 5, dtype=torch.bool)
    norm = (lambda x: x.abs().sum(-1)) if reduction == "l1" else (lambda x: x.norm(dim=-1))

    def run(method: str, attributed: torch.Tensor = everywhere) -> torch.Tensor:
        return attribute(forward, embeds, attributed, method=method, reduction=reduction, ig_steps=7,
                         forward_args=(weights,))  # fmt: skip

    torch.testing.assert_close(run("saliency"), norm(weights))  # d f / d e_t = w_t
    torch.testing.assert_close(run("input-x-gradient"), norm(weights * embeds))  # w_t * e_t
    # a constant gradient integrates exactly: IG from a zero baseline is input x gradient
    torch.testing.assert_close(run("integrated-gradients"), norm(weights * embeds))
    some = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    for method in METHODS:
        part = run(method, some)
        assert torch.equal(part[~some], torch.zeros(int((~some).sum())))
        torch.testing.assert_close(part[some], run(method)[some])


def test_integrated_gradients_moves_only_the_attributed_positions():
    # f(e) = e_0 * e_1 (one-dimensional embeddings), only position 0 attributed: with e_1 held at its value the
    # path integral is e_0 * e_1 = f(x) - f(baseline) (completeness); moving e_1 too would give half of it
    embeds = torch.tensor([[[3.0], [-2.0]]])  # [B=1, T=2, d=1]
    attributed = torch.tensor([[True, False]])
    scores = attribute(lambda e: e[:, 0, 0] * e[:, 1, 0], embeds, attributed, method="integrated-gradients")
    torch.testing.assert_close(scores, torch.tensor([[6.0, 0.0]]))


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_integrated_gradients_from_a_token_is_complete_where_from_zero_it_is_not(eps):
    # Completeness: the signed attributions sum to log p(answer | prompt) - log p(answer | baseline prompt). The
    # teacher is pre-norm: RMSNorm(α e) does not depend on α but within its eps of α = 0, where log p jumps; the 20
    # quadrature nodes miss the jump from zero vectors, never crossing 0 from a token's embedding.
    model = tiny_teacher("llama", rms_norm_eps=eps)
    prompt, answer, pad_id = [5, 9, 14, 3, 22, 40, 41], [7, 8], 1
    ids = torch.tensor([prompt + answer])
    embeds = model.get_input_embeddings()(ids).detach()
    is_prompt = torch.arange(ids.shape[1]).unsqueeze(-1) < len(prompt)  # [T, 1]
    zero_prompt = torch.where(is_prompt, 0.0, embeds)
    mask, targets = torch.ones_like(ids, dtype=torch.bool), torch.tensor([answer])
    with torch.no_grad():
        logp = {name: continuation_logprob(model, e, mask, targets, targets >= 0).item()
                for name, e in (("x", embeds), ("zero", zero_prompt))}  # fmt: skip
    logp["token"] = choice_logprobs(model, [[pad_id] * len(prompt)], [[answer]], batch_size=1, pad_id=0)[0].item()

    def total(**baseline) -> float:
        (scores,) = answer_attributions(model, [prompt], [answer], method="integrated-gradients", reduction="sum",
                                        ig_steps=20, pad_id=pad_id, **baseline)  # fmt: skip
        return scores.sum().item()

    assert total() == pytest.approx(logp["x"] - logp["token"], abs=1e-3)  # the default: the pad token
    assert total(ig_baseline="token") == pytest.approx(total())
    assert abs(total(ig_baseline="zero") - (logp["x"] - logp["zero"])) > 0.5


def test_saliency_is_the_gradient_of_the_answer_log_probability():
    model = tiny_teacher("llama")
    prompt, answer = [5, 9, 14, 3, 22], [7, 8]
    (scores,) = answer_attributions(model, [prompt], [answer], method="saliency", pad_id=0)
    ids = torch.tensor([prompt + answer])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logprobs = torch.log_softmax(model(inputs_embeds=embeds).logits[0], dim=-1)  # [T, V]
    target = logprobs[4, 7] + logprobs[5, 8]  # positions 4 and 5 predict the answer tokens
    (grad,) = torch.autograd.grad(target, embeds)
    torch.testing.assert_close(scores, grad[0, :5].abs().sum(-1))
    torch.testing.assert_close(choice_logprobs(model, [prompt], [[answer]], batch_size=1, pad_id=0)[0],
                               target.detach().reshape(1))  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_attributions_do_not_depend_on_the_batch(kind, method):
    model = tiny_teacher(kind)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    answers = [[3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 4]]
    alone = [answer_attributions(model, [p], [a], method=method, pad_id=0)[0] for p, a in zip(prompts, answers)]
    order = [2, 0, 1]
    batched = answer_attributions(model, [prompts[i] for i in order], [answers[i] for i in order], method=method,
                                  pad_id=0)  # fmt: skip
    for i, scores in zip(order, batched):
        assert scores.shape == (len(prompts[i]),)
        torch.testing.assert_close(scores, alone[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_choices_from_the_prompt_cache_equal_whole_sequences(kind, batch_size):
    # each prompt runs once and its choices continue from its cache; the reference runs every prompt + choice whole
    model = tiny_teacher(kind)
    prompts = [[5, 6, 7], [8, 9], [20, 21, 22, 23, 24, 25]]
    choices = [[[10], [11, 12], [13]], [[14, 15, 16], [17]], [[30, 31], [32, 33, 34, 35], [36], [37]]]
    scores = choice_logprobs(model, prompts, choices, batch_size=batch_size, pad_id=0)
    for prompt, options, got in zip(prompts, choices, scores):
        whole = []
        for choice in options:
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([prompt + choice])).logits[0], dim=-1)  # [T, V]
            whole.append(sum(logprobs[len(prompt) - 1 + j, token] for j, token in enumerate(choice)))
        torch.testing.assert_close(got, torch.stack(whole), rtol=1e-4, atol=1e-5)


def test_the_teacher_picks_the_most_likely_choice():
    model = tiny_teacher("llama")
    prompts = [[5, 6, 7], [8, 9]]
    choices = [[[10], [11, 12], [13]], [[14, 15, 16], [17]]]
    total = choice_logprobs(model, prompts, choices, batch_size=2, pad_id=0)
    assert choose(model, prompts, choices, batch_size=1, pad_id=0) == [int(t.argmax()) for t in total]
    mean = [total[0] / torch.tensor([1.0, 2.0, 1.0]), total[1] / torch.tensor([3.0, 1.0])]
    assert choose(model, prompts, choices, batch_size=1, pad_id=0, per_token=True) == [int(m.argmax()) for m in mean]
    assert [int(t.argmax()) for t in total] != [int(m.argmax()) for m in mean]  # the two scores pick differently here


# ---------------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


ROWS = [
    {"id": "q1", "input": "the cat is on the mat", "label": "mat", "choices": ["mat", "hat", "bat"]},
    {"input": "it was 3 and 4", "label": "7"},
    {"id": "q3", "input": "this is a test of the words", "label": "b", "choices": ["b", "c"]},
    {"id": "q4", "input": "x y z and q", "label": "q", "choices": ["x", "q"]},
    {"id": "q5", "input": "1 2 3 4 5 6", "label": "21"},
]


def extract(teacher_dir, data, out, *extra) -> int:
    args = ["rationales", "extract", "--teacher", teacher_dir, "--task", "jsonl", "--data", data, "--out", out,
            "--k", "3", "--batch-size", "2", "--max-new-tokens", "4", "--progress", "false", *extra]  # fmt: skip
    return main([str(a) for a in args])


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_extract_end_to_end_through_the_cli(teacher_dir, tmp_path, capsys, method):
    data, out = write_jsonl(tmp_path / "data.jsonl", ROWS), tmp_path / "rationales.jsonl"
    assert extract(teacher_dir, data, out, "--method", method) == 0
    records = lines(out)
    assert [r["id"] for r in records] == ["q1", "train-1", "q3", "q4", "q5"]
    for record, row, example in zip(records, ROWS, load_task("jsonl", "train", data=data)):
        assert set(record) == {"id", "answer", "label", "correct", "words", "rationale"}
        assert record["label"] == str(row["label"])
        if "choices" in row:
            assert record["answer"] in row["choices"]
        assert record["correct"] == is_correct(record["answer"], example)
        words = [w for w, _ in record["words"]]
        allowed = set(row["input"].split()) | set(row.get("choices", ()))
        assert 1 <= len(words) <= 3 and set(words) <= allowed and not set(words) & STOP_WORDS
        assert len(set(words)) == len(words)
        scores = [s for _, s in record["words"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
        assert record["rationale"] == " ".join(words)
    settings = yaml.safe_load((tmp_path / "rationales.jsonl.config.yaml").read_text())
    assert settings["method"] == method and settings["template"] == "{input}{choices}\nAnswer:"
    printed = capsys.readouterr().out
    assert "5 new rationales" in printed and "teacher accuracy" in printed


@pytest.mark.parametrize("ig_baseline", ["token", "zero"])
def test_the_ig_baseline_option_reaches_the_attribution(teacher_dir, monkeypatch, ig_baseline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir)
    seen, original = [], attribution.attribute

    def spy(*args, **kwargs):
        seen.append(kwargs["ig_baseline"])
        return original(*args, **kwargs)

    monkeypatch.setattr(attribution, "attribute", spy)
    config = RationaleExtractConfig(task="jsonl", data="unused", out="unused", method="integrated-gradients",
                                    ig_baseline=ig_baseline)  # fmt: skip
    extract_batch(model, tokenizer, [Example("q", {"input": "the cat is on the mat"}, "mat", ("mat", "hat"))], config)
    (baseline,) = seen
    if ig_baseline == "zero":
        assert baseline is None
    else:  # the tiny tokenizer has no pad token: its end-of-sequence token
        torch.testing.assert_close(baseline, model.get_input_embeddings().weight[tokenizer.eos_token_id])


def test_extract_resumes_appending_only_new_ids(teacher_dir, tmp_path, capsys):
    data, out = write_jsonl(tmp_path / "data.jsonl", ROWS), tmp_path / "r.jsonl"
    assert extract(teacher_dir, data, out, "--limit", 2) == 0
    first = out.read_text()
    assert [r["id"] for r in lines(out)] == ["q1", "train-1"]
    assert extract(teacher_dir, data, out, "--limit", 4) == 0
    assert out.read_text().startswith(first)
    assert [r["id"] for r in lines(out)] == ["q1", "train-1", "q3", "q4"]
    # a write cut short leaves a partial line: it is dropped and its example done again
    whole = out.read_text()
    out.write_text(whole + '{"id": "q5", "answ')
    assert extract(teacher_dir, data, out) == 0
    assert out.read_text().startswith(whole) and [r["id"] for r in lines(out)][-1] == "q5"
    assert len(lines(out)) == 5
    capsys.readouterr()
    assert extract(teacher_dir, data, out) == 0
    assert "0 new rationales; 5 in" in capsys.readouterr().out
    # a fresh run gives the same records: resumption changes nothing
    fresh = tmp_path / "fresh.jsonl"
    assert extract(teacher_dir, data, fresh) == 0
    for a, b in zip(lines(fresh), lines(out), strict=True):
        assert (a["id"], a["answer"], a["rationale"]) == (b["id"], b["answer"], b["rationale"])
        assert [s for _, s in a["words"]] == pytest.approx([s for _, s in b["words"]], rel=1e-5)


def test_extract_on_generated_gsm_symbolic(teacher_dir, tmp_path):
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "gsm.jsonl"
    args = ["rationales", "extract", "--teacher", teacher_dir, "--task", "gsm-symbolic", "--size", "6", "--limit", "3",
            "--max-new-tokens", "2", "--out", out, "--progress", "false"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    examples = load_task("gsm-symbolic", "train", size=6, limit=3)
    records = lines(out)
    assert [r["id"] for r in records] == ["train-0", "train-1", "train-2"]
    for record, example in zip(records, examples):
        assert record["label"] == example.label and len(record["words"]) == 5
        assert all(word in example.inputs["input"] for word in record["rationale"].split())


def cli_error(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("lmdistill rationales extract: error: "), err
    return last


def test_extract_errors_are_one_line(teacher_dir, tmp_path, capsys):
    data, out = write_jsonl(tmp_path / "data.jsonl", ROWS), tmp_path / "r.jsonl"
    assert extract(teacher_dir, data, out, "--limit", 1) == 0
    capsys.readouterr()
    command = ["rationales", "extract", "--teacher", teacher_dir, "--task", "jsonl", "--data", data]
    assert "--method 'saliency' (now 'input-x-gradient')" in cli_error(
        capsys, *command, "--out", out, "--method", "input-x-gradient"
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], '{"input": "a"}'])
    assert "bad.jsonl line 2: missing field 'label'" in cli_error(capsys, *command[:-1], bad, "--out", tmp_path / "b")
    assert "--task jsonl reads the file given by --data" in cli_error(
        capsys, "rationales", "extract", "--task", "jsonl", "--out", out
    )
    assert "--out is required" in cli_error(capsys, *command)
    assert "--k must be at least 1" in cli_error(capsys, *command, "--out", out, "--k", 0)
    assert "{question} is not one of task jsonl's" in cli_error(
        capsys, *command, "--out", out, "--template", "{question}"
    )
    assert "teacher path" in cli_error(capsys, *command[:3], tmp_path / "none", *command[4:], "--out", tmp_path / "c")
    (tmp_path / "r.jsonl.config.yaml").unlink()
    assert "its settings" in cli_error(capsys, *command, "--out", out)
    assert main(["rationales"]) == 2
    assert "lmdistill rationales: a command is needed" in capsys.readouterr().err


def test_integrated_gradients_settings_matter_on_resume_only_for_integrated_gradients(teacher_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)

    def written_before_ig_baseline(out) -> None:  # as rationale files from before --ig-baseline (from zero) are
        path = out.with_name(out.name + ".config.yaml")
        settings = yaml.safe_load(path.read_text())
        del settings["ig_baseline"]
        path.write_text(yaml.safe_dump(settings))

    saliency = tmp_path / "saliency.jsonl"
    assert extract(teacher_dir, data, saliency, "--limit", 1) == 0
    written_before_ig_baseline(saliency)
    assert extract(teacher_dir, data, saliency, "--limit", 2, "--ig-steps", 5) == 0  # IG settings do not matter
    assert len(lines(saliency)) == 2
    ig = tmp_path / "ig.jsonl"
    method = ("--method", "integrated-gradients")
    assert extract(teacher_dir, data, ig, "--limit", 1, *method, "--ig-baseline", "zero") == 0
    written_before_ig_baseline(ig)
    capsys.readouterr()
    assert extract(teacher_dir, data, ig, "--limit", 2, *method) == 2
    assert "--ig-baseline 'zero' (now 'token')" in capsys.readouterr().err
    assert extract(teacher_dir, data, ig, "--limit", 2, *method, "--ig-baseline", "zero") == 0
    assert len(lines(ig)) == 2


def test_duplicate_ids_name_the_file_and_both_lines(tmp_path):
    rows = [{"id": "x", "input": "a", "label": "b"}, "", {"id": "y", "input": "a", "label": "b"}]
    path = write_jsonl(tmp_path / "dup.jsonl", [*rows, {"id": "x", "input": "c", "label": "d"}])
    message = loader_error("jsonl", "train", data=path)
    assert f"{path} lines 1 and 4: the id 'x' occurs twice" in message
    # a default id ({split}-{index}) colliding with a given one
    path = write_jsonl(
        tmp_path / "default.jsonl", [{"id": "train-1", "input": "a", "label": "b"}, {"input": "c", "label": "d"}]
    )
    assert "lines 1 and 2: the id 'train-1' occurs twice" in loader_error("jsonl", "train", data=path)


def test_extract_refuses_an_out_that_cannot_be_the_rationale_file(teacher_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    command = ["rationales", "extract", "--teacher", teacher_dir, "--task", "jsonl", "--data", data, "--out"]
    folder = tmp_path / "folder"
    folder.mkdir()
    assert f"--out {folder} is a directory" in cli_error(capsys, *command, folder)
    (tmp_path / "file").write_text("x")
    for below in (tmp_path / "file" / "r.jsonl", tmp_path / "file" / "deeper" / "r.jsonl"):
        assert f"{tmp_path / 'file'} is a file, not a directory" in cli_error(capsys, *command, below)
    (tmp_path / "r.jsonl.config.yaml").mkdir()
    message = cli_error(capsys, *command, tmp_path / "r.jsonl")
    assert f"{tmp_path / 'r.jsonl.config.yaml'}, where the settings of --out" in message and "is a directory" in message
    assert not (tmp_path / "r.jsonl").exists()


def test_a_broken_rationales_file_for_train_names_the_flag_file_and_line(teacher_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    command = ["rationales", "train", "--student", teacher_dir, "--task", "jsonl", "--data", data, "--out",
               tmp_path / "run", "--no-progress", "--rationales"]  # fmt: skip
    good = {"id": "q1", "label": "mat", "rationale": "cat mat"}
    cases = {
        "bad-json": ([good, "{oops"], "line 2 is not a rationale record: invalid JSON"),
        "no-rationale": (
            [{"id": "q1", "label": "mat"}],
            "line 1 is not a rationale record: no string field 'rationale'",
        ),
        "no-id": ([good, "", {"rationale": "x"}], "line 3 is not a rationale record: no string field 'id'"),
        "array": (["[1, 2]"], "line 1 is not a rationale record: a JSON list, not an object"),
    }
    for name, (rows, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        assert main([str(a) for a in command + [path]]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("lmdistill rationales train: error: "), err
        assert f"--rationales {path} {expected}" in err and err.endswith("give another --rationales"), err
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "q1", "rationale": "caf\xe9"}\n')
    assert main([str(a) for a in command + [tmp_path / "latin1.jsonl"]]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_reads_a_rationales_file_without_a_final_newline_whole_and_leaves_it_alone(tmp_path):
    from lmdistill.config import RationaleTrainConfig
    from lmdistill.train.rationale_data import rationale_targets

    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    path = tmp_path / "hand-written.jsonl"
    path.write_text('{"id": "q1", "rationale": "cat mat"}\n{"id": "q3", "rationale": "test words"}')  # no final \n
    before = path.read_bytes()
    config = RationaleTrainConfig(student="s", out="o", task="jsonl", data=data, rationales=str(path))
    assert rationale_targets(load_task("jsonl", "train", data=data), config) == {"q1": "cat mat", "q3": "test words"}
    assert path.read_bytes() == before


def test_extract_runs_the_teacher_in_its_dtype_records_it_and_resumes_only_in_it(
    teacher_dir, tmp_path, capsys, monkeypatch
):
    from lmdistill import precision

    monkeypatch.setattr(precision, "fast_bf16", lambda device, cpuinfo=None: False)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    fp32, bf16 = tmp_path / "fp32.jsonl", tmp_path / "bf16.jsonl"
    assert extract(teacher_dir, data, fp32, "--limit", 3) == 0
    assert "teacher in fp32 (auto: CPU without AVX512-BF16/AMX" in capsys.readouterr().out
    assert extract(teacher_dir, data, bf16, "--limit", 3, "--teacher-dtype", "bf16") == 0
    assert "teacher in bf16 (set to bf16)" in capsys.readouterr().out
    settings = {p: yaml.safe_load(p.with_name(p.name + ".config.yaml").read_text()) for p in (fp32, bf16)}
    assert settings[fp32]["teacher_dtype"] == "fp32" and settings[bf16]["teacher_dtype"] == "bf16"  # as resolved
    for a, b in zip(lines(fp32), lines(bf16), strict=True):  # bf16 changes the scores a little
        assert [s for _, s in a["words"]] != [s for _, s in b["words"]]
        assert [s for _, s in a["words"]][0] == pytest.approx([s for _, s in b["words"]][0], rel=0.1)
    command = ["rationales", "extract", "--teacher", teacher_dir, "--task", "jsonl", "--data", data, "--out", bf16]
    assert "--teacher-dtype 'bf16' (now 'fp32')" in cli_error(capsys, *command, "--teacher-dtype", "fp32")
    assert "gradient attribution needs gradients through the teacher" in cli_error(
        capsys, *command, "--teacher-dtype", "int8"
    )
    # a file written before --teacher-dtype had an fp32 teacher: it resumes with the fp32 one
    path = fp32.with_name(fp32.name + ".config.yaml")
    path.write_text(yaml.safe_dump({k: v for k, v in settings[fp32].items() if k != "teacher_dtype"}))
    assert extract(teacher_dir, data, fp32, "--limit", 4, "--teacher-dtype", "fp32") == 0
    assert len(lines(fp32)) == 4
