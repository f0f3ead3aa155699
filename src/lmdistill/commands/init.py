"""`lmdistill init`: load a teacher, build a student, measure it at step 0, save it as a Hugging Face directory.

Launch: `lmdistill init --teacher default --method guide --hidden-size 288 --num-layers 6 --num-heads 3
--num-kv-heads 1 --intermediate-size 768 --out runs/student-guide`
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from lmdistill.config import InitConfig, to_yaml
from lmdistill.data import builtin_sample_text
from lmdistill.data.packed import prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import heldout_loss, perplexity, token_blocks
from lmdistill.init.build import GUIDE_METHODS, build_student
from lmdistill.init.guide import token_distribution
from lmdistill.models.adapters import adapter_for
from lmdistill.models.load import load_teacher, teacher_config, teacher_source
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
        The init report: method, teacher, shapes, parameter counts, explained variance (and, given token counts, the
        energy every PCA mode keeps), seconds, step-0 losses.
    """
    out = Path(config.out)
    _check_out(out, config.teacher, overwrite=config.overwrite)
    # Every refusal of the shape comes before the teacher's weights load: its config alone decides them.
    teacher_settings = teacher_config(config.teacher)
    adapter = adapter_for(teacher_settings)
    teacher_shape = adapter.shape(teacher_settings)
    shape = derive_student_shape(teacher_shape, adapter, **config.student_sizes())
    adapter.student_config(teacher_settings, shape)

    log.info("loading teacher %s", config.teacher)
    teacher = load_teacher(config.teacher)

    frequencies, counted = _token_counts(config, teacher)
    log.info("initializing a %s student with %s", shape, config.method)
    start = time.perf_counter()
    result = build_student(
        teacher.model, shape, config.method, pca=config.pca, seed=config.seed, frequencies=frequencies
    )
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
        "explained_energy": result.energy,
        "token_counts": counted,
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


def _token_counts(config: InitConfig, teacher: Any) -> tuple[Tensor | None, dict[str, Any] | None]:
    """The tokens' shares in the training blocks of --data, and what was counted; (None, None) where init reads no
    data (not a guide method, or neither --pca frequency nor --data)."""
    if config.method not in GUIDE_METHODS or (config.pca != "frequency" and config.data is None):
        return None, None
    log.info("counting the tokens of the training data")
    data = prepare_data(config.data, teacher.tokenizer, config.seq_len, val_fraction=config.val_fraction)
    frequencies = token_distribution(data.train, teacher.model.get_input_embeddings().weight.shape[0])
    counted = {
        "data": data.fingerprint,
        "train_blocks": len(data.train),
        "tokens": int(data.train.size),
        "distinct_tokens": int((frequencies > 0).sum()),
    }
    return frequencies, counted


def _check_out(out: Path, teacher: str, *, overwrite: bool) -> None:
    """Refuse an output directory that init could not write, or whose replacement would destroy the teacher.

    Args:
        out: the --out directory.
        teacher: the --teacher spec.
        overwrite: whether an existing non-empty --out may be replaced.

    Raises:
        LmdistillError: --out is, lies inside or contains the teacher (symbolic links resolved); it is a file; it
            exists, is not empty, and `overwrite` is off; or it cannot be created or written.
    """
    source = teacher_source(teacher)
    if source.kind != "hub":
        target, model = out.resolve(), Path(source.location).resolve()
        overlaps = {"is": target == model, "is inside": model in target.parents, "contains": target in model.parents}
        for relation, overlap in overlaps.items():
            if overlap:
                raise LmdistillError(f"--out {out} {relation} the teacher {source.location}: choose --out outside it")
    if out.exists() and not out.is_dir():
        raise LmdistillError(f"--out {out} is a file, not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LmdistillError(
            f"output directory {out} exists and is not empty; choose another --out or pass --overwrite"
        )
    parent = out.absolute().parent  # the student is staged beside --out, so its parent must be writable
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LmdistillError(f"cannot create --out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LmdistillError(f"cannot write --out {out}: no permission to write in {parent}")


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
    if report["explained_energy"] is not None:
        kept = ", ".join(
            f"{mode} {e['table']:.3f} / {e['used_tokens']:.3f}" for mode, e in report["explained_energy"].items()
        )
        lines.append(f"  kept      of the table / of the used tokens' energy: {kept}")
    lines.append(f"  init      {report['init_seconds']:.2f} s")
    lines.append(f"  step-0 held-out loss ({report['step0']['text']}; judge methods after training, not here):")
    for name in ("student", "random", "teacher"):
        lines.append(f"    {name:8s}  {loss[name]:6.3f} nats/token  (perplexity {ppl[name]:,.1f})")
    lines.append(f"  report    {Path(out) / REPORT}")
    return "\n".join(lines)
