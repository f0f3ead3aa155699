"""`lmdistill study` and `lmdistill demo`: one student shape, several initializations and losses, one report.

Layout of a study directory:

    study_config.yaml, environment.json    the resolved config and the software that ran it
    teacher.json                           the teacher's held-out loss on the evaluation blocks
    teacher-cache/                         top-k teacher distributions of the blocks the runs read (kd arms only)
    students/<init>-<pca>-seed<S>/         initialized students, shared by arms that start alike
    runs/<arm>/seed-<S>/                   one `lmdistill train` run directory per arm and seed
    results.json, report.md, curves.png, gap.png

Every stage is kept on disk, so `--resume` reuses finished students and runs and continues an interrupted run from
its latest checkpoint.

Launch: `lmdistill study --config configs/study-smollm2.yaml` or `lmdistill demo`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmdistill.commands.init import run_init
from lmdistill.commands.study_report import undefined_gap_seeds, write_plots, write_report
from lmdistill.config import STUDY_ARMS, StudyArm, StudyConfig, load_yaml, to_yaml
from lmdistill.data.order import DataOrder
from lmdistill.data.packed import prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import gap_closed_forms, heldout_loss, perplexity
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.precision import resolve_precision
from lmdistill.provenance import environment, recorded_precision
from lmdistill.stats import spread
from lmdistill.teacher_cache import write_cache
from lmdistill.train.checkpoint import latest_checkpoint
from lmdistill.train.loop import run_train

log = logging.getLogger(__name__)


def student_dir(out: Path, arm: StudyArm, seed: int) -> Path:
    """Where the initialized student of an arm and seed lives; arms that start alike share it."""
    pca = f"-{arm.pca}" if arm.init.startswith("guide") else ""
    return out / "students" / f"{arm.init}{pca}-seed{seed}"


def run_dir(out: Path, arm: str, seed: int) -> Path:
    """The `lmdistill train` directory of one run."""
    return out / "runs" / arm / f"seed-{seed}"


def _finished(run: Path) -> dict[str, Any] | None:
    summary = run / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


# Settings that never change a study's results: how it is launched, where it is written.
LAUNCH_SETTINGS = ("resume", "report_only", "progress", "out", "dry_run")


def check_resumable(config: Any, out: Path, *, growable: tuple[str, ...], ignored: tuple[str, ...] = ()) -> None:
    """Refuse to write a study into a directory that holds one, unless ``config.resume``; with it, refuse settings
    that differ from the saved ``study_config.yaml``, except the lists in ``growable`` (arms, seeds, ... that may be
    added) and `LAUNCH_SETTINGS` and ``ignored`` (settings that do not shape results).

    Args:
        config: a study config dataclass with ``resume`` and the `LAUNCH_SETTINGS` fields.
        out: the study directory.
        growable: fields whose values may change between runs of the study.
        ignored: further fields that do not shape results.
    """
    saved = out / "study_config.yaml"
    if not saved.exists():
        return
    if not config.resume:
        raise LmdistillError(f"{out} already holds a study; pass --resume to continue it, or choose another --out")
    previous = load_yaml(saved, type(config))
    skip = set(LAUNCH_SETTINGS) | set(growable) | set(ignored)
    changed = sorted(k for k, v in vars(config).items() if k not in skip and previous.get(k) != v)
    if changed:
        raise LmdistillError(
            f"--resume: the study in {out} was run with different {', '.join(changed)}; its runs would not be "
            "comparable. Choose another --out, or restore those settings"
        )


def _measure_teacher(config: StudyConfig, out: Path, teacher: Any, val_blocks: np.ndarray) -> dict[str, Any]:
    path = out / "teacher.json"
    if path.is_file():
        return json.loads(path.read_text())
    log.info("evaluating the teacher on %d held-out tokens", val_blocks.size)
    loss = heldout_loss(teacher.model, val_blocks, batch_size=config.batch_size, precision=config.precision)
    result = {"name": teacher.name, "parameters": teacher.model.num_parameters(), "val_loss": loss}
    result["val_ppl"] = perplexity(loss)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _prepare_students(config: StudyConfig, out: Path, val_blocks: np.ndarray) -> None:
    """Initialize every distinct student once and add its step-0 loss on the study's held-out blocks to its report."""
    for path, (arm_name, seed) in {student_dir(out, STUDY_ARMS[a], s): (a, s) for a, s in config.runs()}.items():
        if not (path / "init_report.json").is_file():
            run_init(config.init_config(STUDY_ARMS[arm_name], seed, str(path)))
        report = json.loads((path / "init_report.json").read_text())
        if "step0_val_loss" not in report:
            student, _, _ = load_hf_directory(path, torch.float32)
            report["step0_val_loss"] = heldout_loss(
                student, val_blocks, batch_size=config.batch_size, precision=config.precision
            )
            (path / "init_report.json").write_text(json.dumps(report, indent=2) + "\n")


def _build_teacher_cache(config: StudyConfig, out: Path, teacher: Any, data: Any) -> Path | None:
    if not any(STUDY_ARMS[arm].loss != "ce" for arm, _ in config.runs()):
        return None
    path = out / "teacher-cache"
    if not (path / "manifest.json").is_file():
        samples = config.max_steps * config.batch_size
        blocks = np.unique(DataOrder(len(data.train), config.data_seed).blocks(0, samples))
        log.info("caching the teacher's top-%d distributions on the %d blocks the runs read", config.top_k, len(blocks))
        started = time.perf_counter()
        write_cache(
            teacher.model,
            teacher.name,
            teacher.tokenizer,
            data,
            path,
            top_k=config.top_k,
            blocks=blocks,
            batch_size=config.batch_size,
            precision=config.precision,
            progress=config.progress,
            resume=True,  # an interrupted build continues
        )
        (path / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
    return path


def _curve(run: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {"tokens": r["tokens"], "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]} for r in records if "val_loss" in r
    ]


def collect_results(config: StudyConfig, out: Path, *, partial: bool = False) -> dict[str, Any]:
    """Gather the finished runs into the results: per arm and seed, then means and spreads over seeds.

    The gap closed of a run is measured against the `random` run of the same seed when there is one (the pairing
    removes the data-independent part of the seed-to-seed noise), else against the mean of the `random` runs; it is
    None (null) where that baseline is not worse than the teacher. The environment holds the precision the runs
    recorded.

    Args:
        config: the study's config.
        out: the study directory.
        partial: skip unfinished runs instead of refusing them.
    """
    teacher_file = out / "teacher.json"
    if not teacher_file.is_file():
        raise LmdistillError(f"{out} holds no study results yet (no teacher.json)")
    teacher = json.loads(teacher_file.read_text())
    per_run: dict[str, list[dict[str, Any]]] = {}
    for arm_name, seed in config.runs():
        run = run_dir(out, arm_name, seed)
        summary = _finished(run)
        if summary is None:
            if partial:
                continue
            raise LmdistillError(f"run {run} has not finished")
        student = json.loads((student_dir(out, STUDY_ARMS[arm_name], seed) / "init_report.json").read_text())
        per_run.setdefault(arm_name, []).append(
            {
                "seed": seed,
                "val_loss": summary["val_loss"],
                "val_ppl": summary["val_ppl"],
                "step0_val_loss": student["step0_val_loss"],
                "explained_variance": student["explained_variance"],
                "tokens": summary["tokens"],
                "seconds": summary["seconds"],
                "tokens_per_s": summary["tokens_per_s"],
                "curve": _curve(run),
            }
        )
    if not per_run:
        raise LmdistillError(f"no run of the study in {out} has finished yet")
    base = {r["seed"]: r for r in per_run.get("random", [])}
    arms: dict[str, Any] = {}
    for arm_name, runs in per_run.items():
        arm = STUDY_ARMS[arm_name]
        for r in runs:
            if not base:  # no `random` arm, no baseline
                r.update(gap_closed_loss=None, gap_closed_ppl=None)
                continue
            mean_base = {k: statistics.mean(b[k] for b in base.values()) for k in ("val_loss", "val_ppl")}
            r.update(gap_closed_forms(base.get(r["seed"], mean_base), r, teacher))
        summary = {"init": arm.init, "pca": arm.pca if arm.init.startswith("guide") else None, "loss": arm.loss}
        for key in ("val_loss", "val_ppl", "gap_closed_loss", "gap_closed_ppl", "step0_val_loss", "seconds"):
            values = [r[key] for r in runs]
            summary[key] = None if None in values else statistics.mean(values)
            summary[f"{key}_std"] = None if None in values else spread(values)
        summary.update(seeds=[r["seed"] for r in runs], tokens=runs[0]["tokens"], per_seed=runs)
        arms[arm_name] = summary
    first_student = student_dir(out, STUDY_ARMS[next(iter(per_run))], per_run[next(iter(per_run))][0]["seed"])
    results = {
        "teacher": teacher,
        "student": json.loads((first_student / "init_report.json").read_text())["student"],
        "arms": arms,
        "setup": {
            "train_tokens_per_run": config.max_steps * config.batch_size * config.seq_len,
            "max_steps": config.max_steps,
            "eval_tokens": config.eval_tokens // config.seq_len * config.seq_len,
        },
        "runs_finished": sum(len(runs) for runs in per_run.values()),
        "runs_planned": len(config.runs()),
        "config": vars(config),
        "environment": environment(recorded_precision(run_dir(out, a, r["seed"]) for a in per_run for r in per_run[a])),
    }
    cache = out / "teacher-cache"
    if (cache / "build.json").is_file():
        results["teacher_cache"] = {
            "blocks": json.loads((cache / "manifest.json").read_text())["num_blocks"],
            "seconds": json.loads((cache / "build.json").read_text())["seconds"],
        }
    return results


def write_results(config: StudyConfig, out: Path, *, partial: bool = False) -> dict[str, Any]:
    """Collect the results and write results.json, report.md, curves.png and gap.png; return the results."""
    results = collect_results(config, out, partial=partial)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if undefined_gap_seeds(results):
        log.warning("the gap closed is undefined for some seeds (null): the teacher is not better than `random`")
    write_report(results, out / "report.md")
    write_plots(results, out)
    results["written_to"] = str(out)
    return results


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run (or continue) a study and write results.json, report.md, curves.png and gap.png.

    Args:
        config: the resolved `StudyConfig`.

    Returns:
        The results (as in `results.json`), plus `written_to`: the study directory.
    """
    out = Path(config.out)
    if config.report_only:
        return write_results(config, out, partial=True)
    check_resumable(config, out, growable=("arms", "ablations", "seeds", "ablation_seeds"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.yaml").write_text(to_yaml(config))
    teacher = load_teacher(config.teacher)
    # the precision of the study's own forward passes (teacher, step-0 losses, teacher cache); runs record theirs
    precision = resolve_precision(next(teacher.model.parameters()).device, config.precision)
    (out / "environment.json").write_text(json.dumps(environment(precision), indent=2) + "\n")

    data = prepare_data(config.data, teacher.tokenizer, config.seq_len, val_fraction=config.val_fraction)
    val_blocks = data.val[: max(1, config.eval_tokens // config.seq_len)]  # the blocks `lmdistill train` evaluates on
    _measure_teacher(config, out, teacher, val_blocks)
    cache = _build_teacher_cache(config, out, teacher, data)
    del teacher
    _prepare_students(config, out, val_blocks)

    runs = config.runs()
    step_tokens = config.batch_size * config.seq_len
    overall = tqdm(
        total=len(runs) * config.max_steps * step_tokens,
        initial=sum(_steps_done(run_dir(out, arm, seed), config.max_steps) for arm, seed in runs) * step_tokens,
        unit="tok",
        unit_scale=True,
        desc="study",
        dynamic_ncols=True,
        disable=not config.progress,
    )
    for i, (arm_name, seed) in enumerate(runs, start=1):
        run = run_dir(out, arm_name, seed)
        if _finished(run):
            continue
        overall.set_description(f"study: run {i}/{len(runs)} {arm_name} seed {seed}")
        arm = STUDY_ARMS[arm_name]
        train_config = config.train_config(
            arm,
            student=str(student_dir(out, arm, seed)),
            out=str(run),
            teacher_cache=str(cache) if cache else None,
            resume=latest_checkpoint(run / "checkpoints") is not None,
        )
        run_train(train_config, on_step=lambda record: overall.update(step_tokens))
    overall.close()
    return write_results(config, out)


def _steps_done(run: Path, max_steps: int) -> int:
    if _finished(run):
        return max_steps
    checkpoint = latest_checkpoint(run / "checkpoints")
    return json.loads((checkpoint / "meta.json").read_text())["step"] if checkpoint else 0
