"""The field groups that the command configs inherit: a field that several commands share is written once, here.

A command that needs another default or help text of an inherited field says so with `schema.override`. The range
checks of the training settings stay in `TrainConfig`, which `StudyConfig` and the rationale training configs build
to validate theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmdistill.config.schema import check_ranges
from lmdistill.errors import LmdistillError
from lmdistill.losses import DivergenceKind
from lmdistill.models.teacher_dtype import TeacherDtype
from lmdistill.rationales.tasks import GSM_TAKES_NO_DATA, JSONL_NEEDS_DATA, check_template, task_spec

Precision = Literal["auto", "bf16", "fp32"]
RationaleTask = Literal["svamp", "cqa", "anli1", "esnli", "gsm-symbolic", "jsonl"]
AttributionMethod = Literal["saliency", "input-x-gradient", "integrated-gradients"]
IgBaseline = Literal["token", "zero"]


@dataclass
class StudentRun:
    """The student a command trains and where its run goes (`train`, `rationales train`, `rationales study`)."""

    student: str | None = field(default=None, metadata={"help": "student: a Hugging Face directory, e.g. from init"})
    out: str | None = field(default=None, metadata={"help": "run directory (required); the student lands in OUT/final"})


@dataclass
class StudyRun:
    """How a study runs: its runs continue, or only the report is written (`study`, `rationales study`)."""

    resume: bool = field(default=False, metadata={"help": "continue an interrupted study; finished runs are kept"})
    report_only: bool = field(
        default=False,
        metadata={"help": "write results, report and plots from the runs finished so far, without training"},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    results: str | None = field(
        default=None,
        metadata={
            "help": "directory of the results and of every finished run's record (default: --out; commit it); with "
            "--resume, runs recorded there are not trained again, on any machine"
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "processes that share the study's runs, each with its own --out and the same --results: this one "
            "trains the runs whose place in the study's order, modulo WORKERS, is --worker"
        },
    )
    worker: int = field(default=0, metadata={"help": "which of the --workers processes this is: 0 to WORKERS - 1"})

    def check_workers(self) -> None:
        """Refuse a --worker outside 0 to --workers - 1."""
        check_ranges(self, ["workers"], 1)
        if not 0 <= self.worker < self.workers:
            last = self.workers - 1
            raise LmdistillError(f"--worker must be in [0, {last}] (--workers {self.workers}), got {self.worker}")

    def assigned(self, runs: list[Any]) -> list[Any]:
        """This worker's share of ``runs`` (the study's whole run order): every --workers-th from place --worker."""
        return runs[self.worker :: self.workers]


@dataclass
class DryRun:
    """`--dry-run` (`train`, `study`): the expected peak memory, without loading any weights."""

    dry_run: bool = field(
        default=False,
        metadata={
            "help": "print the expected peak memory per process by component (and a teacher cache's disk), from the "
            "configs alone, and exit"
        },
    )


@dataclass
class Corpus:
    """The text a command reads as blocks of tokens, and its held-out share (`train`, `cache-teacher`, `eval`,
    `study`)."""

    data: list[str] | None = field(
        default=None, metadata={"help": "text files, directories or globs (default: the built-in offline corpus)"}
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out (--data only)"})


@dataclass
class Autocast:
    """How forward passes run (`train`, `cache-teacher`, `eval`, `study`, `rationales train`, `rationales study`)."""

    precision: Precision = field(
        default="auto",
        metadata={
            "help": "forward passes in bf16 autocast or fp32; auto: bf16 where it is fast (GPU, AVX512-BF16/AMX CPU)"
        },
    )


@dataclass
class TeacherPrecision:
    """The teacher's dtype (`train` with --teacher, `cache-teacher`, `eval --teacher`, `rationales extract`); the
    teacher runs in it outside the student's --precision."""

    teacher_dtype: TeacherDtype = field(
        default="auto",
        metadata={
            "help": "teacher weights and compute: fp32, bf16, or int8 (its linear layers and output head dynamically "
            "quantized, CPU only); auto: bf16 where it is fast (GPU, AVX512-BF16/AMX CPU), else fp32, never int8"
        },
    )


@dataclass
class Distillation:
    """The distillation loss (`train`, and the kd arms of `study`)."""

    kd_loss: DivergenceKind = field(default="forward-kl", metadata={"help": "divergence between teacher and student"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kd loss (scaled by T^2)"})
    kd_weight: float = field(default=0.5, metadata={"help": "ce+kd: loss = (1 - w) * ce + w * kd"})
    hidden_weight: float = field(
        default=1.0,
        metadata={
            "help": "kd+hkd, ce+kd+hkd: weight h of the hidden-state loss (1 - cosine to the teacher's states through "
            "the GUIDE projection), added to the kd mix: loss + h * hkd"
        },
    )


@dataclass
class Optimizer:
    """AdamW with linear warmup and cosine decay (`train`, `study`, `rationales train`, `rationales study`)."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr (cosine)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})


@dataclass
class Engine(Autocast, Optimizer):
    """The training engine's settings (`lmdistill.train.loop`): `train`, `rationales train`, `rationales study`."""

    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    chunk_size: int = field(
        default=256, metadata={"help": "positions per chunk of the loss: memory grows with chunk x vocabulary"}
    )
    eval_every: int = field(default=0, metadata={"help": "evaluate on held-out data every N steps (0: at the end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write metrics every N steps"})


@dataclass
class EngineRun:
    """How one launch of the training engine runs (`train`, `rationales train`)."""

    seed: int = field(default=0, metadata={"help": "seed of data order and anything random"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "under torchrun: shard the student's weights, gradients and optimizer state over the processes "
            "(FSDP2, per decoder layer) instead of replicating them (DDP)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class Generation:
    """The size of gsm-symbolic's generated splits (the other rationale tasks read the shared data)."""

    size: int = field(default=1000, metadata={"help": "gsm-symbolic: examples generated per split"})


@dataclass
class Task:
    """The examples of one rationale task (`rationales extract`, `train`, `eval`)."""

    task: RationaleTask = field(
        default="gsm-symbolic",
        metadata={"help": "svamp, cqa, anli1, esnli (shared data), gsm-symbolic (generated) or jsonl (--data FILE)"},
    )
    split: Literal["train", "test", "valid", "validation"] = field(
        default="train",
        metadata={
            "help": "split of the shared data or of gsm-symbolic (anli1: valid; esnli: valid, the whole file, or its "
            "train, validation, test by premise)"
        },
    )
    data: str | None = field(
        default=None, metadata={"help": "JSON-lines file in the task's format, instead of the shared data"}
    )
    template: str | None = field(
        default=None,
        metadata={"help": "prompt template such as '{input}{choices}\\nAnswer:'; unset: the task's own (see README)"},
    )
    limit: int | None = field(default=None, metadata={"help": "process only the first N examples of the split"})

    @property
    def prompt_template(self) -> str:
        """--template, else the task's default template."""
        return self.template if self.template is not None else task_spec(self.task).template

    def check_task(self) -> None:
        """The checks of --limit, --template and --data against the task."""
        check_ranges(self, ["limit"], 1)
        check_template(self.prompt_template, self.task)
        if self.task == "jsonl" and self.data is None:
            raise LmdistillError(JSONL_NEEDS_DATA)
        if self.task == "gsm-symbolic" and self.data is not None:
            raise LmdistillError(GSM_TAKES_NO_DATA)


@dataclass
class Answer:
    """How a model answers a rationale task's examples: choice scoring or greedy decoding."""

    max_new_tokens: int = field(default=24, metadata={"help": "greedy answer length limit (tasks without choices)"})
    choice_score: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "choices compete by total or per-token log-probability"}
    )


@dataclass
class Answering(Generation, Answer, Task):
    """A model answers the examples of a task split, in batches: `rationales extract` (the teacher) and
    `rationales eval`."""

    batch_size: int = field(default=8, metadata={"help": "examples per batch"})
    seed: int = field(default=0, metadata={"help": "gsm-symbolic: seed of the train split (test: seed + 1,000,000)"})

    def check_answering(self) -> None:
        """The range checks of the batches, answers and generated splits, then `Task.check_task`."""
        check_ranges(self, ["batch_size", "max_new_tokens"], 1)
        if not 1 <= self.size <= 1_000_000 or self.seed < 0:
            raise LmdistillError("--size must be in [1, 1000000] and --seed non-negative")
        self.check_task()


@dataclass
class Attribution:
    """How the teacher's answer is attributed to its input words (`rationales extract`, `rationales study`)."""

    method: AttributionMethod = field(default="saliency", metadata={"help": "attribution method"})
    reduction: Literal["l1", "l2"] = field(
        default="l1", metadata={"help": "norm of the attribution over the embedding dimension"}
    )
    stop_words: bool = field(default=True, metadata={"help": "leave English stop words out of rationales"})
    ig_steps: int = field(default=20, metadata={"help": "integration steps of integrated-gradients"})
    ig_baseline: IgBaseline = field(
        default="token",
        metadata={
            "help": "where integrated-gradients starts the prompt tokens: token (the pad token's embedding, else "
            "EOS's) or zero (pre-norm teachers barely change along the path from 0 but jump right next to it, which "
            "the integration misses)"
        },
    )
