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
        default="uncentered", metadata={"help": "GUIDE projection: SVD of the embeddings, or PCA of centered ones"}
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
    batch_size: int = field(default=8, metadata={"help": "blocks per teacher forward pass"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the directory to write the cache to")
        if self.seq_len < 2 or self.top_k < 1 or self.batch_size < 1:
            raise LmdistillError("--seq-len must be at least 2, --top-k and --batch-size at least 1")
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
    precision: Precision = field(default="fp32", metadata={"help": PRECISION_HELP})
    out: str | None = field(default=None, metadata={"help": "where to write the results (default: MODEL/eval.json)"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.model is None:
            raise LmdistillError("--model is required: the Hugging Face directory to evaluate")
        if self.seq_len < 2 or self.batch_size < 1 or (self.eval_tokens is not None and self.eval_tokens < 1):
            raise LmdistillError("--seq-len must be at least 2, --batch-size and --eval-tokens at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmdistillError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")


RationaleTask = Literal["svamp", "cqa", "anli1", "esnli", "gsm-symbolic", "jsonl"]
AttributionMethod = Literal["saliency", "input-x-gradient", "integrated-gradients"]


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
