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
    tasks/<task>/runs/<arm>/seed-<S>/eval.json   its accuracy on the evaluation split; a run is finished when it
                                                 exists
    results.json, report.md, accuracy_vs_k.png

Every stage is kept on disk, so `--resume` skips what is done: the teacher's evaluation, the extraction (itself
resumable), finished runs; an interrupted run continues from its latest checkpoint. Tasks, arms, k values and seeds
may be added on resume; settings that shape results may not change.

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

from tqdm.auto import tqdm

from lmdistill.commands.rationales_eval import run_rationale_eval
from lmdistill.commands.rationales_extract import IG_SETTINGS, run_extract
from lmdistill.commands.rationales_report import write_plot, write_report
from lmdistill.commands.rationales_train import run_rationale_train
from lmdistill.commands.study import check_resumable
from lmdistill.config import RationaleStudyConfig, to_yaml
from lmdistill.errors import LmdistillError
from lmdistill.provenance import environment, recorded_precision
from lmdistill.rationales.records import random_records, read_records, write_first_words, write_records
from lmdistill.rationales.tasks import Example, load_task, task_spec
from lmdistill.stats import spread
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


def _teacher_accuracy(config: RationaleStudyConfig, out: Path, task: str) -> None:
    path = task_dir(out, task) / "teacher_eval.json"
    if path.is_file():
        return
    teacher = config.teacher_of(task)
    log.info("task %s: evaluating the teacher %s on the %s split", task, teacher, config.eval_split)
    results = _evaluate(config, task, teacher, path)
    log.info("task %s: teacher accuracy %.1f%%", task, 100 * results["accuracy"])


def _saliency_rationales(config: RationaleStudyConfig, out: Path, task: str) -> None:
    """Extract the task's rationales at the largest k (resumable), then write each smaller k as their prefixes."""
    if not any(config.saliency_k(arm) for arm in config.arm_names(task)):
        return
    ks = sorted(config.saliency_ks)
    source = rationale_file(out, task, ks[-1])
    source.parent.mkdir(parents=True, exist_ok=True)
    summary = run_extract(config.extract_config(task, out=str(source)))
    log.info("task %s: %d saliency rationales at k = %d in %s", task, summary["total"], ks[-1], source)
    for k in ks[:-1]:
        target = rationale_file(out, task, k)
        if not target.is_file() or len(read_records(target)) != summary["total"]:
            write_first_words(source, target, k)


def _random_rationales(config: RationaleStudyConfig, out: Path, task: str) -> None:
    """Write the task's random-k rationale files that are missing (each k drawn directly: the draws are cheap)."""
    ks = [config.arm_k(arm) for arm in config.arm_names(task) if config.arm_kind(arm) == "random"]
    missing = [k for k in ks if k is not None and not random_file(out, task, k).is_file()]
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
    _evaluate(config, task, str(run / "final"), run / "eval.json")
    if not config.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)


def run_rationale_study(config: RationaleStudyConfig) -> dict[str, Any]:
    """Run (or continue) a rationale study and write results.json, report.md and accuracy_vs_k.png.

    Args:
        config: the resolved `RationaleStudyConfig`.

    Returns:
        The results (as in `results.json`), plus ``written_to``: the study directory.
    """
    out = Path(config.out)
    if config.report_only:
        return write_results(config, out, partial=True)
    check_study_resumable(config, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.yaml").write_text(to_yaml(config))
    (out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")

    for task in config.tasks:
        _teacher_accuracy(config, out, task)
        _saliency_rationales(config, out, task)
        _random_rationales(config, out, task)

    runs = config.runs()
    done = [(run_dir(out, *run) / "eval.json").is_file() for run in runs]
    overall = tqdm(total=len(runs), initial=sum(done), unit="run", desc="rationales study", disable=not config.progress)
    for (task, arm, seed), finished in zip(runs, done):
        if finished:
            continue
        overall.set_description(f"task {task} arm {arm} seed {seed}")
        _finish_run(config, out, task, arm, seed)
        overall.update(1)
    overall.close()
    return write_results(config, out)


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


def _task_results(config: RationaleStudyConfig, out: Path, task: str, partial: bool) -> dict[str, Any]:
    teacher = _read(task_dir(out, task) / "teacher_eval.json")
    result: dict[str, Any] = {
        "teacher_accuracy": teacher["accuracy"] if teacher else None,
        "teacher": {k: teacher[k] for k in ("model", "model_name", "correct", "total")} if teacher else None,
        "rationale_word_share": {},
        "rationale_word_share_any_choice": {},
        "arms": {},
    }
    files = {k: rationale_file(out, task, k) for k in sorted(config.saliency_ks)}
    if any(config.saliency_k(arm) for arm in config.arm_names(task)) and any(f.is_file() for f in files.values()):
        examples = {
            e.id: e for e in load_task(task, "train", size=config.size, seed=config.data_seed, limit=config.train_limit)
        }
        for k, path in files.items():
            records = read_records(path)
            if records:
                result["rationale_word_share"][str(k)] = rationale_word_share(records)
                result["rationale_word_share_any_choice"][str(k)] = rationale_word_share_any_choice(records, examples)
                result.setdefault("rationale_records", len(records))
                result["train_teacher_accuracy"] = sum(bool(r.get("correct")) for r in records) / len(records)
    for arm in config.arm_names(task):
        per_seed = []
        for seed in config.seeds:
            run = run_dir(out, task, arm, seed)
            evaluation = _read(run / "eval.json")
            if evaluation is None:
                if partial:
                    continue
                raise LmdistillError(f"run {run} has not finished")
            summary = _read(run / "summary.json") or {}
            per_seed.append(
                {
                    "seed": seed,
                    "accuracy": evaluation["accuracy"],
                    "correct": evaluation["correct"],
                    "total": evaluation["total"],
                    "val_loss": summary.get("val_loss"),
                    "seconds": summary.get("seconds"),
                }
            )
        if per_seed:
            accuracies = [r["accuracy"] for r in per_seed]
            result["arms"][arm] = {
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": spread(accuracies),
                "k": config.arm_k(arm),
                "rationale_source": config.rationale_source(arm),
                "seeds": [r["seed"] for r in per_seed],
                "per_seed": per_seed,
            }
    return result


def collect_results(config: RationaleStudyConfig, out: Path, *, partial: bool = False) -> dict[str, Any]:
    """Gather the finished runs: per task the teacher's accuracy, the rationale words' share in the gold answer (and
    in the answer or a choice), and per arm the accuracy per seed, its mean and sample standard deviation (None for
    one seed).

    Args:
        config: the study's config.
        out: the study directory.
        partial: skip unfinished runs instead of refusing them.
    """
    tasks = {task: _task_results(config, out, task, partial) for task in config.tasks}
    finished = sum(len(arm["per_seed"]) for t in tasks.values() for arm in t["arms"].values())
    if not finished:
        raise LmdistillError(f"no run of the rationale study in {out} has finished yet")
    return {
        "tasks": tasks,
        "runs_finished": finished,
        "runs_planned": len(config.runs()),
        "config": vars(config),
        "environment": environment(recorded_precision(run_dir(out, *run) for run in config.runs())),
    }


def write_results(config: RationaleStudyConfig, out: Path, *, partial: bool = False) -> dict[str, Any]:
    """Collect the results and write results.json, report.md and accuracy_vs_k.png; return the results."""
    results = collect_results(config, out, partial=partial)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out / "report.md")
    write_plot(results, out / "accuracy_vs_k.png")
    results["written_to"] = str(out)
    return results
