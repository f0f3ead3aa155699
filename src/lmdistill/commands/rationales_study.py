"""`lmdistill rationales study`: the rationale comparison of Ballout et al. (2024) against Distilling step-by-step.

On each task the same student is trained with the same loss, L_label + λ · L_rationale, on the same examples; only
the rationale targets differ between arms:

- ``finetune``: none (λ = 0): fine-tuning on labels;
- ``saliency-k<K>``: the teacher's top-K saliency words of its own answer (`lmdistill rationales extract`), for every
  K of ``saliency_ks``;
- ``random-k<K>``: the control, K of the same candidate words drawn at random per example (`random_records`), for
  every K of ``random_ks``;
- ``step-by-step``: the 540B model's chain-of-thought rationales of the shared data (SVAMP, CQA);
- ``gold``: the data's own rationales (CQA's and e-SNLI's explanations, gsm-symbolic's solution steps).

Every arm runs with every seed (the example order); every run and the teacher are evaluated on the task's test split
(``eval_split``: or e-SNLI's validation split, for choosing settings) from the ``predict:`` prompt alone.

Layout of a study directory:

    study_config.yaml, environment.json      the resolved config and the software that ran it
    tasks/<task>/teacher_eval.json           the teacher's accuracy on the evaluation split (`rationales eval`)
    tasks/<task>/rationales-k<K>.jsonl       saliency rationales of the training examples (+ .config.yaml): the
                                             largest K extracted once in score order, each smaller K its records'
                                             first K words (exactly what an extraction at K writes)
    tasks/<task>/random-k<K>.jsonl           the random-k rationales of the training examples (+ .config.yaml)
    tasks/<task>/runs/<arm>/seed-<S>/        one `rationales train` directory per arm and seed (student in final/;
                                             checkpoints removed once evaluated unless keep_checkpoints)
    tasks/<task>/runs/<arm>/seed-<S>/eval.json   its accuracy on the evaluation split

and of its results directory (`--results`, default `--out`), the part to keep (commit it):

    study_config.yaml                            the config the records were made with
    records/<task>/teacher_eval.json             the teacher's evaluation
    records/<task>/rationale_words.json          what the saliency rationales' words are (shares, count, accuracy)
    records/<task>/<arm>/seed-<S>.json           one record per finished run: its evaluation with every prediction,
                                                 its held-out label loss, time, precision and CPU
    extraction/<task>/rationales-k<K>.jsonl      a copy of the saliency extraction (+ .config.yaml), which --resume
                                                 continues instead of extracting again
    results.json, report.md, accuracy_vs_k.png   built from the records alone

A run with a record is finished, so `--resume` on any machine trains only the runs without one; the teacher's
evaluation is redone only when its record is missing, and the extraction continues from the results' copy; an
interrupted run continues from its latest checkpoint. Processes (or machines) with their own --out and the same
--results share the runs by --workers/--worker. Tasks, arms, k values and seeds may be added on resume; settings that
shape results may not change.

Launch: `lmdistill rationales study --config configs/rationales-svamp-cqa.yaml`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lmdistill.commands.rationales_eval import run_rationale_eval
from lmdistill.commands.rationales_extract import IG_SETTINGS, run_extract
from lmdistill.commands.rationales_report import write_plot, write_report
from lmdistill.commands.rationales_train import run_rationale_train
from lmdistill.commands.study import check_resumable, grown_study, keep_recorded_precision, results_dir, write_json
from lmdistill.commands.study_results import machines_of
from lmdistill.config import RationaleStudyConfig, to_yaml
from lmdistill.errors import LmdistillError
from lmdistill.provenance import combined_precision, environment
from lmdistill.rationales.records import random_records, read_records, write_first_words, write_records
from lmdistill.rationales.tasks import Example, load_task, task_spec
from lmdistill.stats import mcnemar, paired_bootstrap, spread
from lmdistill.train.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

# lists that may grow (or change) on --resume, and settings that do not shape results
GROWABLE = ("tasks", "arms", "saliency_ks", "random_ks", "seeds")
NOT_RESULTS = ("keep_checkpoints", "save_every", "log_every")


def check_study_resumable(config: RationaleStudyConfig, out: Path) -> None:
    """`check_resumable` for a rationale study: the integrated-gradients settings matter only with that method."""
    ignored = NOT_RESULTS + (IG_SETTINGS if config.method != "integrated-gradients" else ())
    check_resumable(config, out, growable=GROWABLE, ignored=ignored)


def task_dir(out: Path, task: str) -> Path:
    """Where a task's teacher evaluation, rationales and runs live."""
    return out / "tasks" / task


def rationale_file(out: Path, task: str, k: int) -> Path:
    """The saliency rationales of a task's training examples at k words."""
    return task_dir(out, task) / f"rationales-k{k}.jsonl"


def random_file(out: Path, task: str, k: int) -> Path:
    """The random-k rationales of a task's training examples."""
    return task_dir(out, task) / f"random-k{k}.jsonl"


def arm_rationales(config: RationaleStudyConfig, out: Path, task: str, arm: str) -> Path | None:
    """The rationale file a run of ``arm`` trains on: its saliency or random file; None for the other arms."""
    k, kind = config.arm_k(arm), config.arm_kind(arm)
    return None if k is None else (rationale_file if kind == "saliency" else random_file)(out, task, k)


def kept_extraction(results: Path, task: str, k: int) -> Path:
    """The copy of a task's saliency extraction in the results directory, from which --resume continues."""
    return results / "extraction" / task / f"rationales-k{k}.jsonl"


def _copy_records(source: Path, target: Path) -> None:
    """Copy a records file and the settings file beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".config.yaml"):
        shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")


def run_dir(out: Path, task: str, arm: str, seed: int) -> Path:
    """The `rationales train` directory of one run."""
    return task_dir(out, task) / "runs" / arm / f"seed-{seed}"


def _evaluate(config: RationaleStudyConfig, task: str, model: str, path: Path) -> dict[str, Any]:
    """`rationales eval` of a model on a task's evaluation split into ``path``, renamed into place only when whole (its
    existence marks the work done)."""
    partial = path.with_name(path.name + ".partial")
    results = run_rationale_eval(config.eval_config(task, model=model, out=str(partial)))
    partial.replace(path)
    return results


def record_path(results: Path, task: str, arm: str, seed: int) -> Path:
    """The record of one finished run."""
    return results / "records" / task / arm / f"seed-{seed}.json"


def teacher_record_path(results: Path, task: str) -> Path:
    """The record of the teacher's evaluation on a task."""
    return results / "records" / task / "teacher_eval.json"


def words_record_path(results: Path, task: str) -> Path:
    """The record of what a task's saliency rationale words are."""
    return results / "records" / task / "rationale_words.json"


def _teacher_accuracy(config: RationaleStudyConfig, out: Path, task: str) -> None:
    record = teacher_record_path(results_dir(config), task)
    if record.is_file():
        return
    path = task_dir(out, task) / "teacher_eval.json"
    if not path.is_file():
        teacher = config.teacher_of(task)
        log.info("task %s: evaluating the teacher %s on the %s split", task, teacher, config.eval_split)
        results = _evaluate(config, task, teacher, path)
        log.info("task %s: teacher accuracy %.1f%%", task, 100 * results["accuracy"])
    write_json(record, json.loads(path.read_text()))


def _words_record(config: RationaleStudyConfig, out: Path, task: str) -> dict[str, Any]:
    """The saliency rationales' words at every k: the paper's share (in the gold answer), the share in the answer or
    a choice, the number of records and the teacher's accuracy on the examples it explained."""
    examples = {
        e.id: e for e in load_task(task, "train", size=config.size, seed=config.data_seed, limit=config.train_limit)
    }
    record: dict[str, Any] = {"rationale_word_share": {}, "rationale_word_share_any_choice": {}}
    for k in sorted(config.saliency_ks):
        records = read_records(rationale_file(out, task, k))
        record["rationale_word_share"][str(k)] = rationale_word_share(records)
        record["rationale_word_share_any_choice"][str(k)] = rationale_word_share_any_choice(records, examples)
        record["rationale_records"] = len(records)
        record["train_teacher_accuracy"] = (
            sum(bool(r.get("correct")) for r in records) / len(records) if records else None
        )
    return record


def _saliency_rationales(
    config: RationaleStudyConfig, out: Path, task: str, pending: list[tuple[str, str, int]]
) -> None:
    """Extract the task's rationales at the largest k (resumable), then write each smaller k as their prefixes, when
    a pending run trains on them or their words are not recorded for every k."""
    if not any(config.saliency_k(arm) for arm in config.arm_names(task)):
        return
    ks = sorted(config.saliency_ks)
    words = words_record_path(results_dir(config), task)
    recorded = json.loads(words.read_text())["rationale_word_share"] if words.is_file() else {}
    needed = any(t == task and config.saliency_k(arm) for t, arm, _ in pending)
    if not needed and all(str(k) in recorded for k in ks):
        return
    source, kept = rationale_file(out, task, ks[-1]), kept_extraction(results_dir(config), task, ks[-1])
    source.parent.mkdir(parents=True, exist_ok=True)
    if len(read_records(kept)) > len(read_records(source)):
        _copy_records(kept, source)  # an extraction committed from another machine: resumed, not redone
    summary = run_extract(config.extract_config(task, out=str(source)))
    if summary["total"] > len(read_records(kept)):
        _copy_records(source, kept)
    log.info("task %s: %d saliency rationales at k = %d in %s", task, summary["total"], ks[-1], source)
    for k in ks[:-1]:
        target = rationale_file(out, task, k)
        if not target.is_file() or len(read_records(target)) != summary["total"]:
            write_first_words(source, target, k)
    write_json(words, _words_record(config, out, task))


def _random_rationales(config: RationaleStudyConfig, out: Path, task: str, pending: list[tuple[str, str, int]]) -> None:
    """Write the random-k rationale files that pending runs need (each k drawn directly: the draws are cheap)."""
    ks = {config.arm_k(arm) for t, arm, _ in pending if t == task and config.arm_kind(arm) == "random"}
    missing = sorted(k for k in ks if k is not None and not random_file(out, task, k).is_file())
    if not missing:
        return
    examples = load_task(task, "train", size=config.size, seed=config.data_seed, limit=config.train_limit)
    template = task_spec(task).template
    for k in missing:
        records = random_records(examples, template, k, seed=config.random_seed, drop_stop_words=config.stop_words)
        settings = {
            **{"kind": "random", "task": task, "split": "train", "template": template, "k": k},
            **{"seed": config.random_seed, "stop_words": config.stop_words, "limit": config.train_limit},
            **{"size": config.size, "data_seed": config.data_seed},
        }
        random_file(out, task, k).parent.mkdir(parents=True, exist_ok=True)
        write_records(random_file(out, task, k), records, settings)
        log.info("task %s: %d random-k%d rationales in %s", task, len(records), k, random_file(out, task, k))


def _finish_run(config: RationaleStudyConfig, out: Path, task: str, arm: str, seed: int) -> None:
    """Train (or continue) and evaluate one run, then write its record."""
    run = run_dir(out, task, arm, seed)
    if not (run / "summary.json").is_file():  # the summary is written after final/: the training is done
        rationales = arm_rationales(config, out, task, arm)
        train_config = config.train_config(
            task,
            arm,
            seed,
            out=str(run),
            rationales=str(rationales) if rationales else None,
            resume=latest_checkpoint(run / "checkpoints") is not None,
        )
        run_rationale_train(train_config)
    evaluation = _evaluate(config, task, str(run / "final"), run / "eval.json")
    if not config.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    summary = json.loads((run / "summary.json").read_text())
    env = json.loads((run / "environment.json").read_text())
    record = {key: evaluation[key] for key in ("accuracy", "correct", "total", "model_name", "predictions")}
    record.update(
        seed=seed,
        val_loss=summary.get("val_loss"),
        seconds=summary.get("seconds"),
        precision=env.get("precision"),
        precision_reason=env.get("precision_reason"),
        cpu=env.get("cpu"),
    )
    write_json(record_path(results_dir(config), task, arm, seed), record)


def run_rationale_study(config: RationaleStudyConfig) -> dict[str, Any]:
    """Run (or continue) a rationale study and write results.json, report.md and accuracy_vs_k.png.

    Args:
        config: the resolved `RationaleStudyConfig`.

    Returns:
        The results (as in `results.json`), plus ``written_to``: the study directory.
    """
    out, results = Path(config.out), results_dir(config)
    if config.report_only:
        return write_results(config, partial=True)
    check_study_resumable(config, out)
    if results != out:
        check_study_resumable(config, results)
    for directory in (out, results):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "study_config.yaml").write_text(to_yaml(grown_study(config, directory, growable=GROWABLE)))
    (out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")

    runs = config.assigned(config.runs())
    pending = [run for run in runs if not record_path(results, *run).is_file()]
    finished = [record for run in runs if (record := _read(record_path(results, *run)))]
    config = keep_recorded_precision(config, [record["precision"] for record in finished if record["precision"]])
    for task in config.tasks:
        _teacher_accuracy(config, out, task)
        _saliency_rationales(config, out, task, pending)
        _random_rationales(config, out, task, pending)

    overall = tqdm(
        total=len(runs),
        initial=len(runs) - len(pending),
        unit="run",
        desc="rationales study",
        disable=not config.progress,
    )
    for task, arm, seed in pending:
        overall.set_description(f"task {task} arm {arm} seed {seed}")
        _finish_run(config, out, task, arm, seed)
        write_results(config, partial=True)
        overall.update(1)
    overall.close()
    return write_results(config, partial=config.workers > 1)  # the other workers' runs may not have finished


# ---------------------------------------------------------------------------------------------------- results


def word_in(word: str, text: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole word, ignoring case (``84`` occurs in ``( 84.0 / 2.0 )``,
    ``fridge`` does not occur in ``fridges``)."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def _word_share(records: Iterable[dict[str, Any]], texts: Callable[[dict[str, Any]], list[str]]) -> float | None:
    """The share of the rationale words of ``records`` that occur (`word_in`) in one of ``texts(record)``."""
    inside = total = 0
    for record in records:
        found = texts(record)
        for word, _ in record["words"]:
            total += 1
            inside += any(word_in(word, text) for text in found)
    return inside / total if total else None


def rationale_word_share(records: Iterable[dict[str, Any]]) -> float | None:
    """The paper's measure: the share of the rationale words of ``records`` (``label``, ``words``) that occur
    (`word_in`) in their example's gold answer; None when there are no words."""
    return _word_share(records, lambda record: [record["label"]])


def rationale_word_share_any_choice(records: Iterable[dict[str, Any]], examples: dict[str, Example]) -> float | None:
    """The share of the rationale words of ``records`` that occur (`word_in`) in their example's gold answer or any
    of its choices; None when there are no words.

    Args:
        records: rationale records (``id``, ``label``, ``words``).
        examples: the task's examples by id (for the choices; a record of an unknown id counts its own label only).
    """

    def texts(record: dict[str, Any]) -> list[str]:
        example = examples.get(record["id"])
        return [record["label"], *(example.choices if example else ())]

    return _word_share(records, texts)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _correctness(records: list[dict[str, Any]], ids: list[str]) -> np.ndarray:
    """bool [seeds, n]: whether each run answered each example of ``ids`` correctly."""
    rows = []
    for record in records:
        correct = {p["id"]: bool(p["correct"]) for p in record["predictions"]}
        if set(correct) != set(ids):
            raise LmdistillError(
                f"the runs of seed {record['seed']} were evaluated on other examples than the runs compared"
            )
        rows.append([correct[i] for i in ids])
    return np.array(rows, dtype=bool)


def paired_comparison(baseline: list[dict[str, Any]], arm: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An arm against a baseline arm, paired by seed and test example: each seed's accuracy difference and McNemar's
    exact test, and the mean difference over the shared seeds with a 95 % paired-bootstrap interval over test
    examples (the same examples resampled for every seed). An effect only where the interval excludes 0.

    Args:
        baseline: the baseline runs' records (``seed``, ``accuracy``, ``predictions``).
        arm: the arm's records.

    Returns:
        ``seeds``, ``difference``, ``low``, ``high``, ``level``, ``effect`` and ``per_seed`` (``seed``,
        ``difference``, ``only_baseline``, ``only_arm``, ``mcnemar_p``); None without a shared seed.
    """
    base = {r["seed"]: r for r in baseline}
    pairs = [(base[r["seed"]], r) for r in arm if r["seed"] in base]
    if not pairs:
        return None
    ids = [p["id"] for p in pairs[0][0]["predictions"]]
    base_correct, arm_correct = _correctness([b for b, _ in pairs], ids), _correctness([a for _, a in pairs], ids)
    interval = paired_bootstrap(base_correct, arm_correct)
    per_seed = []
    for (b, a), base_row, arm_row in zip(pairs, base_correct, arm_correct, strict=True):
        test = mcnemar(base_row, arm_row)
        per_seed.append(
            {
                "seed": a["seed"],
                "difference": a["accuracy"] - b["accuracy"],
                "only_baseline": test.only_baseline,
                "only_arm": test.only_arm,
                "mcnemar_p": test.p_value,
            }  # fmt: skip
        )
    return {
        "seeds": [a["seed"] for _, a in pairs],
        "difference": interval.difference,
        "low": interval.low,
        "high": interval.high,
        "level": interval.level,
        "effect": interval.excludes_zero,
        "per_seed": per_seed,
    }


def _task_results(config: RationaleStudyConfig, results: Path, task: str, partial: bool) -> dict[str, Any]:
    teacher = _read(teacher_record_path(results, task))
    result: dict[str, Any] = {
        "teacher_accuracy": teacher["accuracy"] if teacher else None,
        "teacher": {k: teacher[k] for k in ("model", "model_name", "correct", "total")} if teacher else None,
        "rationale_word_share": {},
        "rationale_word_share_any_choice": {},
        "arms": {},
    }
    words = _read(words_record_path(results, task))
    if words and any(config.saliency_k(arm) for arm in config.arm_names(task)):
        for key in ("rationale_word_share", "rationale_word_share_any_choice"):
            result[key] = {str(k): words[key][str(k)] for k in sorted(config.saliency_ks) if str(k) in words[key]}
        result.update(
            rationale_records=words["rationale_records"], train_teacher_accuracy=words["train_teacher_accuracy"]
        )
    records: dict[str, list[dict[str, Any]]] = {}
    for arm in config.arm_names(task):
        for seed in config.seeds:
            record = _read(record_path(results, task, arm, seed))
            if record is None and not partial:
                raise LmdistillError(f"run {task}/{arm}/seed-{seed} has not finished (no record in {results})")
            if record is not None:
                records.setdefault(arm, []).append(record)
    for arm, runs in records.items():
        accuracies = [r["accuracy"] for r in runs]
        result["arms"][arm] = {
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": spread(accuracies),
            "k": config.arm_k(arm),
            "rationale_source": config.rationale_source(arm),
            "seeds": [r["seed"] for r in runs],
            "per_seed": [
                {k: r[k] for k in ("seed", "accuracy", "correct", "total", "val_loss", "seconds")} for r in runs
            ],
        }
        if arm != "finetune" and "finetune" in records:
            result["arms"][arm]["vs_finetune"] = paired_comparison(records["finetune"], runs)
        control = f"random-k{config.arm_k(arm)}"
        if config.arm_kind(arm) == "saliency" and control in records:
            result["arms"][arm]["vs_random"] = paired_comparison(records[control], runs)
    return result


def collect_results(config: RationaleStudyConfig, results: Path, *, partial: bool = False) -> dict[str, Any]:
    """Gather the records of the finished runs: per task the teacher's accuracy, the rationale words' share in the
    gold answer (and in the answer or a choice), and per arm the accuracy per seed, its mean and sample standard
    deviation (None for one seed), its paired comparison with `finetune` (`vs_finetune`) and, for saliency-k<K> with
    a random-k<K> arm, with that control (`vs_random`; both `paired_comparison`).

    Args:
        config: the study's config.
        results: the results directory (holding ``records/``).
        partial: skip unfinished runs instead of refusing them.
    """
    tasks = {task: _task_results(config, results, task, partial) for task in config.tasks}
    finished = sum(len(arm["per_seed"]) for t in tasks.values() for arm in t["arms"].values())
    if not finished:
        raise LmdistillError(f"no run of the rationale study in {results} has finished yet")
    recorded = [_read(record_path(results, *run)) for run in config.runs()]
    precision = combined_precision((r["precision"], r["precision_reason"]) for r in recorded if r and r["precision"])
    return {
        "tasks": tasks,
        "runs_finished": finished,
        "runs_planned": len(config.runs()),
        "machines": machines_of(r for r in recorded if r),
        "config": vars(config),
        "environment": environment(precision),
    }


def write_results(config: RationaleStudyConfig, *, partial: bool = False) -> dict[str, Any]:
    """Collect the records of the whole study (`grown_study`) into results.json, report.md and accuracy_vs_k.png in
    the results directory."""
    out = results_dir(config)
    study = grown_study(config, out, growable=GROWABLE)
    results = collect_results(study, out, partial=partial or study.runs() != config.runs())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out / "report.md")
    write_plot(results, out / "accuracy_vs_k.png")
    results["written_to"] = str(out)
    return results
