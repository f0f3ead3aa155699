"""The configs of `lmdistill init`, `train`, `cache-teacher` and `eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmdistill.config.bases import (
    Autocast,
    Corpus,
    Distillation,
    DryRun,
    Engine,
    EngineRun,
    StudentRun,
    TeacherPrecision,
)
from lmdistill.config.schema import check_ranges, check_required, check_types, override
from lmdistill.errors import LmdistillError
from lmdistill.init.build import InitMethod
from lmdistill.init.guide import PCAMode

LossMix = Literal["ce", "kd", "ce+kd", "kd+hkd", "ce+kd+hkd"]
# the student shape flags of `init`, in the order of `derive_student_shape`'s keyword arguments
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim")


@dataclass
@override(
    help={
        "data": "guide methods: training text whose token counts weight --pca frequency and measure what every PCA "
        "mode keeps of the used tokens' energy (read when given, and by --pca frequency: default the built-in "
        "offline corpus)",
        "seq_len": "tokens per training block: train's, so the counts are those of its training blocks",
        "val_fraction": "share of documents held out (--data only); their tokens are not counted",
    }
)
class InitConfig(Corpus):
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
            "help": "GUIDE projection: SVD of the embeddings, PCA of centered ones, a random orthonormal basis "
            "(ablation), or SVD of the rows weighted by their tokens' frequency in the training data (--data)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random initialization of what is not transferred"})
    out: str | None = field(default=None, metadata={"help": "output directory (required)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "out", "the directory to write the student to")
        check_ranges(self, SHAPE_FIELDS, 1)
        check_ranges(self, ["seed"], 0)
        check_ranges(self, ["seq_len"], 2)
        check_ranges(self, ["val_fraction"], 0, 1, exclusive=True)

    def student_sizes(self) -> dict[str, int | None]:
        """The shape flags, as keyword arguments of `derive_student_shape`."""
        return {name: getattr(self, name) for name in SHAPE_FIELDS}


@dataclass
class TrainConfig(DryRun, EngineRun, Engine, TeacherPrecision, Distillation, Corpus, StudentRun):
    """`lmdistill train`: train a student with cross-entropy and/or distillation from an online or cached teacher."""

    teacher: str | None = field(
        default=None, metadata={"help": "online teacher: HF directory, .gguf file or 'default' (for kd losses)"}
    )
    teacher_cache: str | None = field(
        default=None, metadata={"help": "directory written by `lmdistill cache-teacher` (instead of --teacher)"}
    )
    loss: LossMix = field(
        default="ce",
        metadata={
            "help": "ce, kd, or ce+kd mixed by --kd-weight; +hkd adds the hidden-state loss with --hidden-weight "
            "(a GUIDE student; a cache from cache-teacher --hidden-student)"
        },
    )
    beta: float = field(default=0.5, metadata={"help": "jsd: mixture weight in [0, 1]"})
    alpha: float = field(default=0.1, metadata={"help": "skew kl: skew in [0, 1]"})
    eval_tokens: int = field(
        default=32768, metadata={"help": "held-out tokens per evaluation, in blocks spaced evenly over the split"}
    )

    def __post_init__(self) -> None:
        check_types(self)
        if self.student is None or self.out is None:
            raise LmdistillError("--student and --out are required")
        if self.loss != "ce" and self.teacher is None and self.teacher_cache is None:
            raise LmdistillError(f"--loss {self.loss} needs a teacher: pass --teacher or --teacher-cache")
        if self.teacher is not None and self.teacher_cache is not None:
            raise LmdistillError("pass either --teacher or --teacher-cache, not both")
        check_ranges(self, ["max_steps", "batch_size", "grad_accum", "chunk_size", "log_every", "eval_tokens"], 1)
        check_ranges(self, ["seq_len"], 2)
        check_ranges(self, ["save_every", "eval_every", "warmup_steps", "seed"], 0)
        check_ranges(self, ["kd_weight", "beta", "alpha", "min_lr_ratio"], 0, 1)
        check_ranges(self, ["val_fraction"], 0, 1, exclusive=True)
        if not 0 <= self.hidden_weight < float("inf"):
            raise LmdistillError(f"--hidden-weight must be a finite number >= 0, got {self.hidden_weight}")
        if self.temperature <= 0 or self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise LmdistillError("--temperature and --lr must be positive, --weight-decay and --grad-clip >= 0")
        if self.warmup_steps > self.max_steps:
            raise LmdistillError(f"--warmup-steps {self.warmup_steps} exceeds --max-steps {self.max_steps}")
        if self.teacher_cache is not None and self.kd_share > 0 and self.temperature != 1:
            raise LmdistillError(
                f"--temperature {self.temperature} with --teacher-cache: the cache keeps the top-k probabilities at "
                "temperature 1 and the other tokens' mass as one number, and re-tempering needs how that mass is "
                "spread (spreading it evenly overstates the teacher's tail); use --teacher (online) or --temperature 1"
            )

    @property
    def kd_share(self) -> float:
        """Weight of the kd term in the loss: 0 for ce, 1 for kd (and kd+hkd), --kd-weight for ce+kd (ce+kd+hkd)."""
        return {"ce": 0.0, "kd": 1.0, "ce+kd": self.kd_weight}[self.loss.removesuffix("+hkd")]

    @property
    def hidden_share(self) -> float:
        """Weight of the hkd term, added to the kd mix: --hidden-weight for the +hkd losses, else 0."""
        return self.hidden_weight if self.loss.endswith("+hkd") else 0.0

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads the teacher (a kd or hkd term of non-zero weight)."""
        return self.kd_share > 0 or self.hidden_share > 0


@dataclass
@override(help={"seq_len": "tokens per block; must match the training run"})
class CacheTeacherConfig(TeacherPrecision, Corpus):
    """`lmdistill cache-teacher`: store the teacher's top-k next-token distribution over the training blocks."""

    teacher: str = field(default="default", metadata={"help": "teacher: HF directory, .gguf file or 'default'"})
    out: str | None = field(default=None, metadata={"help": "cache directory (required)"})
    top_k: int = field(default=64, metadata={"help": "token ids kept per position"})
    samples: int | None = field(
        default=None,
        metadata={
            "help": "cache only the blocks that the first N training samples of a run with --seed read (N = max-steps"
            " x batch-size x grad-accum x processes); default: every training block"
        },
    )
    seed: int = field(default=0, metadata={"help": "with --samples: the --seed of the training run"})
    hidden_student: str | None = field(
        default=None,
        metadata={
            "help": "also store, for --loss kd+hkd, the teacher's hidden states times the GUIDE projection for this "
            "student (a directory of lmdistill init --method guide or guide-all --pca uncentered): its width and depth"
            " choose the projection and the layers"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "blocks per teacher forward pass"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the build in a non-empty --out: same teacher weights, data, --seq-len, --top-k, "
            "blocks and hidden states, else refused"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the teacher cache in a non-empty --out (refused if it holds other files)"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "out", "the directory to write the cache to")
        if self.resume and self.overwrite:
            raise LmdistillError("pass either --resume or --overwrite, not both")
        if self.seq_len < 2 or self.top_k < 1 or self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise LmdistillError("--seq-len must be at least 2, --top-k, --batch-size and --samples at least 1")
        check_ranges(self, ["seed"], 0)
        check_ranges(self, ["val_fraction"], 0, 1, exclusive=True)


@dataclass
@override(help={"seq_len": "tokens per block"})
class EvalConfig(TeacherPrecision, Autocast, Corpus):
    """`lmdistill eval`: held-out loss and perplexity; with --teacher and --baseline, the share of the gap closed."""

    model: str | None = field(default=None, metadata={"help": "the model to evaluate: a Hugging Face directory"})
    teacher: str | None = field(default=None, metadata={"help": "teacher to compare with (HF dir, .gguf, default)"})
    baseline: str | None = field(default=None, metadata={"help": "baseline student (random init, same budget)"})
    eval_tokens: int | None = field(
        default=None,
        metadata={"help": "evaluate at most this many tokens, in blocks spaced evenly over the split (default: all)"},
    )
    batch_size: int = field(default=8, metadata={"help": "blocks per forward pass"})
    out: str | None = field(default=None, metadata={"help": "where to write the results (default: MODEL/eval.json)"})

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "model", "the Hugging Face directory to evaluate")
        if self.seq_len < 2 or self.batch_size < 1 or (self.eval_tokens is not None and self.eval_tokens < 1):
            raise LmdistillError("--seq-len must be at least 2, --batch-size and --eval-tokens at least 1")
        check_ranges(self, ["val_fraction"], 0, 1, exclusive=True)
