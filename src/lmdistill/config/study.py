"""The configs of `lmdistill study` and `demo`, and the study's arms."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmdistill.config.bases import Autocast, Corpus, Distillation, DryRun, Optimizer, StudyRun
from lmdistill.config.distill import SHAPE_FIELDS, InitConfig, LossMix, TrainConfig
from lmdistill.config.schema import check_ranges, check_required, check_seeds, check_types, fields_of, override
from lmdistill.errors import LmdistillError
from lmdistill.init.build import InitMethod
from lmdistill.init.guide import PCAMode

STUDY_SHAPE = tuple(name for name in SHAPE_FIELDS if name != "head_dim")  # a study's students: the teacher's head_dim


def run_name(budget: int, arm: str, seed: int) -> str:
    """A study run's name, as `--only` takes it: ``TOKENS/ARM/SEED``."""
    return f"{budget}/{arm}/{seed}"


@dataclass(frozen=True)
class StudyArm:
    """One arm of a study: how the student starts, what it trains on, and how the report describes it."""

    init: InitMethod
    loss: LossMix
    description: str
    pca: PCAMode = "uncentered"
    extends: str | None = None  # the arm this one extends at equal training cost, compared with it seed by seed


# name -> arm; the first five are the main comparison, the rest ablations
STUDY_ARMS: dict[str, StudyArm] = {
    "random": StudyArm("random", "ce", "random init, cross-entropy"),
    "weight-selection": StudyArm("weight-selection", "ce", "weight selection (Xu et al.), cross-entropy"),
    "guide": StudyArm("guide", "ce", "GUIDE (PCA embeddings + block 1), cross-entropy"),
    "kd": StudyArm("random", "kd", "random init, distillation"),
    "guide+kd": StudyArm("guide", "kd", "GUIDE init, distillation"),
    "guide-all": StudyArm("guide-all", "ce", "GUIDE folded into every block, cross-entropy"),
    "guide-centered": StudyArm("guide", "ce", "GUIDE with centered PCA, cross-entropy", "centered"),
    "guide-random-projection": StudyArm(
        "guide", "ce", "GUIDE with a random orthonormal projection, cross-entropy", "random"
    ),
    "guide-freq": StudyArm(
        "guide", "ce", "GUIDE with PCA of the frequency-weighted embeddings, cross-entropy", "frequency", "guide"
    ),
    "weight-selection+kd": StudyArm("weight-selection", "kd", "weight selection, distillation"),
    "guide+hkd": StudyArm(
        "guide", "kd+hkd", "GUIDE init, distillation + hidden states through the projection", extends="guide+kd"
    ),
}


@dataclass
@override(
    lr=2e-3,
    warmup_steps=4,
    kd_weight=1.0,
    help={
        "kd_loss": "divergence of the kd arms",
        "kd_weight": "kd arms: loss = (1 - w) * ce + w * kd",
        "temperature": "softmax temperature of the kd loss",
        "hidden_weight": "hkd arms: weight h of the hidden-state loss, added to the kd mix: loss + h * hkd",
    },
)
class StudyConfig(DryRun, StudyRun, Autocast, Optimizer, Distillation, Corpus):
    """`lmdistill study`: train one student shape under several initializations and losses, evaluate, report.

    Every run of every arm sees the same training blocks in the same order (`data_seed`), the same token budget,
    optimizer and schedule; a seed changes only the student's random initialization. The defaults are the demo's.
    """

    out: str | None = field(default=None, metadata={"help": "study directory (required)"})
    teacher: str = field(default="default", metadata={"help": "teacher: HF directory, .gguf file or 'default'"})
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
    train_tokens: list[int] = field(
        default_factory=lambda: [40960],
        metadata={
            "help": "token budgets: every run at each, with the same schedule shape (rounded up to whole optimizer "
            "steps)"
        },
    )
    batch_size: int = field(default=4, metadata={"help": "sequences per optimizer step"})
    top_k: int = field(default=64, metadata={"help": "teacher cache: token ids kept per position"})
    data_seed: int = field(default=0, metadata={"help": "seed of the training data order, shared by every run"})
    eval_points: int = field(default=4, metadata={"help": "held-out evaluations per run (the loss curve)"})
    eval_tokens: int = field(
        default=8192, metadata={"help": "held-out tokens per evaluation of the loss curve, the same for all"}
    )
    final_eval_tokens: int = field(
        default=16384,
        metadata={
            "help": "held-out tokens of each run's final scoring on the training mixture: every source its share of "
            "the training tokens, from its own held-out documents"
        },
    )
    final_eval_sources: list[str] = field(
        default_factory=list,
        metadata={"help": "sources also scored on their own, each on at least --final-eval-tokens (or all it has)"},
    )
    only: list[str] = field(
        default_factory=list,
        metadata={
            "help": "train just these runs (TOKENS/ARM/SEED, e.g. 1212416/guide+kd/0) into --out and write no results: "
            "rebuilds a study's students"
        },
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_required(self, "out", "the directory to write the study to")
        for name in ("arms", "ablations"):
            unknown = [arm for arm in getattr(self, name) if arm not in STUDY_ARMS]
            if unknown:
                raise LmdistillError(f"--{name}: unknown arms {unknown}; known: {', '.join(STUDY_ARMS)}")
        if not self.arms and not self.ablations:
            raise LmdistillError("--arms and --ablations are both empty: nothing to run")
        overlap = sorted(set(self.arms) & set(self.ablations))
        if overlap or len(set(self.arms)) < len(self.arms) or len(set(self.ablations)) < len(self.ablations):
            raise LmdistillError(f"every arm may appear once in --arms and --ablations together; repeated: {overlap}")
        check_seeds(self, ["seeds", "ablation_seeds"])
        self.check_workers()
        check_ranges(self, [*STUDY_SHAPE, "batch_size", "top_k", "eval_points", "eval_tokens", "final_eval_tokens"], 1)
        if not self.train_tokens or min(self.train_tokens) < 1 or len(set(self.train_tokens)) < len(self.train_tokens):
            raise LmdistillError(f"--train-tokens takes distinct positive budgets, got {self.train_tokens}")
        steps = min(map(self.steps, self.train_tokens))
        if self.eval_points > steps:
            raise LmdistillError(f"--eval-points {self.eval_points} exceeds the {steps} optimizer steps")
        planned = {run_name(*run) for run in self.runs()}
        unknown = [name for name in self.only if name not in planned]
        if unknown:
            example = run_name(*self.runs()[0])
            raise LmdistillError(f"--only: {unknown[0]} is not a run of this study (TOKENS/ARM/SEED, e.g. {example})")
        # the remaining training options are checked by TrainConfig, built here once so errors come before any work
        self.train_config(STUDY_ARMS["kd"], max(self.train_tokens), student="student", out="out", teacher_cache="cache")

    @property
    def hidden_arms(self) -> bool:
        """Whether an arm of the study trains with the hidden-state loss (its teacher caches then hold the states)."""
        return any(STUDY_ARMS[arm].loss.endswith("+hkd") for arm in self.arms + self.ablations)

    def steps(self, budget: int) -> int:
        """Optimizer steps of a run of ``budget`` tokens: the budget in whole steps."""
        return -(-budget // (self.batch_size * max(self.seq_len, 1)))

    def runs(self) -> list[tuple[int, str, int]]:
        """Every (budget, arm, seed) of the study: budgets from the smallest, each seed by seed (main arms, then
        ablations), so that an interrupted study already holds whole comparisons at its first budgets and seeds."""
        order = []
        for budget in sorted(self.train_tokens):
            for seed in dict.fromkeys(self.seeds + self.ablation_seeds):
                order += [(budget, arm, seed) for arm in self.arms if seed in self.seeds]
                order += [(budget, arm, seed) for arm in self.ablations if seed in self.ablation_seeds]
        return order

    def init_config(self, arm: StudyArm, seed: int, out: str) -> InitConfig:
        """The `lmdistill init` settings of an arm's student; token counts come from the study's training data."""
        sizes = {name: getattr(self, name) for name in STUDY_SHAPE}
        data = fields_of(self, Corpus)
        return InitConfig(teacher=self.teacher, method=arm.init, pca=arm.pca, seed=seed, out=out, **sizes, **data)

    def train_config(
        self, arm: StudyArm, budget: int, *, student: str, out: str, teacher_cache: str | None, resume: bool = False
    ) -> TrainConfig:
        """The `lmdistill train` settings of one run: this study's data, distillation loss, optimizer and precision,
        its token budget in steps of --batch-size sequences, --eval-points evaluations (and checkpoints)."""
        max_steps = self.steps(budget)
        eval_every = max(1, max_steps // self.eval_points)
        kd = arm.loss != "ce"
        mix = ("kd" if self.kd_weight == 1 else "ce+kd") + ("+hkd" if arm.loss.endswith("+hkd") else "")
        return TrainConfig(
            **fields_of(self, Corpus, Distillation, Optimizer, Autocast),
            student=student,
            out=out,
            teacher_cache=teacher_cache if kd else None,
            loss=mix if kd else "ce",
            max_steps=max_steps,
            batch_size=self.batch_size,
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
