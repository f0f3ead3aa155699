"""`lmdistill init`: load a teacher, build a student, measure it at step 0, save it as a Hugging Face directory.

Launch: `lmdistill init --teacher default --method guide --hidden-size 288 --num-layers 6 --num-heads 3
--num-kv-heads 1 --intermediate-size 768 --out runs/student-guide`
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lmdistill.config import InitConfig, to_yaml
from lmdistill.data import builtin_sample_text
from lmdistill.errors import LmdistillError
from lmdistill.evaluate import heldout_loss, perplexity, token_blocks
from lmdistill.init.build import build_student
from lmdistill.models.adapters import adapter_for
from lmdistill.models.load import load_teacher
from lmdistill.models.shape import derive_student_shape
from lmdistill.provenance import environment
from lmdistill.storage import staged

log = logging.getLogger(__name__)

REPORT = "init_report.json"
CONFIG = "init_config.yaml"
SAMPLE_SEQ_LEN = 128


def run_init(config: InitConfig) -> dict[str, Any]:
    """Build, measure and save a student; return the report that is also written to `OUT/init_report.json`.

    Args:
        config: the resolved `InitConfig`.

    Returns:
        The init report: method, teacher, shapes, parameter counts, explained variance, seconds, step-0 losses.
    """
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise LmdistillError(
            f"output directory {out} exists and is not empty; choose another --out or pass --overwrite"
        )

    log.info("loading teacher %s", config.teacher)
    teacher = load_teacher(config.teacher)
    adapter = adapter_for(teacher.model.config)
    teacher_shape = adapter.shape(teacher.model.config)
    shape = derive_student_shape(teacher_shape, adapter, **config.student_sizes())

    log.info("initializing a %s student with %s", shape, config.method)
    start = time.perf_counter()
    result = build_student(teacher.model, shape, config.method, pca=config.pca, seed=config.seed)
    init_seconds = time.perf_counter() - start

    log.info("measuring step-0 held-out loss on the built-in sample")
    sample = token_blocks(teacher.tokenizer(builtin_sample_text())["input_ids"], SAMPLE_SEQ_LEN)
    step0 = {"student": heldout_loss(result.student, sample), "teacher": heldout_loss(teacher.model, sample)}
    if config.method == "random":
        step0["random"] = step0["student"]
    else:
        random = build_student(teacher.model, shape, "random", seed=config.seed).student
        step0["random"] = heldout_loss(random, sample)

    report = {
        "method": config.method,
        "teacher": {
            "name": teacher.name,
            "path": str(teacher.path),
            "model_type": teacher.model.config.model_type,
            "shape": vars(teacher_shape),
            "parameters": teacher.model.num_parameters(),
        },
        "student": {"shape": vars(shape), "parameters": result.student.num_parameters()},
        "pca": config.pca if result.projection is not None else None,
        "explained_variance": result.explained_variance,
        "init_seconds": init_seconds,
        "step0": {
            "text": f"built-in sample, {sample.numel()} tokens in blocks of {SAMPLE_SEQ_LEN}",
            "loss": step0,
            "perplexity": {name: perplexity(loss) for name, loss in step0.items()},
        },
        "seed": config.seed,
        "config": vars(config),
        "environment": environment(),
    }

    with staged(out) as staging:  # an interrupted init never leaves a half-written student behind
        result.student.save_pretrained(staging)
        teacher.tokenizer.save_pretrained(staging)
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (staging / CONFIG).write_text(to_yaml(config))
    return report


def format_report(report: dict[str, Any], out: str) -> str:
    """A few human-readable lines summarizing an init report."""
    s, t = report["student"], report["teacher"]
    shape = s["shape"]
    loss, ppl = report["step0"]["loss"], report["step0"]["perplexity"]
    lines = [
        f"student ({report['method']}) written to {out}",
        f"  teacher   {t['name']}: {t['model_type']}, {t['parameters'] / 1e6:.1f}M parameters",
        f"  student   hidden {shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']} heads "
        f"({shape['num_kv_heads']} KV) x {shape['head_dim']}, MLP {shape['intermediate_size']}: "
        f"{s['parameters'] / 1e6:.1f}M parameters",
    ]
    if report["explained_variance"] is not None:
        lines.append(f"  PCA       {report['pca']}, explained variance {report['explained_variance']:.3f}")
    lines.append(f"  init      {report['init_seconds']:.2f} s")
    lines.append(f"  step-0 held-out loss ({report['step0']['text']}; judge methods after training, not here):")
    for name in ("student", "random", "teacher"):
        lines.append(f"    {name:8s}  {loss[name]:6.3f} nats/token  (perplexity {ppl[name]:,.1f})")
    lines.append(f"  report    {Path(out) / REPORT}")
    return "\n".join(lines)
