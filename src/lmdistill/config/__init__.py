"""Typed configs: the only schema. A YAML file is a serialized instance; the CLI builds flags from the fields.

Each field's `help` becomes its `--help` text. `__post_init__` checks types and ranges, so a YAML file gets the same
validation as the command line. Where each config lives:

- `schema`: type and range checks, per-command defaults of shared fields (`override`), YAML reading and writing;
- `bases`: the field groups the command configs inherit (student run, study run, corpus, precision, distillation,
  optimizer, training engine and its launch; a rationale task, gsm-symbolic generation, answers, attribution);
- `distill`: `InitConfig`, `TrainConfig`, `CacheTeacherConfig`, `EvalConfig`;
- `study`: `StudyConfig`, `DemoConfig` and the study's arms (`STUDY_ARMS`);
- `rationales`: `RationaleExtractConfig`, `RationaleTrainConfig`, `RationaleEvalConfig`, `RationaleStudyConfig` and
  the rationale study's arms (`RATIONALE_STUDY_ARMS`).
"""

from lmdistill.config.bases import (
    Answer,
    Answering,
    Attribution,
    AttributionMethod,
    Autocast,
    Corpus,
    Distillation,
    Engine,
    EngineRun,
    Generation,
    IgBaseline,
    Optimizer,
    Precision,
    RationaleTask,
    StudentRun,
    StudyRun,
    Task,
)
from lmdistill.config.distill import SHAPE_FIELDS, CacheTeacherConfig, EvalConfig, InitConfig, LossMix, TrainConfig
from lmdistill.config.rationales import (
    RATIONALE_STUDY_ARMS,
    RATIONALE_STUDY_TASKS,
    SALIENCY_ARM_PREFIX,
    RationaleArm,
    RationaleEvalConfig,
    RationaleExtractConfig,
    RationaleSource,
    RationaleStudyConfig,
    RationaleTrainConfig,
    RationaleTraining,
)
from lmdistill.config.schema import (
    check_ranges,
    check_seeds,
    check_types,
    fields_of,
    flag,
    load_yaml,
    override,
    to_yaml,
)
from lmdistill.config.study import STUDY_ARMS, DemoConfig, StudyArm, StudyConfig, run_name

__all__ = [
    "RATIONALE_STUDY_ARMS",
    "RATIONALE_STUDY_TASKS",
    "SALIENCY_ARM_PREFIX",
    "SHAPE_FIELDS",
    "STUDY_ARMS",
    "Answer",
    "Answering",
    "Attribution",
    "AttributionMethod",
    "Autocast",
    "CacheTeacherConfig",
    "Corpus",
    "DemoConfig",
    "Distillation",
    "Engine",
    "EngineRun",
    "EvalConfig",
    "Generation",
    "IgBaseline",
    "InitConfig",
    "LossMix",
    "Optimizer",
    "Precision",
    "RationaleArm",
    "RationaleEvalConfig",
    "RationaleExtractConfig",
    "RationaleSource",
    "RationaleStudyConfig",
    "RationaleTask",
    "RationaleTrainConfig",
    "RationaleTraining",
    "StudentRun",
    "StudyRun",
    "StudyArm",
    "StudyConfig",
    "Task",
    "TrainConfig",
    "check_ranges",
    "check_seeds",
    "check_types",
    "fields_of",
    "flag",
    "load_yaml",
    "override",
    "run_name",
    "to_yaml",
]
