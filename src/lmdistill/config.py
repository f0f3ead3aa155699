"""Typed configs: the only schema. A YAML file is a serialized instance; the CLI builds flags from the fields.

Each field's `help` becomes its `--help` text. `__post_init__` checks types and ranges, so a YAML file gets the same
validation as the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmdistill.errors import LmdistillError
from lmdistill.init.build import InitMethod
from lmdistill.init.guide import PCAMode
from lmdistill.rationales.tasks import GSM_TAKES_NO_DATA, JSONL_NEEDS_DATA, check_template, task_spec


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, annotation)


def check_types(config: Any) -> None:
    """Raise `LmdistillError` naming the first field whose value does not match its annotation.

    Args:
        config: a dataclass instance.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else hints[f.name]
            raise LmdistillError(f"--{f.name.replace('_', '-')}: {value!r} is not valid; expected {allowed}")


def to_yaml(config: Any) -> str:
    """The config as a YAML mapping of its fields, readable back with `--config`."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def load_yaml(path: str | Path, config_class: type) -> dict[str, Any]:
    """Read a YAML config file into a dict of `config_class` fields.

    Args:
        path: the YAML file.
        config_class: the dataclass whose fields the file may set.

    Returns:
        The mapping (validated later, when the dataclass is built).

    Raises:
        LmdistillError: missing file, invalid YAML, not a mapping, or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise LmdistillError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LmdistillError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmdistillError(f"config file {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LmdistillError(f"config file {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    return data


@dataclass
class InitConfig:
    """`lmdistill init`: build a student from a teacher and write it as a Hugging Face directory."""

    teacher: str = field(
        default="default",
        metadata={
            "help": "teacher: a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)"
        },
    )
    method: InitMethod = field(
        default="guide",
        metadata={"help": "initialization: random, weight-selection, guide (block 1 + embeddings) or guide-all"},
    )
    hidden_size: int | None = field(default=None, metadata={"help": "student width (default: the teacher's)"})
    num_layers: int | None = field(default=None, metadata={"help": "student blocks (default: the teacher's)"})
    num_heads: int | None = field(default=None, metadata={"help": "student query heads (default: the teacher's)"})
    num_kv_heads: int | None = field(
        default=None, metadata={"help": "student key/value heads (default: the teacher's query heads per KV head)"}
    )
    intermediate_size: int | None = field(default=None, metadata={"help": "student MLP width (default: the teacher's)"})
    head_dim: int | None = field(default=None, metadata={"help": "student head width (default: the teacher's)"})
    pca: PCAMode = field(
        default="uncentered",
        metadata={
            "help": "GUIDE projection: SVD of the embeddings, PCA of centered ones, or a random orthonormal basis "
            "(ablation)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random initialization of what is not transferred"})
    out: str | None = field(default=None, metadata={"help": "output directory (required)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the directory to write the student to")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.seed < 0:
            raise LmdistillError(f"--seed must be non-negative, got {self.seed}")

    def student_sizes(self) -> dict[str, int | None]:
        """The shape flags, as keyword arguments of `derive_student_shape`."""
        names = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim")
        return {name: getattr(self, name) for name in names}


LossMix = Literal["ce", "kd", "ce+kd"]
Precision = Literal["auto", "bf16", "fp32"]
PRECISION_HELP = "forward passes in bf16 autocast or fp32; auto: bf16 where it is fast (GPU, AVX512-BF16/AMX CPU)"
KDLoss = Literal["forward-kl", "reverse-kl", "jsd", "skew-forward-kl", "skew-reverse-kl", "tvd"]


@dataclass
class TrainConfig:
    """`lmdistill train`: train a student with cross-entropy and/or distillation from an online or cached teacher."""

    student: str | None = field(default=None, metadata={"help": "student: a Hugging Face directory, e.g. from init"})
    out: str | None = field(default=None, metadata={"help": "run directory (required); the student lands in OUT/final"})
    teacher: str | None = field(
        default=None, metadata={"help": "online teacher: HF directory, .gguf file or 'default' (for kd losses)"}
    )
    teacher_cache: str | None = field(
        default=None, metadata={"help": "directory written by `lmdistill cache-teacher` (instead of --teacher)"}
    )
    data: list[str] | None = field(
        default=None, metadata={"help": "text files, directories or globs (default: the built-in offline corpus)"}
    )
    loss: LossMix = field(default="ce", metadata={"help": "ce, kd, or ce+kd mixed by --kd-weight"})
    kd_loss: KDLoss = field(default="forward-kl", metadata={"help": "divergence between teacher and student"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kd loss (scaled by T^2)"})
    kd_weight: float = field(default=0.5, metadata={"help": "ce+kd: loss = (1 - w) * ce + w * kd"})
    beta: float = field(default=0.5, metadata={"help": "jsd: mixture weight in [0, 1]"})
    alpha: float = field(default=0.1, metadata={"help": "skew kl: skew in [0, 1]"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr (cosine)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    chunk_size: int = field(
        default=256, metadata={"help": "positions per chunk of the loss: memory grows with chunk x vocabulary"}
    )
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out (--data only)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate on held-out data every N steps (0: at the end)"})
    eval_tokens: int = field(default=32768, metadata={"help": "held-out tokens per evaluation"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write metrics every N steps"})
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

    def __post_init__(self) -> None:
        check_types(self)
        if self.student is None or self.out is None:
            raise LmdistillError("--student and --out are required")
        if self.loss != "ce" and self.teacher is None and self.teacher_cache is None:
            raise LmdistillError(f"--loss {self.loss} needs a teacher: pass --teacher or --teacher-cache")
        if self.teacher is not None and self.teacher_cache is not None:
            raise LmdistillError("pass either --teacher or --teacher-cache, not both")
        for name in ("max_steps", "batch_size", "grad_accum", "chunk_size", "log_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise LmdistillError(f"--seq-len must be at least 2, got {self.seq_len}")
        for name in ("save_every", "eval_every", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise LmdistillError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        for name in ("kd_weight", "beta", "alpha", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LmdistillError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmdistillError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.temperature <= 0 or self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise LmdistillError("--temperature and --lr must be positive, --weight-decay and --grad-clip >= 0")
        if self.warmup_steps > self.max_steps:
            raise LmdistillError(f"--warmup-steps {self.warmup_steps} exceeds --max-steps {self.max_steps}")

    @property
    def kd_share(self) -> float:
        """Weight of the kd term in the loss: 0 for ce, 1 for kd, --kd-weight for ce+kd."""
        return {"ce": 0.0, "kd": 1.0, "ce+kd": self.kd_weight}[self.loss]


@dataclass
class CacheTeacherConfig:
    """`lmdistill cache-teacher`: store the teacher's top-k next-token distribution over the training blocks."""

    teacher: str = field(default="default", metadata={"help": "teacher: HF directory, .gguf file or 'default'"})
    out: str | None = field(default=None, metadata={"help": "cache directory (required)"})
    data: list[str] | None = field(
        default=None, metadata={"help": "text files, directories or globs (default: the built-in offline corpus)"}
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per block; must match the training run"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out (--data only)"})
    top_k: int = field(default=64, metadata={"help": "token ids kept per position"})
    samples: int | None = field(
        default=None,
        metadata={
            "help": "cache only the blocks that the first N training samples of a run with --seed read (N = max-steps"
            " x batch-size x grad-accum x processes); default: every training block"
        },
    )
    seed: int = field(default=0, metadata={"help": "with --samples: the --seed of the training run"})
    batch_size: int = field(default=8, metadata={"help": "blocks per teacher forward pass"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the build in a non-empty --out: same teacher weights, data, --seq-len, --top-k and "
            "blocks, else refused"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the teacher cache in a non-empty --out (refused if it holds other files)"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the directory to write the cache to")
        if self.resume and self.overwrite:
            raise LmdistillError("pass either --resume or --overwrite, not both")
        if self.seq_len < 2 or self.top_k < 1 or self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise LmdistillError("--seq-len must be at least 2, --top-k, --batch-size and --samples at least 1")
        if self.seed < 0:
            raise LmdistillError(f"--seed must be non-negative, got {self.seed}")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmdistillError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class EvalConfig:
    """`lmdistill eval`: held-out loss and perplexity; with --teacher and --baseline, the share of the gap closed."""

    model: str | None = field(default=None, metadata={"help": "the model to evaluate: a Hugging Face directory"})
    data: list[str] | None = field(
        default=None, metadata={"help": "text files, directories or globs (default: the built-in offline corpus)"}
    )
    teacher: str | None = field(default=None, metadata={"help": "teacher to compare with (HF dir, .gguf, default)"})
    baseline: str | None = field(default=None, metadata={"help": "baseline student (random init, same budget)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per block"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out (--data only)"})
    eval_tokens: int | None = field(default=None, metadata={"help": "evaluate at most this many tokens (default: all)"})
    batch_size: int = field(default=8, metadata={"help": "blocks per forward pass"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    out: str | None = field(default=None, metadata={"help": "where to write the results (default: MODEL/eval.json)"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.model is None:
            raise LmdistillError("--model is required: the Hugging Face directory to evaluate")
        if self.seq_len < 2 or self.batch_size < 1 or (self.eval_tokens is not None and self.eval_tokens < 1):
            raise LmdistillError("--seq-len must be at least 2, --batch-size and --eval-tokens at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmdistillError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class StudyArm:
    """One arm of a study: how the student starts and what it trains on."""

    init: InitMethod
    loss: LossMix
    pca: PCAMode = "uncentered"


# name -> arm; the first five are the main comparison, the rest ablations
STUDY_ARMS: dict[str, StudyArm] = {
    "random": StudyArm("random", "ce"),
    "weight-selection": StudyArm("weight-selection", "ce"),
    "guide": StudyArm("guide", "ce"),
    "kd": StudyArm("random", "kd"),
    "guide+kd": StudyArm("guide", "kd"),
    "guide-all": StudyArm("guide-all", "ce"),
    "guide-centered": StudyArm("guide", "ce", "centered"),
    "guide-random-projection": StudyArm("guide", "ce", "random"),
    "weight-selection+kd": StudyArm("weight-selection", "kd"),
}


@dataclass
class StudyConfig:
    """`lmdistill study`: train one student shape under several initializations and losses, evaluate, report.

    Every run of every arm sees the same training blocks in the same order (`data_seed`), the same token budget,
    optimizer and schedule; a seed changes only the student's random initialization. The defaults are the demo's.
    """

    out: str | None = field(default=None, metadata={"help": "study directory (required)"})
    teacher: str = field(default="default", metadata={"help": "teacher: HF directory, .gguf file or 'default'"})
    data: list[str] | None = field(
        default=None, metadata={"help": "text files, directories or globs (default: the built-in offline corpus)"}
    )
    arms: list[str] = field(
        default_factory=lambda: ["random", "weight-selection", "guide", "kd", "guide+kd"],
        metadata={"help": f"arms run with every seed in --seeds; known: {', '.join(STUDY_ARMS)}"},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "initialization seeds of --arms"})
    ablations: list[str] = field(default_factory=list, metadata={"help": "arms run with --ablation-seeds only"})
    ablation_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds of --ablations"})
    hidden_size: int = field(default=288, metadata={"help": "student width"})
    num_layers: int = field(default=6, metadata={"help": "student blocks"})
    num_heads: int = field(default=3, metadata={"help": "student query heads"})
    num_kv_heads: int = field(default=1, metadata={"help": "student key/value heads"})
    intermediate_size: int = field(default=768, metadata={"help": "student MLP width"})
    train_tokens: int = field(
        default=40960, metadata={"help": "training tokens per run (rounded up to whole optimizer steps)"}
    )
    batch_size: int = field(default=4, metadata={"help": "sequences per optimizer step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr (cosine)"})
    warmup_steps: int = field(default=4, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    kd_loss: KDLoss = field(default="forward-kl", metadata={"help": "divergence of the kd arms"})
    kd_weight: float = field(default=1.0, metadata={"help": "kd arms: loss = (1 - w) * ce + w * kd"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kd loss"})
    top_k: int = field(default=64, metadata={"help": "teacher cache: token ids kept per position"})
    data_seed: int = field(default=0, metadata={"help": "seed of the training data order, shared by every run"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out (--data only)"})
    eval_points: int = field(default=4, metadata={"help": "held-out evaluations per run (the loss curve)"})
    eval_tokens: int = field(default=8192, metadata={"help": "held-out tokens per evaluation, the same for all"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted study; finished runs are kept"})
    report_only: bool = field(
        default=False,
        metadata={"help": "write results, report and plots from the runs finished so far, without training"},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the directory to write the study to")
        for name in ("arms", "ablations"):
            unknown = [arm for arm in getattr(self, name) if arm not in STUDY_ARMS]
            if unknown:
                raise LmdistillError(f"--{name}: unknown arms {unknown}; known: {', '.join(STUDY_ARMS)}")
        if not self.arms and not self.ablations:
            raise LmdistillError("--arms and --ablations are both empty: nothing to run")
        overlap = sorted(set(self.arms) & set(self.ablations))
        if overlap or len(set(self.arms)) < len(self.arms) or len(set(self.ablations)) < len(self.ablations):
            raise LmdistillError(f"every arm may appear once in --arms and --ablations together; repeated: {overlap}")
        for name in ("seeds", "ablation_seeds"):
            seeds = getattr(self, name)
            if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
                raise LmdistillError(f"--{name.replace('_', '-')} must be distinct non-negative seeds, got {seeds}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "train_tokens",
                     "batch_size", "top_k", "eval_points", "eval_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eval_points > self.max_steps:
            raise LmdistillError(f"--eval-points {self.eval_points} exceeds the {self.max_steps} optimizer steps")
        # the remaining training options are checked by TrainConfig, built here once so errors come before any work
        self.train_config(STUDY_ARMS["kd"], student="student", out="out", teacher_cache="cache")

    @property
    def max_steps(self) -> int:
        """Optimizer steps per run: the token budget in whole steps."""
        return -(-self.train_tokens // (self.batch_size * max(self.seq_len, 1)))

    def runs(self) -> list[tuple[str, int]]:
        """Every (arm, seed) of the study, seed by seed (main arms, then ablations), so that an interrupted study
        already holds whole comparisons at its first seeds."""
        order = []
        for seed in dict.fromkeys(self.seeds + self.ablation_seeds):
            order += [(arm, seed) for arm in self.arms if seed in self.seeds]
            order += [(arm, seed) for arm in self.ablations if seed in self.ablation_seeds]
        return order

    def init_config(self, arm: StudyArm, seed: int, out: str) -> InitConfig:
        """The `lmdistill init` settings of an arm's student."""
        sizes = {
            k: getattr(self, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        }
        return InitConfig(teacher=self.teacher, method=arm.init, pca=arm.pca, seed=seed, out=out, **sizes)

    def train_config(
        self, arm: StudyArm, *, student: str, out: str, teacher_cache: str | None, resume: bool = False
    ) -> TrainConfig:
        """The `lmdistill train` settings of one run."""
        eval_every = max(1, self.max_steps // self.eval_points)
        kd = arm.loss != "ce"
        return TrainConfig(
            student=student,
            out=out,
            teacher_cache=teacher_cache if kd else None,
            data=self.data,
            loss=("kd" if self.kd_weight == 1 else "ce+kd") if kd else "ce",
            kd_loss=self.kd_loss,
            temperature=self.temperature,
            kd_weight=self.kd_weight,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            min_lr_ratio=self.min_lr_ratio,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            precision=self.precision,
            val_fraction=self.val_fraction,
            eval_every=eval_every,
            eval_tokens=self.eval_tokens,
            save_every=eval_every,
            log_every=eval_every,
            seed=self.data_seed,
            resume=resume,
            progress=self.progress,
        )


@dataclass
class DemoConfig:
    """`lmdistill demo`: the study on built-in defaults (configs/demo.yaml), sized for a 2-core CPU in 15 minutes."""

    out: str = field(default="runs/demo", metadata={"help": "study directory"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted demo; finished runs are kept"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check_types(self)

    def study_config(self) -> StudyConfig:
        """The demo's study: `StudyConfig`'s defaults with this output directory."""
        return StudyConfig(out=self.out, resume=self.resume, progress=self.progress)


RationaleTask = Literal["svamp", "cqa", "anli1", "esnli", "gsm-symbolic", "jsonl"]
AttributionMethod = Literal["saliency", "input-x-gradient", "integrated-gradients"]
IgBaseline = Literal["token", "zero"]
IG_BASELINE_HELP = (
    "where integrated-gradients starts the prompt tokens: token (the pad token's embedding, else EOS's) or zero "
    "(pre-norm teachers barely change along the path from 0 but jump right next to it, which the integration misses)"
)


@dataclass
class RationaleExtractConfig:
    """`lmdistill rationales extract`: the teacher answers each example; the top-k input words of the gradient
    attribution of its answer become the rationale, one JSON line per example (resumable)."""

    teacher: str = field(default="default", metadata={"help": "teacher: HF directory, .gguf file or 'default'"})
    task: RationaleTask = field(
        default="gsm-symbolic",
        metadata={"help": "svamp, cqa, anli1, esnli (shared data), gsm-symbolic (generated) or jsonl (--data FILE)"},
    )
    split: Literal["train", "test", "valid"] = field(
        default="train", metadata={"help": "split of the shared data or of gsm-symbolic (anli1, esnli: valid)"}
    )
    data: str | None = field(
        default=None, metadata={"help": "JSON-lines file in the task's format, instead of the shared data"}
    )
    out: str | None = field(default=None, metadata={"help": "output JSON-lines file (required); appended to"})
    k: int = field(default=5, metadata={"help": "rationale words per example"})
    method: AttributionMethod = field(default="saliency", metadata={"help": "attribution method"})
    reduction: Literal["l1", "l2"] = field(
        default="l1", metadata={"help": "norm of the attribution over the embedding dimension"}
    )
    order: Literal["score", "input"] = field(
        default="score", metadata={"help": "order of the rationale words: by score, or as in the input"}
    )
    stop_words: bool = field(default=True, metadata={"help": "leave English stop words out of rationales"})
    template: str | None = field(
        default=None,
        metadata={"help": "prompt template such as '{input}{choices}\\nAnswer:'; unset: the task's own (see README)"},
    )
    limit: int | None = field(default=None, metadata={"help": "process only the first N examples of the split"})
    batch_size: int = field(default=8, metadata={"help": "examples per batch"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy answer length limit (tasks without choices)"})
    choice_score: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "choices compete by total or per-token log-probability"}
    )
    ig_steps: int = field(default=20, metadata={"help": "integration steps of integrated-gradients"})
    ig_baseline: IgBaseline = field(default="token", metadata={"help": IG_BASELINE_HELP})
    size: int = field(default=1000, metadata={"help": "gsm-symbolic: examples generated per split"})
    seed: int = field(default=0, metadata={"help": "gsm-symbolic: seed of the train split (test: seed + 1,000,000)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the JSON-lines file to write the rationales to")
        for name in ("k", "batch_size", "max_new_tokens", "ig_steps"):
            if getattr(self, name) < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise LmdistillError(f"--limit must be at least 1, got {self.limit}")
        if not 1 <= self.size <= 1_000_000 or self.seed < 0:
            raise LmdistillError("--size must be in [1, 1000000] and --seed non-negative")
        check_template(self.prompt_template, self.task)
        if self.task == "jsonl" and self.data is None:
            raise LmdistillError(JSONL_NEEDS_DATA)
        if self.task == "gsm-symbolic" and self.data is not None:
            raise LmdistillError(GSM_TAKES_NO_DATA)

    @property
    def prompt_template(self) -> str:
        """--template, else the task's default template."""
        return self.template if self.template is not None else task_spec(self.task).template


RationaleSource = Literal["file", "llm", "gold", "none"]


@dataclass
class RationaleTraining:
    """The student and how it is trained: settings shared by `rationales train` and `rationales study`."""

    student: str | None = field(default=None, metadata={"help": "student: a Hugging Face directory, e.g. from init"})
    out: str | None = field(default=None, metadata={"help": "output directory (required)"})
    lambda_rationale: float = field(
        default=1.0, metadata={"help": "weight of the rationale loss (0: plain fine-tuning on labels)"}
    )
    max_len: int = field(default=256, metadata={"help": "tokens per sequence; longer prompts lose their start"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of the examples held out (at least one)"})
    size: int = field(default=1000, metadata={"help": "gsm-symbolic: examples generated per split"})
    data_seed: int = field(default=0, metadata={"help": "gsm-symbolic: seed of the generated train split"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per process (1-2 sequences each)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr (cosine)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    chunk_size: int = field(
        default=256, metadata={"help": "positions per chunk of the loss: memory grows with chunk x vocabulary"}
    )
    eval_every: int = field(default=0, metadata={"help": "held-out label loss every N steps (0: at the end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write metrics every N steps"})

    def check_training(self) -> None:
        """Range checks of the shared settings (the engine's own through a `TrainConfig`); call after the required
        fields are checked."""
        if self.lambda_rationale < 0:
            raise LmdistillError(f"--lambda-rationale must be non-negative, got {self.lambda_rationale}")
        if self.max_len < 2:
            raise LmdistillError(f"--max-len must be at least 2, got {self.max_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmdistillError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 1 <= self.size <= 1_000_000 or self.data_seed < 0:
            raise LmdistillError("--size must be in [1, 1000000] and --data-seed non-negative")
        self.engine_config()  # the engine's own checks of the shared settings (steps, batch, lr, ...)

    def training_settings(self) -> dict[str, Any]:
        """The fields of `RationaleTraining`, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RationaleTraining)}

    def engine_config(self, **run: Any) -> TrainConfig:
        """The training engine's settings (a `TrainConfig` validates them).

        Args:
            run: the engine's fields that are not shared settings (``seed``, ``resume``, ``fsdp``, ``progress``).
        """
        engine = {f.name for f in dataclasses.fields(TrainConfig)}
        shared = {name: value for name, value in self.training_settings().items() if name in engine}
        return TrainConfig(seq_len=self.max_len, **shared, **run)


@dataclass
class RationaleTrainConfig(RationaleTraining):
    """`lmdistill rationales train`: multitask training of a student: `predict:` prompt -> label, `explain:` prompt ->
    rationale; loss = L_label + lambda * L_rationale, each the mean cross-entropy over its own target tokens."""

    out: str | None = field(default=None, metadata={"help": "run directory (required); the student lands in OUT/final"})
    task: RationaleTask = field(
        default="gsm-symbolic",
        metadata={"help": "svamp, cqa, anli1, esnli (shared data), gsm-symbolic (generated) or jsonl (--data FILE)"},
    )
    split: Literal["train", "test", "valid"] = field(default="train", metadata={"help": "split to train on"})
    data: str | None = field(
        default=None, metadata={"help": "JSON-lines file in the task's format, instead of the shared data"}
    )
    limit: int | None = field(default=None, metadata={"help": "train on only the first N examples of the split"})
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
    template: str | None = field(
        default=None, metadata={"help": "prompt template; unset: the task's own (the one extract used by default)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the example order and anything random"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard the student (FSDP2) instead of DDP"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

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
        if self.limit is not None and self.limit < 1:
            raise LmdistillError(f"--limit must be at least 1, got {self.limit}")
        check_template(self.prompt_template, self.task)
        if self.task == "jsonl" and self.data is None:
            raise LmdistillError(JSONL_NEEDS_DATA)
        if self.task == "gsm-symbolic" and self.data is not None:
            raise LmdistillError(GSM_TAKES_NO_DATA)
        self.check_training()

    @property
    def prompt_template(self) -> str:
        """--template, else the task's default template."""
        return self.template if self.template is not None else task_spec(self.task).template

    def engine_config(self, **run: Any) -> TrainConfig:
        """The training engine's settings of this run (a `TrainConfig` validates them)."""
        own = {"seed": self.seed, "resume": self.resume, "fsdp": self.fsdp, "progress": self.progress}
        return super().engine_config(**{**own, **run})


@dataclass
class RationaleEvalConfig:
    """`lmdistill rationales eval`: accuracy of a model on a task from the `predict:` prompt alone (choice scoring for
    multiple-choice tasks, else greedy decoding; SVAMP equations are evaluated and compared as numbers)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "the model to evaluate: a Hugging Face directory, or a teacher ('default', a .gguf file; then "
            "--out is required)"
        },
    )
    task: RationaleTask = field(
        default="gsm-symbolic",
        metadata={"help": "svamp, cqa, anli1, esnli (shared data), gsm-symbolic (generated) or jsonl (--data FILE)"},
    )
    split: Literal["train", "test", "valid"] = field(default="test", metadata={"help": "split to evaluate"})
    data: str | None = field(
        default=None, metadata={"help": "JSON-lines file in the task's format, instead of the shared data"}
    )
    template: str | None = field(default=None, metadata={"help": "prompt template; unset: the task's own"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N examples"})
    batch_size: int = field(default=8, metadata={"help": "examples per batch"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy answer length limit (tasks without choices)"})
    choice_score: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "choices compete by total or per-token log-probability"}
    )
    size: int = field(default=1000, metadata={"help": "gsm-symbolic: examples generated per split"})
    seed: int = field(default=0, metadata={"help": "gsm-symbolic: seed of the train split (test: seed + 1,000,000)"})
    out: str | None = field(default=None, metadata={"help": "results JSON (default: MODEL/rationales_eval.json)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.model is None:
            raise LmdistillError("--model is required: the model directory to evaluate")
        if self.out is None and not Path(self.model).expanduser().is_dir():
            raise LmdistillError(
                f"--model {self.model} is not a model directory: to evaluate a teacher ('default', a .gguf file) give "
                "--out FILE, the JSON file to write the results to"
            )
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise LmdistillError(f"--limit must be at least 1, got {self.limit}")
        if not 1 <= self.size <= 1_000_000 or self.seed < 0:
            raise LmdistillError("--size must be in [1, 1000000] and --seed non-negative")
        check_template(self.prompt_template, self.task)
        if self.task == "jsonl" and self.data is None:
            raise LmdistillError(JSONL_NEEDS_DATA)
        if self.task == "gsm-symbolic" and self.data is not None:
            raise LmdistillError(GSM_TAKES_NO_DATA)

    @property
    def prompt_template(self) -> str:
        """--template, else the task's default template."""
        return self.template if self.template is not None else task_spec(self.task).template


RATIONALE_STUDY_TASKS = ("svamp", "cqa", "gsm-symbolic")
# arm -> (rationale source of its runs, the study tasks it applies to); the order is the report's
RATIONALE_STUDY_ARMS: dict[str, tuple[RationaleSource, tuple[str, ...]]] = {
    "finetune": ("none", RATIONALE_STUDY_TASKS),
    "saliency": ("file", RATIONALE_STUDY_TASKS),
    "step-by-step": ("llm", ("svamp", "cqa")),  # the 540B model's chain-of-thought rationales in the shared data
    "gold": ("gold", ("cqa", "gsm-symbolic")),  # the data's own: CQA's explanations, gsm-symbolic's solution steps
}
SALIENCY_ARM_PREFIX = "saliency-k"


@dataclass
class RationaleStudyConfig(RationaleTraining):
    """`lmdistill rationales study`: on each task the same student trained on labels alone (finetune), with the
    teacher's top-k saliency rationales (saliency-k<K> for every k), with the 540B model's chain-of-thought rationales
    (step-by-step: svamp, cqa) and with the data's own (gold: cqa, gsm-symbolic), every arm with every seed; all
    evaluated on the test split beside the teacher; results.json, report.md, accuracy_vs_k.png."""

    student: str | None = field(
        default=None, metadata={"help": "the student every run starts from: a Hugging Face directory (required)"}
    )
    out: str | None = field(default=None, metadata={"help": "study directory (required)"})
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
        default_factory=lambda: list(RATIONALE_STUDY_ARMS),
        metadata={
            "help": "finetune (labels only), saliency (one arm per --saliency-ks), step-by-step (svamp, cqa), gold "
            "(cqa, gsm-symbolic); an arm runs on the tasks it applies to"
        },
    )
    saliency_ks: list[int] = field(
        default_factory=lambda: [1, 3, 5, 7, 10], metadata={"help": "rationale words per example of the saliency arms"}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds (example order) of every arm"}
    )
    method: AttributionMethod = field(default="saliency", metadata={"help": "attribution method of the rationales"})
    reduction: Literal["l1", "l2"] = field(
        default="l1", metadata={"help": "norm of the attribution over the embedding dimension"}
    )
    ig_steps: int = field(default=20, metadata={"help": "integration steps of integrated-gradients"})
    ig_baseline: IgBaseline = field(default="token", metadata={"help": IG_BASELINE_HELP})
    stop_words: bool = field(default=True, metadata={"help": "leave English stop words out of rationales"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy answer length limit (tasks without choices)"})
    choice_score: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "choices compete by total or per-token log-probability"}
    )
    train_limit: int | None = field(
        default=None, metadata={"help": "extract rationales for and train on only the first N training examples"}
    )
    test_limit: int | None = field(default=None, metadata={"help": "evaluate on only the first N test examples"})
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep each finished run's checkpoints (else removed once it is evaluated; final/ stays)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue an interrupted study; finished runs are kept"})
    report_only: bool = field(
        default=False,
        metadata={"help": "write results, report and plot from the runs finished so far, without training"},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the directory to write the study to")
        if self.student is None:
            raise LmdistillError("--student is required: the Hugging Face directory every run starts from")
        for name, known in (("tasks", RATIONALE_STUDY_TASKS), ("arms", tuple(RATIONALE_STUDY_ARMS))):
            values = getattr(self, name)
            unknown = [v for v in values if v not in known]
            if unknown:
                raise LmdistillError(f"--{name}: unknown {name} {unknown}; known: {', '.join(known)}")
            if not values or len(set(values)) < len(values):
                raise LmdistillError(f"--{name} must name distinct {name}, at least one, got {values}")
        for arm in self.arms:
            applies = RATIONALE_STUDY_ARMS[arm][1]
            if not set(applies) & set(self.tasks):
                raise LmdistillError(
                    f"--arms {arm} applies to none of --tasks {' '.join(self.tasks)} (only to {', '.join(applies)})"
                )
        ks = self.saliency_ks
        if ("saliency" in self.arms and not ks) or (ks and min(ks) < 1) or len(set(ks)) < len(ks):
            raise LmdistillError(f"--saliency-ks must be distinct positive word counts, got {ks}")
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) < len(self.seeds):
            raise LmdistillError(f"--seeds must be distinct non-negative seeds, got {self.seeds}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
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
        """The arms run on ``task``: finetune, saliency-k<K> for every k (ascending), step-by-step, gold, as far as
        they are in --arms and apply to the task."""
        names: list[str] = []
        for arm, (_, tasks) in RATIONALE_STUDY_ARMS.items():
            if arm in self.arms and task in tasks:
                names += [f"{SALIENCY_ARM_PREFIX}{k}" for k in sorted(self.saliency_ks)] if arm == "saliency" else [arm]
        return names

    def runs(self) -> list[tuple[str, str, int]]:
        """Every (task, arm, seed) of the study, seed by seed, so that an interrupted study already holds whole
        comparisons at its first seeds."""
        return [(task, arm, seed) for seed in self.seeds for task in self.tasks for arm in self.arm_names(task)]

    @staticmethod
    def saliency_k(arm: str) -> int | None:
        """The k of a saliency arm (``saliency-k5`` -> 5); None for the other arms."""
        return int(arm.removeprefix(SALIENCY_ARM_PREFIX)) if arm.startswith(SALIENCY_ARM_PREFIX) else None

    @staticmethod
    def rationale_source(arm: str) -> RationaleSource:
        """The `rationales train --rationale-source` of an arm's runs."""
        return "file" if arm.startswith(SALIENCY_ARM_PREFIX) else RATIONALE_STUDY_ARMS[arm][0]

    def extract_config(self, task: str, *, out: str) -> RationaleExtractConfig:
        """The extraction of a task's saliency rationales: the training examples, at the largest k, in score order
        (so that the first k words of each record are its top-k rationale for every smaller k)."""
        return RationaleExtractConfig(
            teacher=self.teacher_of(task),
            task=task,
            split="train",
            out=out,
            k=max(self.saliency_ks),
            method=self.method,
            reduction=self.reduction,
            order="score",
            stop_words=self.stop_words,
            limit=self.train_limit,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            choice_score=self.choice_score,
            ig_steps=self.ig_steps,
            ig_baseline=self.ig_baseline,
            size=self.size,
            seed=self.data_seed,
            progress=self.progress,
        )

    def train_config(
        self, task: str, arm: str, seed: int, *, out: str, rationales: str | None = None, resume: bool = False
    ) -> RationaleTrainConfig:
        """The `rationales train` settings of one run (finetune: λ = 0; a saliency arm reads ``rationales``)."""
        source = self.rationale_source(arm)
        settings = {**self.training_settings(), "out": out}
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
        """The `rationales eval` settings of a model (a run's student or the teacher) on a task's test split."""
        return RationaleEvalConfig(
            model=model,
            task=task,
            split="test",
            limit=self.test_limit,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            choice_score=self.choice_score,
            size=self.size,
            seed=self.data_seed,
            out=out,
            progress=self.progress,
        )
