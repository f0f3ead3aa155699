"""`lmdistill study` and `lmdistill demo`: one student shape, several initializations and losses, several token
budgets, one report.

Layout of a study directory (`--out`):

    study_config.yaml, environment.json    the resolved config and the software that ran it
    teacher-cache/<TOKENS>/                top-k teacher distributions of the blocks a budget's runs read (kd arms)
    students/<init>-<pca>-seed<S>/         initialized students, shared by arms that start alike and by budgets
    runs/<TOKENS>/<arm>/seed-<S>/          one `lmdistill train` run directory per budget, arm and seed
    locks/                                 the locks under which workers sharing the directory build a student or a
                                           budget's teacher cache once

and of its results directory (`--results`, default `--out`), the part to keep (commit it):

    study_config.yaml                      the config the records were made with
    records/teacher.json                   the teacher's held-out scores
    records/<TOKENS>/<arm>/seed-<S>.json   one record per finished run: its final scores, curve, student, timing
    results.json, report.md, curves.png, gap.png, budgets.png

A run with a record is finished: `--resume` trains only the runs without one, on any machine (a fresh one starts
from the committed results directory), continuing an interrupted run from its latest checkpoint. The results are
built from the records alone. Processes with the same --results share the runs by --workers/--worker; on one
machine they may share --out too, so that each teacher cache is built once, by the first worker whose kd run needs
it, while the others train the runs that need none.

Launch: `lmdistill study --config configs/study-budgets.yaml` or `lmdistill demo`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmdistill.commands.init import run_init
from lmdistill.commands.study_report import undefined_gap_seeds, write_plots, write_report
from lmdistill.commands.study_results import collect_results, record_path, teacher_record_path
from lmdistill.config import STUDY_ARMS, StudyArm, StudyConfig, load_yaml, run_name, to_yaml
from lmdistill.data.order import DataOrder
from lmdistill.data.packed import PackedData, prepare_data
from lmdistill.distributed import local_device
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import heldout_loss, heldout_sets, mixture_scores, mixture_weights, spread_blocks
from lmdistill.hidden import HiddenSpec
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.precision import resolve_precision, study_precision
from lmdistill.provenance import environment
from lmdistill.storage import exclusive, sha256_file, staged
from lmdistill.teacher_cache import INCOMPLETE, write_cache
from lmdistill.train.checkpoint import latest_checkpoint
from lmdistill.train.loop import run_train

log = logging.getLogger(__name__)

Run = tuple[int, str, int]  # (budget in tokens, arm, seed)


def student_dir(out: Path, arm: StudyArm, seed: int) -> Path:
    """Where the initialized student of an arm and seed lives; arms that start alike share it."""
    pca = f"-{arm.pca}" if arm.init.startswith("guide") else ""
    return out / "students" / f"{arm.init}{pca}-seed{seed}"


def run_dir(out: Path, budget: int, arm: str, seed: int) -> Path:
    """The `lmdistill train` directory of one run."""
    return out / "runs" / str(budget) / arm / f"seed-{seed}"


def results_dir(config: Any) -> Path:
    """Where a study's records and results go (`study`, `rationales study`): `--results`, else `--out`."""
    return Path(config.results or config.out)


# Settings that never change a study's results: how it is launched, where it is written.
LAUNCH_SETTINGS = ("resume", "report_only", "progress", "out", "dry_run", "results", "only", "workers", "worker")


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
    defaults = {  # a setting the file lacks (one added since) had its default
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(config)
    }
    changed = sorted(k for k, v in vars(config).items() if k not in skip and previous.get(k, defaults[k]) != v)
    if changed:
        raise LmdistillError(
            f"--resume: the study in {out} was run with different {', '.join(changed)}; its runs would not be "
            "comparable. Choose another --out, or restore those settings"
        )


def grown_study(config: Any, directory: Path, *, growable: tuple[str, ...]) -> Any:
    """The study ``directory`` holds once this launch is in it: ``config`` with each list in ``growable`` extended by
    the saved ``study_config.yaml``'s entries it lacks, so that a launch naming fewer arms, seeds or budgets (a
    worker's share) trains those and leaves the rest of the study in the saved config and the results.

    Args:
        config: a study config dataclass.
        directory: the study or results directory.
        growable: the list fields that `check_resumable` lets a launch change.
    """
    saved = directory / "study_config.yaml"
    if not saved.exists():
        return config
    previous = load_yaml(saved, type(config))
    lists = {name: list(dict.fromkeys([*previous.get(name, []), *getattr(config, name)])) for name in growable}
    return dataclasses.replace(config, **lists)


def keep_recorded_precision(config: Any, recorded: list[str]) -> Any:
    """``config`` with an "auto" precision fixed to the one its finished runs all recorded (`study_precision`).

    Args:
        config: a study config dataclass with ``precision``.
        recorded: the precision each finished run of the study recorded.
    """
    precision = study_precision(config.precision, recorded)
    if precision == config.precision:
        return config
    here = resolve_precision(local_device(), config.precision)[0]
    log.info("precision auto: %s, as the study's %d finished runs (this machine: %s)", precision, len(recorded), here)
    return dataclasses.replace(config, precision=precision)


GROWABLE = ("arms", "ablations", "seeds", "ablation_seeds", "train_tokens")


class _Scoring:
    """The held-out text of a study: the loss curve's blocks and the final scoring's per-source sets and weights."""

    def __init__(self, config: StudyConfig, data: PackedData) -> None:
        self.config = config
        self.curve_blocks = spread_blocks(data.val, config.eval_tokens)  # the blocks `lmdistill train` evaluates on
        ranges = data.manifest.get("val_blocks_by_source", {})
        unknown = [source for source in config.final_eval_sources if source not in ranges]
        if unknown:
            raise LmdistillError(
                f"--final-eval-sources: {unknown[0]} has no held-out blocks of its own; the data's: {', '.join(ranges)}"
            )
        weights = mixture_weights(data, list(ranges))
        shares = {source: round(weights[source] * config.final_eval_tokens) for source in ranges}
        for source in config.final_eval_sources:
            shares[source] = max(shares[source], config.final_eval_tokens)
        self.weights = weights
        self.sets = heldout_sets(data, shares)

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        """The model's final scores: the mixture's and each source's loss, and the tokens each was measured on."""
        options = {"batch_size": self.config.batch_size, "precision": self.config.precision}
        return {
            "scores": mixture_scores(model, self.sets, self.weights, **options),
            "score_tokens": {source: int(blocks.size) for source, blocks in self.sets.items()},
            "mixture_weights": self.weights,
        }

    def loss(self, model: torch.nn.Module) -> float:
        """The model's loss on the curve's blocks (as `lmdistill train` measures it)."""
        return heldout_loss(
            model, self.curve_blocks, batch_size=self.config.batch_size, precision=self.config.precision
        )


def _teacher_record(config: StudyConfig, teacher: Any, scoring: _Scoring) -> dict[str, Any]:
    log.info("scoring the teacher on %d held-out tokens", sum(b.size for b in scoring.sets.values()))
    started = time.perf_counter()
    record = {"name": teacher.name, "parameters": teacher.model.num_parameters(), **scoring.score(teacher.model)}
    record["curve_val_loss"] = scoring.loss(teacher.model)
    record["seconds"] = time.perf_counter() - started
    return record


def _prepare_students(config: StudyConfig, out: Path, runs: list[Run], scoring: _Scoring) -> None:
    """Initialize every distinct student of ``runs`` once and add its step-0 loss on the curve's blocks (one worker
    of several sharing --out builds each, the others wait for it)."""
    for path, (arm_name, seed) in {student_dir(out, STUDY_ARMS[a], s): (a, s) for _, a, s in runs}.items():
        with exclusive(out / "locks" / f"student-{path.name}"):
            if not (path / "init_report.json").is_file():
                run_init(config.init_config(STUDY_ARMS[arm_name], seed, str(path)))
            report = json.loads((path / "init_report.json").read_text())
            if "step0_val_loss" not in report:
                student, _, _ = load_hf_directory(path, torch.float32)
                report["step0_val_loss"] = scoring.loss(student)
                (path / "init_report.json").write_text(json.dumps(report, indent=2) + "\n")


class _Teacher:
    """The teacher, loaded on first use and dropped before training (runs read its cache)."""

    def __init__(self, config: StudyConfig) -> None:
        self.config, self.loaded = config, None

    def get(self) -> Any:
        if self.loaded is None:
            self.loaded = load_teacher(self.config.teacher)
        return self.loaded

    def drop(self) -> None:
        self.loaded = None


def _teacher_cache(
    config: StudyConfig, out: Path, loader: _Teacher, data: PackedData, budget: int, *, wait: bool
) -> Path | None:
    """The teacher cache of a budget's runs, built once by one of the workers sharing --out; None, without
    ``wait``, while another worker builds it."""
    path = out / "teacher-cache" / str(budget)
    with exclusive(out / "locks" / f"teacher-cache-{budget}", wait=wait) as held:
        return _build_teacher_cache(config, path, loader, data, budget) if held else None


def _build_teacher_cache(config: StudyConfig, path: Path, loader: _Teacher, data: PackedData, budget: int) -> Path:
    """The teacher cache of a budget's runs in ``path``: exactly the blocks they read, the same on every machine;
    with hkd arms also the hidden states of the study's student shape (a cache built without them is built again,
    with the same top-k)."""
    hidden = HiddenSpec(config.hidden_size, config.num_layers) if config.hidden_arms else None
    rebuild = hidden is not None and _built_without_hidden(path)
    if rebuild:
        (path / "build.json").unlink(missing_ok=True)  # --overwrite deletes only cache files
    if rebuild or not (path / "manifest.json").is_file():
        teacher = loader.get()
        samples = config.steps(budget) * config.batch_size
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
            progress=config.progress,
            resume=not rebuild,  # an interrupted build continues
            overwrite=rebuild,
            hidden=hidden,
        )
        (path / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
    return path


def _built_without_hidden(path: Path) -> bool:
    """Whether `path` holds a teacher cache (finished or interrupted) without hidden states."""
    for name in ("manifest.json", INCOMPLETE):
        if (path / name).is_file():
            return "hidden" not in json.loads((path / name).read_text())
    return False


def _curve(run: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {"tokens": r["tokens"], "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]} for r in records if "val_loss" in r
    ]


def _run_record(config: StudyConfig, out: Path, run: Run, summary: dict[str, Any], scoring: _Scoring) -> dict:
    """The record of a finished run: what the results need, so that they never read a run directory."""
    budget, arm_name, seed = run
    directory = run_dir(out, *run)
    student = json.loads((student_dir(out, STUDY_ARMS[arm_name], seed) / "init_report.json").read_text())
    env = json.loads((directory / "environment.json").read_text())
    model, _, _ = load_hf_directory(Path(summary["final"]), torch.float32)
    record = {"budget": budget, "arm": arm_name, "seed": seed, **scoring.score(model)}
    cache = out / "teacher-cache" / str(budget) / "build.json"
    record.update(
        tokens=summary["tokens"],
        seconds=summary["seconds"],
        tokens_per_s=summary["tokens_per_s"],
        precision=env["precision"],
        precision_reason=env["precision_reason"],
        cpu=env.get("cpu"),
        cpu_threads=env.get("cpu_threads"),
        curve=_curve(directory),
        step0_val_loss=student["step0_val_loss"],
        explained_variance=student["explained_variance"],
        student=student["student"],
        weights_sha256=sha256_file(Path(summary["final"]) / "model.safetensors"),
        teacher_cache_seconds=json.loads(cache.read_text())["seconds"] if cache.is_file() else None,
    )
    return record


def write_results(config: StudyConfig, *, partial: bool = False) -> dict[str, Any]:
    """Collect the records of the whole study (`grown_study`) into results.json, report.md, curves.png, gap.png and
    budgets.png; return the results."""
    results_path = results_dir(config)
    study = grown_study(config, results_path, growable=GROWABLE)
    results = collect_results(study, results_path, partial=partial or study.runs() != config.runs())
    (results_path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if undefined_gap_seeds(results):
        log.warning("the gap closed is undefined for some seeds (null): the teacher is not better than `random`")
    write_report(results, results_path / "report.md")
    write_plots(results, results_path)
    results["written_to"] = str(results_path)
    return results


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write a record as indented UTF-8 JSON, creating its directory; atomically, so that a crash or another worker
    reading it never sees half a record."""
    with staged(path, directory=False) as partial:
        partial.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _pending(config: StudyConfig) -> list[Run]:
    """The runs to train: --only's, else this worker's runs without a record."""
    if config.only:
        return [run for run in config.runs() if run_name(*run) in config.only]
    return [run for run in config.assigned(config.runs()) if not record_path(results_dir(config), *run).is_file()]


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run (or continue) a study and write its results; with `--only`, just train those runs.

    Args:
        config: the resolved `StudyConfig`.

    Returns:
        The results (as in `results.json`), plus `written_to`: the results directory; with `--only`, the runs'
        summaries under `runs`.
    """
    out, results_path = Path(config.out), results_dir(config)
    if config.report_only:
        return write_results(config, partial=True)
    check_resumable(config, out, growable=GROWABLE)
    if not config.only and results_path != out:
        check_resumable(config, results_path, growable=GROWABLE)
    for directory in {out} if config.only else {out, results_path}:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "study_config.yaml").write_text(to_yaml(grown_study(config, directory, growable=GROWABLE)))
    records = (record_path(results_path, *run) for run in config.runs())
    config = keep_recorded_precision(config, [json.loads(p.read_text())["precision"] for p in records if p.is_file()])
    pending = _pending(config)
    if not pending and teacher_record_path(results_path).is_file():
        return write_results(config, partial=config.workers > 1)
    teacher = _Teacher(config)
    # the precision of the study's own forward passes (teacher scoring, step-0 losses; the cache's teacher runs in
    # fp32); runs record theirs
    precision = resolve_precision(next(teacher.get().model.parameters()).device, config.precision)
    (out / "environment.json").write_text(json.dumps(environment(precision), indent=2) + "\n")
    data = prepare_data(config.data, teacher.get().tokenizer, config.seq_len, val_fraction=config.val_fraction)
    scoring = _Scoring(config, data)
    if not config.only and not teacher_record_path(results_path).is_file():
        write_json(teacher_record_path(results_path), _teacher_record(config, teacher.get(), scoring))
    _prepare_students(config, out, pending, scoring)
    summaries = _train_runs(config, pending, teacher, data, scoring)
    if config.only:
        return {"runs": summaries, "written_to": str(out)}
    return write_results(config, partial=config.workers > 1)  # the other workers' runs may not have finished


def _train_runs(
    config: StudyConfig, pending: list[Run], teacher: _Teacher, data: PackedData, scoring: _Scoring
) -> dict[str, Any]:
    """Train the pending runs in order, recording each as it finishes (with `--only`, no records)."""
    out = Path(config.out)
    step_tokens = config.batch_size * config.seq_len
    overall = tqdm(
        total=sum(config.steps(budget) for budget, _, _ in pending) * step_tokens,
        initial=sum(_steps_done(run_dir(out, *run)) for run in pending) * step_tokens,
        unit="tok",
        unit_scale=True,
        desc="study",
        dynamic_ncols=True,
        disable=not config.progress,
    )
    summaries = {}
    queue = list(pending)
    while queue:
        run = queue.pop(0)
        budget, arm_name, seed = run
        arm = STUDY_ARMS[arm_name]
        cache = None
        if arm.loss != "ce":
            # while another worker builds this budget's cache, train the runs that need none first
            waiting_helps = any(STUDY_ARMS[a].loss == "ce" for _, a, _ in queue)
            cache = _teacher_cache(config, out, teacher, data, budget, wait=not waiting_helps)
            if cache is None:
                queue.append(run)
                continue
        teacher.drop()
        overall.set_description(f"study: run {len(summaries) + 1}/{len(pending)} {run_name(*run)}")
        directory = run_dir(out, *run)
        train_config = config.train_config(
            arm,
            budget,
            student=str(student_dir(out, arm, seed)),
            out=str(directory),
            teacher_cache=str(cache) if cache else None,
            resume=latest_checkpoint(directory / "checkpoints") is not None,
        )
        summary = _summary(directory) or run_train(train_config, on_step=lambda record: overall.update(step_tokens))
        summaries[run_name(*run)] = summary
        if not config.only:
            write_json(record_path(results_dir(config), *run), _run_record(config, out, run, summary, scoring))
            write_results(config, partial=True)
    overall.close()
    return summaries


def _summary(run: Path) -> dict[str, Any] | None:
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _steps_done(run: Path) -> int:
    summary = _summary(run)
    if summary:
        return summary["steps"]
    checkpoint = latest_checkpoint(run / "checkpoints")
    return json.loads((checkpoint / "meta.json").read_text())["step"] if checkpoint else 0
