"""The configs of `lmdistill rationales extract`, `train`, `eval` and `study`, and the rationale study's arms."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmdistill.config.bases import (
    Answer,
    Answering,
    Attribution,
    Engine,
    EngineRun,
    Generation,
    StudentRun,
    StudyRun,
    Task,
    TeacherPrecision,
)
from lmdistill.config.distill import TrainConfig
from lmdistill.config.schema import check_ranges, check_required, check_seeds, check_types, fields_of, override
from lmdistill.errors import LmdistillError
from lmdistill.rationales.tasks import task_splits

RationaleSource = Literal["file", "llm", "gold", "none"]
LineStyle = str | tuple[int, tuple[int, ...]]  # a matplotlib line style


@dataclass
class RationaleExtractConfig(TeacherPrecision, Attribution, Answering):
    """`lmdistill rationales extract`: the teacher answers each example; the top-k input words of the gradient
    attribution of its answer become the rationale, one JSON line per example (resumable)."""

    teacher: str = field(default="default", metadata={"help": "teacher: HF directory, .gguf file or 'default'"})
    out: str | None = field(default=None, metadata={"help": "output JSON-lines file (required); appended to"})
    k: int = field(default=5, metadata={"help": "rationale words per example"})
    order: Literal["score", "input"] = field(
        default="score", metadata={"help": "order of the rationale words: by score, or as in the input"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "out", "the JSON-lines file to write the rationales to")
        check_ranges(self, ["k", "ig_steps"], 1)
        if self.teacher_dtype == "int8":
            raise LmdistillError(
                "--teacher-dtype int8: gradient attribution needs gradients through the teacher, which its "
                "int8-quantized layers do not give; pass fp32, bf16 or auto"
            )
        self.check_answering()


@dataclass
@override(
    lr=3e-4,
    help={
        "batch_size": "examples per micro-batch per process (1-2 sequences each)",
        "eval_every": "held-out label loss every N steps (0: at the end)",
    },
)
class RationaleTraining(Engine, Generation, StudentRun):
    """The student and how it is trained: settings shared by `rationales train` and `rationales study`."""

    lambda_rationale: float = field(
        default=1.0, metadata={"help": "weight of the rationale loss (0: plain fine-tuning on labels)"}
    )
    max_len: int = field(
        default=256,
        metadata={
            "help": "tokens per sequence; longer ones lose tokens of the example's text (the end of its longest part)"
        },
    )
    val_fraction: float = field(default=0.05, metadata={"help": "share of the examples held out (at least one)"})
    data_seed: int = field(default=0, metadata={"help": "gsm-symbolic: seed of the generated train split"})

    def check_training(self) -> None:
        """Range checks of the shared settings (the engine's own through a `TrainConfig`); call after the required
        fields are checked."""
        check_ranges(self, ["lambda_rationale"], 0)
        check_ranges(self, ["max_len"], 2)
        check_ranges(self, ["val_fraction"], 0, 1, exclusive=True)
        if not 1 <= self.size <= 1_000_000 or self.data_seed < 0:
            raise LmdistillError("--size must be in [1, 1000000] and --data-seed non-negative")
        self.engine_config()  # the engine's own checks of the shared settings (steps, batch, lr, ...)

    def engine_config(self, **run: Any) -> TrainConfig:
        """The training engine's settings (a `TrainConfig` validates them): the student and run directory, the
        `Engine` fields, --max-len as the sequence length and the held-out share.

        Args:
            run: the engine's `EngineRun` fields (``seed``, ``resume``, ``fsdp``, ``progress``; else their defaults).
        """
        shared = fields_of(self, StudentRun, Engine)
        return TrainConfig(**shared, seq_len=self.max_len, val_fraction=self.val_fraction, **run)


@dataclass
@override(
    help={
        "split": "split to train on",
        "template": "prompt template; unset: the task's own (the one extract used by default)",
        "limit": "train on only the first N examples of the split",
        "seed": "seed of the example order and anything random",
        "fsdp": "under torchrun: shard the student (FSDP2) instead of DDP",
    }
)
class RationaleTrainConfig(EngineRun, Task, RationaleTraining):
    """`lmdistill rationales train`: multitask training of a student: `predict:` prompt -> label, `explain:` prompt ->
    rationale; loss = L_label + lambda * L_rationale, each the mean cross-entropy over its own target tokens."""

    rationales: str | None = field(
        default=None, metadata={"help": "JSON-lines file from `rationales extract` (--rationale-source file)"}
    )
    rationale_source: RationaleSource = field(
        default="file",
        metadata={
            "help": "file: --rationales, matched by id; llm: the 540B model's chain-of-thought rationales (svamp, cqa;"
            " Distilling step-by-step); gold: the data's own (gsm-symbolic, cqa, esnli); none: plain fine-tuning"
        },
    )

    def __post_init__(self) -> None:
        check_types(self)
        if self.student is None or self.out is None:
            raise LmdistillError("--student and --out are required")
        if self.rationale_source == "file" and self.rationales is None and self.lambda_rationale > 0:
            raise LmdistillError(
                "--rationales FILE is required with --rationale-source file (or use --rationale-source llm, gold or "
                "none, or --lambda-rationale 0)"
            )
        if self.rationale_source != "file" and self.rationales is not None:
            raise LmdistillError(f"--rationales applies to --rationale-source file, not {self.rationale_source}")
        self.check_task()
        self.check_training()

    def engine_config(self, **run: Any) -> TrainConfig:
        """The training engine's settings of this run (a `TrainConfig` validates them)."""
        return super().engine_config(**{**fields_of(self, EngineRun), **run})


@dataclass
@override(
    split="test",
    help={
        "split": "split to evaluate",
        "template": "prompt template; unset: the task's own",
        "limit": "evaluate only the first N examples",
    },
)
class RationaleEvalConfig(Answering):
    """`lmdistill rationales eval`: accuracy of a model on a task from the `predict:` prompt alone (choice scoring for
    multiple-choice tasks, else greedy decoding; SVAMP equations are evaluated and compared as numbers)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "the model to evaluate: a Hugging Face directory, or a teacher ('default', a .gguf file; then "
            "--out is required)"
        },
    )
    out: str | None = field(default=None, metadata={"help": "results JSON (default: MODEL/rationales_eval.json)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "model", "the model directory to evaluate")
        if self.out is None and not Path(self.model).expanduser().is_dir():
            raise LmdistillError(
                f"--model {self.model} is not a model directory: to evaluate a teacher ('default', a .gguf file) give "
                "--out FILE, the JSON file to write the results to"
            )
        self.check_answering()


@dataclass(frozen=True)
class RationaleArm:
    """One kind of arm of the rationale study: what its runs train on, where it applies, how the report shows it."""

    source: RationaleSource  # the `rationales train --rationale-source` of its runs
    tasks: tuple[str, ...]  # the study tasks it applies to
    description: str  # its rationale targets in report.md ({k}: a saliency or random arm's k)
    style: LineStyle | None = None  # its horizontal line in accuracy_vs_k.png; None: plotted against k (one arm per k)


RATIONALE_STUDY_TASKS = ("svamp", "cqa", "gsm-symbolic", "esnli")
# arm kind -> its record; the order is the report's
RATIONALE_STUDY_ARMS: dict[str, RationaleArm] = {
    "finetune": RationaleArm("none", RATIONALE_STUDY_TASKS, "none: fine-tuning on labels", ":"),
    "saliency": RationaleArm("file", RATIONALE_STUDY_TASKS, "the teacher's top-{k} saliency words"),
    # the control: does the teacher's ranking matter, or any extra text of the example?
    "random": RationaleArm("file", RATIONALE_STUDY_TASKS, "{k} of the same candidate words drawn at random"),
    # the 540B model's chain-of-thought rationales in the shared data
    "step-by-step": RationaleArm(
        "llm", ("svamp", "cqa"), "the 540B model's chain of thought (Distilling step-by-step)", "-."
    ),
    # the data's own: CQA's explanations, gsm-symbolic's solution steps, e-SNLI's explanation_1
    "gold": RationaleArm("gold", ("cqa", "gsm-symbolic", "esnli"), "the data's own rationales", (0, (5, 2, 1, 2))),
}
SALIENCY_ARM_PREFIX = "saliency-k"
K_ARMS = ("saliency", "random")  # the arm kinds with one arm per k, named KIND-k<K>
DEFAULT_ARMS = ("finetune", "saliency", "step-by-step", "gold")  # random: on request


@dataclass
@override(
    help={
        "student": "the student every run starts from: a Hugging Face directory (required)",
        "out": "study directory (required)",
        "method": "attribution method of the rationales",
        "report_only": "write results, report and plot from the runs finished so far, without training",
    }
)
class RationaleStudyConfig(StudyRun, Attribution, Answer, RationaleTraining):
    """`lmdistill rationales study`: on each task the same student trained on labels alone (finetune), with the
    teacher's top-k saliency rationales (saliency-k<K> for every k), with the 540B model's chain-of-thought rationales
    (step-by-step: svamp, cqa), with the data's own (gold: cqa, gsm-symbolic, esnli) and, as a control, with k of the
    same candidate words drawn at random (random-k<K>, on request), every arm with every seed; all
    evaluated on the test split (or esnli's validation split, --eval-split) beside the teacher; results.json,
    report.md, accuracy_vs_k.png."""

    teacher: str = field(
        default="default",
        metadata={"help": "teacher (saliency rationales and the reference accuracy): HF directory, .gguf or 'default'"},
    )
    task_teachers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "per-task teachers as TASK=MODEL (e.g. cqa=runs/teacher-cqa/final, a teacher fine-tuned on the "
            "task); the other tasks use --teacher"
        },
    )
    tasks: list[str] = field(
        default_factory=lambda: ["svamp", "cqa"], metadata={"help": f"tasks; known: {', '.join(RATIONALE_STUDY_TASKS)}"}
    )
    arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={
            "help": "finetune (labels only), saliency (one arm per --saliency-ks), random (one arm per --random-ks), "
            "step-by-step (svamp, cqa), gold (cqa, gsm-symbolic, esnli); an arm runs on the tasks it applies to"
        },
    )
    saliency_ks: list[int] = field(
        default_factory=lambda: [1, 3, 5, 7, 10], metadata={"help": "rationale words per example of the saliency arms"}
    )
    random_ks: list[int] = field(
        default_factory=lambda: [5], metadata={"help": "rationale words per example of the random arms"}
    )
    random_seed: int = field(
        default=0, metadata={"help": "seed of the random arms' words (each example draws with it and its id)"}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds (example order) of every arm"}
    )
    train_limit: int | None = field(
        default=None, metadata={"help": "extract rationales for and train on only the first N training examples"}
    )
    test_limit: int | None = field(default=None, metadata={"help": "evaluate on only the first N test examples"})
    eval_split: Literal["test", "validation"] = field(
        default="test",
        metadata={
            "help": "split the runs and the teacher are evaluated on: test, or validation (esnli: a slice of the "
            "training pool apart from train, for choosing settings without the test split)"
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep each finished run's checkpoints (else removed once it is evaluated; final/ stays)"},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "out", "the directory to write the study to")
        check_required(self, "student", "the Hugging Face directory every run starts from")
        for name, known in (("tasks", RATIONALE_STUDY_TASKS), ("arms", tuple(RATIONALE_STUDY_ARMS))):
            values = getattr(self, name)
            unknown = [v for v in values if v not in known]
            if unknown:
                raise LmdistillError(f"--{name}: unknown {name} {unknown}; known: {', '.join(known)}")
            if not values or len(set(values)) < len(values):
                raise LmdistillError(f"--{name} must name distinct {name}, at least one, got {values}")
        for arm in self.arms:
            applies = RATIONALE_STUDY_ARMS[arm].tasks
            if not set(applies) & set(self.tasks):
                raise LmdistillError(
                    f"--arms {arm} applies to none of --tasks {' '.join(self.tasks)} (only to {', '.join(applies)})"
                )
        for kind in K_ARMS:
            ks = getattr(self, f"{kind}_ks")
            if (kind in self.arms and not ks) or (ks and min(ks) < 1) or len(set(ks)) < len(ks):
                raise LmdistillError(f"--{kind}-ks must be distinct positive word counts, got {ks}")
        check_seeds(self, ["seeds"])
        self.check_workers()
        check_ranges(self, ["random_seed"], 0)
        check_ranges(self, ["train_limit", "test_limit"], 1)
        lacking = [task for task in self.tasks if self.eval_split not in task_splits(task)]
        if lacking:
            raise LmdistillError(f"--eval-split {self.eval_split}: tasks {lacking} have no such split (esnli has)")
        pairs = [entry.partition("=") for entry in self.task_teachers]
        named = [task for task, _, _ in pairs]
        if any(not sep or not model for _, sep, model in pairs) or len(set(named)) < len(named):
            raise LmdistillError(f"--task-teachers must be distinct TASK=MODEL pairs, got {self.task_teachers}")
        if set(named) - set(self.tasks):
            raise LmdistillError(f"--task-teachers names tasks not in --tasks: {sorted(set(named) - set(self.tasks))}")
        self.check_training()
        # the stages' own checks, once, so that their errors come before any work
        task = self.tasks[0]
        self.train_config(task, "finetune", self.seeds[0], out="run")
        self.eval_config(task, model="model", out="eval.json")
        if "saliency" in self.arms:
            self.extract_config(task, out="rationales.jsonl")

    def teacher_of(self, task: str) -> str:
        """The teacher of ``task``: its --task-teachers entry, else --teacher."""
        return dict(entry.split("=", 1) for entry in self.task_teachers).get(task, self.teacher)

    def arm_names(self, task: str) -> list[str]:
        """The arms run on ``task``: finetune, saliency-k<K> and random-k<K> for each of their k (ascending),
        step-by-step, gold, as far as they are in --arms and apply to the task."""
        names: list[str] = []
        for name, arm in RATIONALE_STUDY_ARMS.items():
            if name in self.arms and task in arm.tasks:
                per_k = name in K_ARMS
                names += [f"{name}-k{k}" for k in sorted(getattr(self, f"{name}_ks"))] if per_k else [name]
        return names

    def runs(self) -> list[tuple[str, str, int]]:
        """Every (task, arm, seed) of the study, seed by seed, so that an interrupted study already holds whole
        comparisons at its first seeds."""
        return [(task, arm, seed) for seed in self.seeds for task in self.tasks for arm in self.arm_names(task)]

    @staticmethod
    def arm_kind(arm: str) -> str:
        """The key of an arm in `RATIONALE_STUDY_ARMS` (``random-k5`` -> ``random``, ``gold`` -> ``gold``)."""
        kind, _, k = arm.rpartition("-k")
        return kind if kind in K_ARMS and k.isdigit() else arm

    @staticmethod
    def arm_k(arm: str) -> int | None:
        """The k of a saliency or random arm (``random-k5`` -> 5); None for the other arms."""
        kind, _, k = arm.rpartition("-k")
        return int(k) if kind in K_ARMS and k.isdigit() else None

    @staticmethod
    def saliency_k(arm: str) -> int | None:
        """The k of a saliency arm (``saliency-k5`` -> 5); None for the other arms."""
        return int(arm.removeprefix(SALIENCY_ARM_PREFIX)) if arm.startswith(SALIENCY_ARM_PREFIX) else None

    @staticmethod
    def rationale_source(arm: str) -> RationaleSource:
        """The `rationales train --rationale-source` of an arm's runs."""
        return RATIONALE_STUDY_ARMS[RationaleStudyConfig.arm_kind(arm)].source

    def extract_config(self, task: str, *, out: str) -> RationaleExtractConfig:
        """The extraction of a task's saliency rationales: the training examples, at the largest k, in score order
        (so that the first k words of each record are its top-k rationale for every smaller k). The teacher runs in
        the study's precision (auto, bf16 or fp32 are also teacher dtypes), as the study's training does."""
        return RationaleExtractConfig(
            **fields_of(self, Attribution, Answer),
            teacher=self.teacher_of(task),
            teacher_dtype=self.precision,
            task=task,
            split="train",
            out=out,
            k=max(self.saliency_ks),
            order="score",
            limit=self.train_limit,
            batch_size=self.batch_size,
            size=self.size,
            seed=self.data_seed,
            progress=self.progress,
        )

    def train_config(
        self, task: str, arm: str, seed: int, *, out: str, rationales: str | None = None, resume: bool = False
    ) -> RationaleTrainConfig:
        """The `rationales train` settings of one run (finetune: λ = 0; a saliency or random arm reads
        ``rationales``)."""
        source = self.rationale_source(arm)
        settings = {**fields_of(self, RationaleTraining), "out": out}
        if source == "none":
            settings["lambda_rationale"] = 0.0
        return RationaleTrainConfig(
            **settings,
            task=task,
            split="train",
            limit=self.train_limit,
            rationales=rationales if source == "file" else None,
            rationale_source=source,
            seed=seed,
            resume=resume,
            progress=self.progress,
        )

    def eval_config(self, task: str, *, model: str, out: str) -> RationaleEvalConfig:
        """The `rationales eval` settings of a model (a run's student or the teacher) on a task's --eval-split."""
        return RationaleEvalConfig(
            **fields_of(self, Answer),
            model=model,
            task=task,
            split=self.eval_split,
            limit=self.test_limit,
            batch_size=self.batch_size,
            size=self.size,
            seed=self.data_seed,
            out=out,
            progress=self.progress,
        )
