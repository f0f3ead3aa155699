"""A study's results, built from its records alone: per budget and arm, then means and spreads over seeds, the gap
closed on every held-out set, `random`'s token multiplier, and each extension against the arm it extends."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmdistill.config import STUDY_ARMS, StudyConfig, run_name
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import gap_closed, perplexity, token_multiplier
from lmdistill.provenance import combined_precision, environment
from lmdistill.stats import spread

HEADLINE = "mixture"  # the held-out set of the headline: text of the training mixture


def record_path(results: Path, budget: int, arm: str, seed: int) -> Path:
    """The record of one finished run."""
    return results / "records" / str(budget) / arm / f"seed-{seed}.json"


def teacher_record_path(results: Path) -> Path:
    """The record of the teacher's held-out scores."""
    return results / "records" / "teacher.json"


def _share(base: float, method: float, teacher: float) -> float | None:
    value = gap_closed(base, method, teacher)
    return None if value != value else value  # NaN: undefined


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if not values or None in values:
        return None, None
    return statistics.mean(values), spread(values)


def _per_seed(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("seed", "scores", "step0_val_loss", "explained_variance", "tokens", "seconds", "tokens_per_s", "curve")
    run = {key: record[key] for key in keys}
    run.update(val_loss=record["scores"][HEADLINE], val_ppl=perplexity(record["scores"][HEADLINE]))
    run["weights_sha256"] = record["weights_sha256"]
    return run


def _arm_summaries(per_arm: dict[str, list[dict[str, Any]]], teacher: dict[str, Any]) -> dict[str, Any]:
    """Per arm: each seed's gap closed on every set (paired with `random` of its seed, else with the mean of the
    `random` runs; None where that baseline is not worse than the teacher), then means and spreads."""
    base_runs = {r["seed"]: r for r in per_arm.get("random", [])}
    sets = list(teacher["scores"])
    mean_base = {s: statistics.mean(r["scores"][s] for r in base_runs.values()) for s in sets} if base_runs else None
    mean_base_ppl = statistics.mean(r["val_ppl"] for r in base_runs.values()) if base_runs else None
    arms: dict[str, Any] = {}
    for arm_name, runs in per_arm.items():
        for r in runs:
            base = base_runs[r["seed"]]["scores"] if r["seed"] in base_runs else mean_base
            r["gap_closed"] = {s: _share(base[s], r["scores"][s], teacher["scores"][s]) if base else None for s in sets}
            r["gap_closed_loss"] = r["gap_closed"][HEADLINE]
            base_ppl = base_runs[r["seed"]]["val_ppl"] if r["seed"] in base_runs else mean_base_ppl
            r["gap_closed_ppl"] = _share(base_ppl, r["val_ppl"], teacher["val_ppl"]) if base else None
        arm = STUDY_ARMS[arm_name]
        summary: dict[str, Any] = {"init": arm.init, "pca": arm.pca if arm.init.startswith("guide") else None}
        summary["loss"] = arm.loss
        for key in ("val_loss", "val_ppl", "gap_closed_loss", "gap_closed_ppl", "step0_val_loss", "seconds"):
            summary[key], summary[f"{key}_std"] = _mean_std([r[key] for r in runs])
        summary["scores"] = {}
        for s in sets:
            loss, loss_std = _mean_std([r["scores"][s] for r in runs])
            gap, gap_std = _mean_std([r["gap_closed"][s] for r in runs])
            summary["scores"][s] = {"loss": loss, "loss_std": loss_std, "gap_closed": gap, "gap_closed_std": gap_std}
        summary.update(seeds=[r["seed"] for r in runs], tokens=runs[0]["tokens"], per_seed=runs)
        arms[arm_name] = summary
    return arms


def _add_token_multipliers(budgets: dict[str, dict[str, Any]]) -> None:
    """Per arm and budget: how many times the budget `random` needs to reach the arm's headline loss, interpolated
    in log-tokens between `random`'s final losses at the budgets (its own seed's where it ran at every budget, else
    the mean over seeds)."""
    with_random = [int(b) for b, arms in budgets.items() if "random" in arms]
    for budget, arms in budgets.items():
        for arm in arms.values():
            per_seed = []
            for run in arm["per_seed"]:
                if len(with_random) < 2:
                    per_seed.append({"seed": run["seed"], "value": None, "range": "one budget of random"})
                    continue
                losses = []
                for b in with_random:
                    paired = [r for r in budgets[str(b)]["random"]["per_seed"] if r["seed"] == run["seed"]]
                    losses.append(paired[0]["val_loss"] if paired else budgets[str(b)]["random"]["val_loss"])
                value, where = token_multiplier(with_random, losses, run["val_loss"], int(budget))
                per_seed.append({"seed": run["seed"], "value": value, "range": where})
            within = [entry["value"] for entry in per_seed if entry["range"] == "within"]
            mean, std = _mean_std(within) if len(within) == len(per_seed) else (None, None)
            arm.update(token_multiplier=mean, token_multiplier_std=std, token_multiplier_per_seed=per_seed)


def _add_extension_comparisons(budgets: dict[str, dict[str, Any]]) -> None:
    """Per extension arm (`StudyArm.extends`) and budget: its gap closed against the extended arm's, paired by seed
    (differences in points of the share, mean and spread) and as the ratio of the mean shares, on every set."""
    for arms in budgets.values():
        for name, arm in arms.items():
            extended = STUDY_ARMS[name].extends
            if extended not in arms:
                continue
            other = {r["seed"]: r for r in arms[extended]["per_seed"]}
            paired = [(r, other[r["seed"]]) for r in arm["per_seed"] if r["seed"] in other]
            comparison: dict[str, Any] = {"arm": extended, "seeds": [r["seed"] for r, _ in paired], "sets": {}}
            for s in arm["scores"]:
                shares = [(r["gap_closed"][s], o["gap_closed"][s]) for r, o in paired]
                differences = [None if None in pair else pair[0] - pair[1] for pair in shares]
                mean, std = _mean_std(differences)
                ours, theirs = arm["scores"][s]["gap_closed"], arms[extended]["scores"][s]["gap_closed"]
                ratio = ours / theirs if ours is not None and theirs else None
                comparison["sets"][s] = {"difference": mean, "difference_std": std, "per_seed": differences}
                comparison["sets"][s]["ratio"] = ratio
            arm["vs_extended"] = comparison


def machines_of(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CPUs that the runs of ``records`` ran on, each once, in the records' order (records without one skipped)."""
    machines: list[dict[str, Any]] = []
    for record in records:
        if record.get("cpu") and record["cpu"] not in machines:
            machines.append(record["cpu"])
    return machines


def collect_results(config: StudyConfig, results: Path, *, partial: bool = False) -> dict[str, Any]:
    """Gather the records of the finished runs into the results (see the README's study section for the keys).

    Args:
        config: the study's config.
        results: the results directory (holding ``records/``).
        partial: skip runs without a record instead of refusing them.
    """
    teacher_file = teacher_record_path(results)
    if not teacher_file.is_file():
        raise LmdistillError(f"{results} holds no study results yet (no records/teacher.json)")
    teacher = json.loads(teacher_file.read_text())
    teacher.update(val_loss=teacher["scores"][HEADLINE], val_ppl=perplexity(teacher["scores"][HEADLINE]))
    records = {}
    for run in config.runs():
        path = record_path(results, *run)
        if path.is_file():
            records[run] = json.loads(path.read_text())
        elif not partial:
            raise LmdistillError(f"run {run_name(*run)} has not finished: {path} does not exist")
    if not records:
        raise LmdistillError(f"no run of the study in {results} has finished yet")
    budgets: dict[str, dict[str, Any]] = {}
    for budget in sorted(config.train_tokens):
        per_arm: dict[str, list[dict[str, Any]]] = {}
        for (b, arm, _), record in records.items():
            if b == budget:
                per_arm.setdefault(arm, []).append(_per_seed(record))
        if per_arm:
            budgets[str(budget)] = _arm_summaries(per_arm, teacher)
    _add_token_multipliers(budgets)
    _add_extension_comparisons(budgets)
    first = next(iter(records.values()))
    steps = {str(b): config.steps(b) for b in sorted(config.train_tokens)}
    largest = list(budgets)[-1]
    precision = combined_precision((r["precision"], r["precision_reason"]) for r in records.values())
    return {
        "teacher": teacher,
        "student": first["student"],
        "arms": budgets[largest],
        "budgets": budgets,
        "scoring": {key: first[key] for key in ("mixture_weights", "score_tokens")},
        "setup": {
            "budgets": {
                b: {"max_steps": n, "train_tokens_per_run": n * config.batch_size * config.seq_len}
                for b, n in steps.items()
            },
            "largest_reported": int(largest),
            "eval_tokens": config.eval_tokens // config.seq_len * config.seq_len,
        },
        "runs_finished": len(records),
        "runs_planned": len(config.runs()),
        "timing": {
            "run_seconds": sum(r["seconds"] for r in records.values()),
            "teacher_cache_seconds": {
                str(r["budget"]): r["teacher_cache_seconds"] for r in records.values() if r["teacher_cache_seconds"]
            },
            "teacher_scoring_seconds": teacher["seconds"],
        },
        "machines": machines_of(records.values()),
        "config": vars(config),
        "environment": environment(precision),
    }
