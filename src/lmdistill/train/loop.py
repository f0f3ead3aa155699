"""`lmdistill train`: language-model and knowledge-distillation training of a student.

One optimizer step is `train_step`. For each micro-batch, inside autocast: the data source's ids and labels
(`TrainData.batch`); the teacher under `torch.no_grad()` (`TrainData.teacher_targets`): with `--teacher` the
teacher's forward pass happens there, `PackedTrainData.teacher_targets` running it on the micro-batch to its final
hidden states, with `--teacher-cache` the cached top-k distribution of the blocks is looked up, and for CE only
there is nothing; then the student's forward pass and the loss, one call of the loss module (`LMLoss`: the
student's final hidden states and output head go through `chunked_distill_loss` together with the teacher's; with
the `+hkd` losses also the residual stream of its blocks through `hidden_loss`, `lmdistill.hidden`), and the backward
pass. Then the sums are reduced over processes, checked, and the gradients clipped and applied. Every
loss is normalized by the global count of predicted tokens of the optimizer step (`TrainData.step_options`), so
gradient accumulation and the number of processes do not change the update. The loss is part of the forward of the
module that DDP wraps or FSDP shards, so one code path serves one process, DDP and FSDP.

`_train` drives a run: the checks of --out and --resume (`_resume_point`), the setup (`_setup`: student, data,
wrapping, optimizer, schedule), resume or seed (`_restore`), `train_step` per step, then evaluation, metrics and
checkpoints (`_after_step`, `_save`), and the trained student in OUT/final (`_save_final`).

What the loop trains on is a `TrainData`: the packed text blocks of `--data` (`PackedTrainData`, the default) or any
other source that gives padded, label-masked batches and its own loss module, such as the label + rationale
multitask data of `lmdistill rationales train` (`lmdistill.train.rationale_data`). Optimizer, schedule, clipping,
checkpoints, resume, progress bar and metrics are the same for every source.

Launch: `lmdistill train --student runs/student-guide --teacher default --loss ce+kd --max-steps 200
--batch-size 8 --seq-len 256 --out runs/train-guide` (multi-process: `torchrun --nproc-per-node 2 -m lmdistill.cli
train ... [--fsdp]`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill import distributed
from lmdistill.config import TrainConfig, to_yaml
from lmdistill.data.order import DataOrder
from lmdistill.data.packed import check_same_vocabulary, prepare_data
from lmdistill.errors import LmdistillError
from lmdistill.evaluation import heldout_loss, perplexity, spread_blocks
from lmdistill.hidden import check_student, decoder_layers, layer_pairs, projection, teacher_states
from lmdistill.models.adapters import ADAPTERS
from lmdistill.models.load import load_hf_directory, load_teacher
from lmdistill.models.teacher_dtype import head_weight, to_teacher_dtype
from lmdistill.objective import LMLoss, shifted_labels
from lmdistill.precision import autocast, resolve_precision
from lmdistill.provenance import environment
from lmdistill.storage import remove_staging_leftovers, staged
from lmdistill.teacher_cache import TeacherCache
from lmdistill.train import checkpoint

log = logging.getLogger(__name__)

# The settings that may differ on --resume (README, `lmdistill train`, "Crashes"): how the run is shown and where it
# is written, its checkpoint, evaluation and log intervals, --max-steps (not below the checkpoint's step), and how
# each step's examples are split into micro-batches and processes (`check_resume` keeps their number).
MAY_CHANGE_ON_RESUME = ("resume", "progress", "out", "save_every", "eval_every", "log_every", "max_steps",
                        "batch_size", "grad_accum", "fsdp")  # fmt: skip


def check_positions(model: PreTrainedModel, length: int, flag: str, role: str = "student") -> None:
    """Refuse sequences of `length` tokens (`flag`) longer than a model with learned absolute positions (GPT-2) has
    positions for; rotary positions have no such limit."""
    adapter = next((a for a in ADAPTERS if model.config.model_type in a.model_types), None)
    limit = model.config.max_position_embeddings
    if adapter is not None and not adapter.rotary and length > limit:
        raise LmdistillError(
            f"{flag} {length} exceeds the {limit} learned positions of the {role} (n_positions {limit} in its config): "
            f"pass {flag} {limit} or less"
        )


def check_resume(
    settings: Any, previous: dict[str, Any], state: dict[str, Any], config: TrainConfig, world: int, path: Path
) -> None:
    """Refuse to resume the checkpoint at `path` as another run than its own.

    Args:
        settings: this launch's settings (the dataclass written to ``config.yaml``).
        previous: the checkpoint's settings (its ``meta.json``); a field it lacks had its default.
        state: the checkpoint's training state (its step and the samples it has seen).
        config: this launch's engine settings.
        world: this launch's number of processes.
        path: the checkpoint.

    Raises:
        LmdistillError: a setting outside `MAY_CHANGE_ON_RESUME` differs, --max-steps is below the checkpoint's step,
            or a step would take another number of examples (batch size x grad accum x processes).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    changed = [
        f"--{name.replace('_', '-')} {previous.get(name, defaults[name])!r} (now {value!r})"
        for name, value in vars(settings).items()
        if name not in MAY_CHANGE_ON_RESUME and previous.get(name, defaults[name]) != value
    ]
    if changed:
        raise LmdistillError(
            f"--resume: the checkpoint {path} was trained with {', '.join(changed)}; resuming with other settings "
            "would not continue its run. Restore them, or choose another --out"
        )
    if config.max_steps < state["step"]:
        raise LmdistillError(
            f"--resume: --max-steps {config.max_steps} is below the step of the checkpoint {path} ({state['step']}): "
            f"pass at least {state['step']}"
        )
    then, now = state["samples_seen"] // state["step"], config.batch_size * config.grad_accum * world
    if now != then:
        raise LmdistillError(
            f"--resume: the steps of the checkpoint {path} took {then} examples each, this launch's would take {now} "
            f"(--batch-size {config.batch_size} x --grad-accum {config.grad_accum} x {world} process(es)): keep "
            f"that product at {then}"
        )


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


class MetricsLog:
    """`metrics.jsonl` (one object per logged step), plus TensorBoard when it is installed."""

    def __init__(self, out: Path, keep_until_step: int) -> None:
        self.path = out / "metrics.jsonl"
        # On resume, drop records past the checkpoint so the file tells one consistent history.
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= keep_until_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(out / "tensorboard")
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])


class TrainData(Protocol):
    """A training data source of `run_train`.

    The loop reads examples by index (`DataOrder` over ``len(data)``). For each optimizer step it asks for the step's
    loss options once (`step_options`), from the indices of all its micro-batches on all processes, so that
    normalizers are global counts, which keeps gradient accumulation and the number of processes out of the update.
    Then, for each micro-batch, inside autocast (see `train_step`): ``ids, labels, inputs = batch(indices)``,
    ``teacher = teacher_targets(ids, indices)`` under `torch.no_grad()`, and the loss module's
    ``module(ids, labels, **inputs, **teacher, **options)``, whose first output is back-propagated.

    Attributes:
        terms: the names of the loss parts the module returns after the total, logged per step.
        manifest: what the data is, written to ``OUT/data_manifest.json``.
        teacher_dtype: the dtype an online teacher runs in and why, recorded in ``OUT/environment.json``; None
            without one.
    """

    terms: tuple[str, ...]
    manifest: dict[str, Any]
    teacher_dtype: tuple[str, str] | None  # the online teacher's dtype and why (`to_teacher_dtype`); None: none

    def __len__(self) -> int:
        """Number of training examples (blocks, or labelled examples)."""
        ...

    def loss_module(self, student: PreTrainedModel) -> nn.Module:
        """The module DDP wraps or FSDP shards: forward(ids, labels, ...) -> (total, *parts), parts named `terms`."""
        ...

    def step_options(self, indices: np.ndarray) -> dict[str, Any]:
        """Keyword options of the loss module for one optimizer step whose examples (all micro-batches, all
        processes) are ``indices``: its normalizers (``num_items``) and loss settings."""
        ...

    def batch(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """ids ``[B, L]``, labels ``[B, L]`` (aligned: position t predicts labels[t]; -100 where nothing is
        predicted, padding included) and further keyword tensors of the loss module for the student's side."""
        ...

    def teacher_targets(self, ids: torch.Tensor, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The teacher's side of the loss for the micro-batch `ids` ``[B, L]`` of the examples `indices`: keyword
        tensors of the loss module, ``{}`` without a teacher; called under `torch.no_grad()` and autocast."""
        ...

    def tokens(self, indices: np.ndarray) -> int:
        """Tokens the examples ``indices`` put through the student (for the tokens and tokens/s metrics)."""
        ...

    def evaluate(self, module: nn.Module, processes: distributed.Processes) -> float:
        """Held-out loss in nats per predicted token (every process gets the same number)."""
        ...


class PackedTrainData:
    """Packed text blocks of ``--data`` for language modelling and KD from an online or cached teacher, with the
    hidden-state loss of `lmdistill.hidden` (term ``hkd``) for the ``+hkd`` losses."""

    terms: tuple[str, ...] = ("ce", "kd")

    def __init__(
        self,
        config: TrainConfig,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        processes: distributed.Processes,
    ) -> None:
        self.config, self.teacher, self.cache, self.teacher_dtype = config, None, None, None
        self.hidden: tuple[tuple[int, ...], tuple[int, ...], torch.Tensor | None] | None = None  # blocks, teacher's, M
        check_positions(student, config.seq_len, "--seq-len")
        if config.teacher is not None and config.needs_teacher:
            loaded = load_teacher(config.teacher)
            check_positions(loaded.model, config.seq_len, "--seq-len", "teacher")
            check_same_vocabulary(student, tokenizer, loaded.model, loaded.tokenizer)
            self.teacher = loaded.model
            if config.hidden_share > 0:  # M from the teacher's float embeddings, as `init` computes it
                self._online_hidden(student, loaded.name)
            self.teacher_dtype = to_teacher_dtype(loaded.model, config.teacher_dtype, processes.device)
            self.teacher_head = head_weight(loaded.model)  # int8: dequantized once
        # The main process prepares (or finds) the packed data first; the others then read its cache.
        if processes.world > 1 and not processes.main:
            torch.distributed.barrier()
        self.data = prepare_data(
            config.data,
            tokenizer,
            config.seq_len,
            val_fraction=config.val_fraction,
            progress=config.progress and processes.main,
        )
        if processes.world > 1 and processes.main:
            torch.distributed.barrier()
        self.manifest = self.data.manifest
        if config.teacher_cache is not None and config.needs_teacher:
            self._open_cache(student, processes)
        if self.hidden is not None:
            self.terms = ("ce", "kd", "hkd")
        self.val_blocks = spread_blocks(self.data.val, config.eval_tokens)

    def _online_hidden(self, student: PreTrainedModel, teacher_name: str) -> None:
        """The hidden-state targets from the online teacher: its projection M and the layers of `layer_pairs`."""
        pairs = layer_pairs(student.config.num_hidden_layers, len(decoder_layers(self.teacher)))
        shape = {"width": student.config.hidden_size, "student_num_layers": student.config.num_hidden_layers}
        check_student(student.config, Path(self.config.student), shape, teacher_name, f"--teacher {teacher_name}")
        m = projection(self.teacher, student.config.hidden_size).to(next(self.teacher.parameters()).device)
        self.hidden = (tuple(b for b, _ in pairs), tuple(t for _, t in pairs), m)

    def _open_cache(self, student: PreTrainedModel, processes: distributed.Processes) -> None:
        """Open --teacher-cache; refuse it when it lacks a block the run reads, or the hidden states it needs."""
        config = self.config
        vocab = student.get_output_embeddings().weight.shape[0]
        self.cache = TeacherCache.open(Path(config.teacher_cache), self.data, vocab)
        total_samples = config.max_steps * config.batch_size * config.grad_accum * processes.world
        missing = self.cache.missing(DataOrder(len(self), config.seed).blocks(0, total_samples))
        if len(missing):
            raise LmdistillError(
                f"teacher cache {config.teacher_cache} lacks {len(missing)} of the training blocks this run reads; "
                f"rebuild it with cache-teacher --samples {total_samples} --seed {config.seed} (or without "
                "--samples)"
            )
        if config.hidden_share == 0:
            return
        record = self.cache.manifest.get("hidden")
        if record is None:
            raise LmdistillError(
                f"--loss {config.loss}: teacher cache {config.teacher_cache} holds no hidden states; build one with "
                "cache-teacher --hidden-student STUDENT"
            )
        source = f"teacher cache {config.teacher_cache}"
        check_student(student.config, Path(config.student), record, self.cache.manifest["teacher"], source)
        pairs = record["layers"]
        self.hidden = (tuple(p["student"] for p in pairs), tuple(p["teacher"] for p in pairs), None)

    def __len__(self) -> int:
        return len(self.data.train)

    def loss_module(self, student: PreTrainedModel) -> nn.Module:
        return LMLoss(student)

    def step_options(self, indices: np.ndarray) -> dict[str, Any]:
        config = self.config
        options = {
            "kd_weight": config.kd_share,
            "kind": config.kd_loss,
            "temperature": config.temperature,
            "beta": config.beta,
            "alpha": config.alpha,
            "num_items": len(indices) * (config.seq_len - 1),  # every position but the last of a block predicts
            "chunk_size": config.chunk_size,
        }
        if self.hidden is not None:
            options.update(hidden_weight=config.hidden_share, hidden_blocks=self.hidden[0])
        return options

    def batch(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        ids = torch.as_tensor(self.data.train[indices].astype(np.int64), device=device)  # [B, L]
        return ids, shifted_labels(ids), {}

    def teacher_targets(self, ids: torch.Tensor, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The online teacher's forward pass on `ids`: its final hidden states ``[B, L, d_T]`` and output head
        ``[V, d_T]``; or the cached top-k ids and log-probabilities ``[B, L, K]`` of the blocks `indices`; ``{}``
        for CE only. With the hidden-state loss also ``teacher_states`` ``[B, L, H, d_S]``, computed (online) or
        cached (float16)."""
        if self.teacher is not None:
            with torch.autocast(ids.device.type, enabled=False):  # the teacher computes in its own dtype
                if self.hidden is None:
                    return {
                        "teacher_hidden": self.teacher.base_model(input_ids=ids).last_hidden_state,
                        "teacher_head": self.teacher_head,
                    }
                output, states = teacher_states(self.teacher.base_model, ids, self.hidden[1], self.hidden[2])
            return {
                "teacher_hidden": output.last_hidden_state,
                "teacher_head": self.teacher_head,
                "teacher_states": states,
            }
        if self.cache is not None:
            top_ids, top_logprobs = self.cache.lookup(indices)  # [B, L, K] each
            targets = {"teacher_ids": top_ids.to(ids.device), "teacher_logprobs": top_logprobs.to(ids.device)}
            if self.hidden is not None:
                targets["teacher_states"] = self.cache.states(indices).to(ids.device)
            return targets
        return {}

    def tokens(self, indices: np.ndarray) -> int:
        return len(indices) * self.config.seq_len

    def evaluate(self, module: nn.Module, processes: distributed.Processes) -> float:
        return heldout_loss(
            module,
            self.val_blocks,
            batch_size=self.config.batch_size,
            precision=self.config.precision,
            chunk_size=self.config.chunk_size,
            processes=processes,
        )


DataFactory = Callable[[PreTrainedModel, PreTrainedTokenizerBase, distributed.Processes], TrainData]


def run_train(
    config: TrainConfig,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    *,
    data: DataFactory | None = None,
    settings: Any = None,
) -> dict[str, Any]:
    """Train a student as `config` says; write checkpoints, metrics and `OUT/final`.

    Args:
        config: the resolved `TrainConfig` (optimizer, schedule, batch, checkpoint and logging settings).
        on_step: called with each optimizer step's metrics record (e.g. to drive an outer progress bar).
        data: builds the training data from the loaded student, its tokenizer and the processes; default: the
            packed text of ``config.data`` (`PackedTrainData`).
        settings: the config written to ``OUT/config.yaml`` and compared on resume (default: ``config``), for
            commands that drive the engine from a config of their own.

    Returns:
        A summary: steps, tokens, seconds, tokens/s, final held-out loss and perplexity, output paths.
    """
    processes = distributed.start()
    if config.fsdp and processes.world == 1:
        raise LmdistillError("--fsdp shards the student over processes: launch with torchrun --nproc-per-node N")
    try:
        return _train(config, processes, on_step, data or (lambda s, t, p: PackedTrainData(config, s, t, p)), settings)
    finally:
        distributed.stop()


@dataclasses.dataclass
class Run:
    """What a training run works with, from its setup (`_setup`) to its final save."""

    config: TrainConfig
    settings: Any  # written to OUT/config.yaml and compared on resume
    processes: distributed.Processes
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: TrainData
    order: DataOrder
    loss_module: nn.Module  # data.loss_module(student)
    model: nn.Module  # the loss module as DDP or FSDP run it (itself in one process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step: batch size x grad accum x processes."""
        return self.config.batch_size * self.config.grad_accum * self.processes.world

    def examples(self, step: int, micro: int | None = None) -> np.ndarray:
        """Indices of the examples of optimizer step `step` (from 0): all of them (all micro-batches, all
        processes), or those of this process's micro-batch `micro`."""
        first, size = step * self.global_batch, self.config.batch_size
        if micro is None:
            return self.order.blocks(first, self.global_batch)
        return self.order.blocks(first + (micro * self.processes.world + self.processes.rank) * size, size)


def train_step(run: Run, step: int) -> tuple[torch.Tensor, float]:
    """Optimizer step `step` (from 0): forward and backward passes of its micro-batches, then the update.

    Returns:
        The step's losses summed over processes (float64 ``[1 + terms]``: the total, then each of `TrainData.terms`)
        and the gradient norm before clipping.

    Raises:
        LmdistillError: the loss or the gradient norm is not finite; the model is left as it was.
    """
    config, data, model, device = run.config, run.data, run.model, run.processes.device
    # The normalizers (num_items): the counts of predicted tokens of all the step's examples (all micro-batches, all
    # processes), so that each micro-batch's loss is its share of the step's.
    options = data.step_options(run.examples(step))
    sums = torch.zeros(1 + len(data.terms), dtype=torch.float64, device=device)  # total, then terms
    for micro in range(config.grad_accum):
        indices = run.examples(step, micro)
        with autocast(device, config.precision):
            ids, labels, inputs = data.batch(indices, device)  # [B, L] each; inputs: e.g. each row's term
            with torch.no_grad():  # the teacher: its forward pass (online) or its cached top-k; {} for CE only
                teacher = data.teacher_targets(ids, indices)
            with distributed.gradient_sync(model, micro == config.grad_accum - 1):
                # The student's forward pass and its loss, in the module DDP wraps or FSDP shards.
                total, *parts = model(ids, labels, **inputs, **teacher, **options)
                # DDP and FSDP average gradients over processes; the loss is already a share of the global sum.
                (total * run.processes.world).backward()
        sums += torch.stack([total.detach(), *(p.detach() for p in parts)]).double()
    distributed.all_reduce_sum(sums)
    if not torch.isfinite(sums).all():
        raise _stopped(run, f"the loss became {sums[0].item()} at step {step + 1}")
    # The norm of the whole job's gradients: every process stops at the same step.
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), config.grad_clip or float("inf")).item()
    if not math.isfinite(grad_norm):
        raise _stopped(run, f"the gradient norm became {grad_norm} at step {step + 1}")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def _train(
    config: TrainConfig,
    processes: distributed.Processes,
    on_step: Callable[[dict[str, Any]], None] | None,
    make_data: DataFactory,
    settings: Any,
) -> dict[str, Any]:
    """The run of `run_train`: from its start or its checkpoint, `train_step` by step, to OUT/final."""
    settings = config if settings is None else settings
    resumed = _resume_point(config, settings, processes)
    run = _setup(config, settings, processes, make_data, resumed)
    start_step, record = _restore(run, resumed)
    if processes.main:
        _write_run_files(run)
    metrics = MetricsLog(run.out, start_step) if processes.main else None
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not (processes.main and config.progress),
    )
    started, tokens_this_run, tokens_total = time.perf_counter(), 0, record.get("tokens", 0)
    for step in range(start_step, config.max_steps):
        sums, grad_norm = train_step(run, step)
        step_tokens = run.data.tokens(run.examples(step))
        tokens_this_run += step_tokens
        tokens_total += step_tokens
        record = {"step": step + 1, "loss": sums[0].item()}
        record.update({name: value.item() for name, value in zip(run.data.terms, sums[1:])})
        record.update(
            {
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": tokens_total,
                "tokens_per_s": tokens_this_run / (time.perf_counter() - started),
            }
        )
        _after_step(run, record, metrics, bar, on_step)
    bar.close()
    return _save_final(run, record, time.perf_counter() - started)


class Resumed(NamedTuple):
    """The checkpoint a launch resumes from: its directory, training state and ``meta.json``."""

    path: Path
    state: dict[str, Any]
    meta: dict[str, Any]


def _resume_point(config: TrainConfig, settings: Any, processes: distributed.Processes) -> Resumed | None:
    """Check --out, and with --resume find its latest checkpoint and refuse it unless this launch continues its run.

    Returns:
        The checkpoint to resume from, or None: a new run.
    """
    out = Path(config.out)
    root = out / "checkpoints"
    final = (out / "final").resolve()
    student_dir = Path(config.student).resolve()
    if student_dir == final or final in student_dir.parents:
        raise LmdistillError(
            f"--out {out} would write its trained student over --student {config.student} (OUT/final): choose another "
            "--out"
        )
    if not config.resume and root.exists() and any(root.iterdir()):
        raise LmdistillError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    if config.resume and processes.main:
        for leftover in remove_staging_leftovers(root):
            log.info("removed %s, a checkpoint that was not finished", leftover)
    resume_from = checkpoint.latest_checkpoint(root) if config.resume else None
    if resume_from is None:
        return None
    state = checkpoint.load_training_state(resume_from)
    meta = json.loads((resume_from / "meta.json").read_text())
    check_resume(settings, meta["config"], state, config, processes.world, resume_from)
    return Resumed(resume_from, state, meta)


def _setup(
    config: TrainConfig,
    settings: Any,
    processes: distributed.Processes,
    make_data: DataFactory,
    resumed: Resumed | None,
) -> Run:
    """Load the student (from the checkpoint when resuming) and its data, wrap its loss module, make its optimizer
    and learning-rate schedule."""
    student, tokenizer, _ = load_hf_directory(resumed.path if resumed else Path(config.student), torch.float32)
    student.train()
    data = make_data(student, tokenizer, processes)
    order = DataOrder(len(data), config.seed)
    loss_module = data.loss_module(student)
    model = distributed.wrap(loss_module, processes, decoder_layers(student) if config.fsdp else None)
    optimizer = _optimizer(student, config)  # after wrapping: FSDP replaces the parameters with sharded ones
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    return Run(config, settings, processes, student, tokenizer, data, order, loss_module, model, optimizer, scheduler)


def _restore(run: Run, resumed: Resumed | None) -> tuple[int, dict[str, Any]]:
    """Continue the checkpoint (optimizer, schedule, random state), or seed a new run.

    Returns:
        The step to start from and the metrics record of the step before it (``{}`` for a new run).
    """
    if resumed is None:
        torch.manual_seed(run.config.seed)
        return 0, {}
    state = resumed.state
    checkpoint.load_optimizer_state(run.student, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    # A process the checkpoint's job did not have takes rank 0's state (every process starts from the same seed).
    rng, rank = state["rng"], run.processes.rank
    checkpoint.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    log.info("resuming from %s at step %d", resumed.path, state["step"])
    return state["step"], resumed.meta["metrics"]


def _write_run_files(run: Run) -> None:
    """OUT/config.yaml, environment.json (with the precision used) and data_manifest.json."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(to_yaml(run.settings))
    env = environment(resolve_precision(run.processes.device, run.config.precision), run.data.teacher_dtype)
    (run.out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    (run.out / "data_manifest.json").write_text(json.dumps(run.data.manifest, indent=2) + "\n")


def _after_step(
    run: Run,
    record: dict[str, Any],
    metrics: MetricsLog | None,
    bar: tqdm,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Evaluate, log and checkpoint at the intervals of the config (and at the last step) after the step of
    `record`, whose held-out loss and perplexity it adds when it evaluates."""
    config, done = run.config, record["step"]
    is_last = done == config.max_steps
    if (config.eval_every and done % config.eval_every == 0) or is_last:
        record["val_loss"] = run.data.evaluate(run.loss_module, run.processes)
        record["val_ppl"] = perplexity(record["val_loss"])
    if metrics is not None and (done % config.log_every == 0 or "val_loss" in record or done == 1):
        metrics.write(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
    bar.update(1)
    if on_step is not None:
        on_step(record)
    if (config.save_every and done % config.save_every == 0) or is_last:
        _save(run, done, record)


def _save(run: Run, step: int, record: dict[str, Any]) -> None:
    """Checkpoint `step` (weights, optimizer, schedule, every process's random state, `record`) in OUT/checkpoints."""
    processes = run.processes
    states = [checkpoint.rng_state()]
    if processes.world > 1:
        states = [None] * processes.world
        torch.distributed.all_gather_object(states, checkpoint.rng_state())
    weights = checkpoint.gathered_weights(run.student)
    optimizer_state = checkpoint.gathered_optimizer_state(run.student, run.optimizer)
    if processes.main:
        training_state = {
            "optimizer": optimizer_state,
            "scheduler": run.scheduler.state_dict(),
            "rng": states,
            "step": step,
            "samples_seen": step * run.global_batch,
        }
        meta = {"step": step, "metrics": record, "config": vars(run.settings)}
        checkpoint.save_checkpoint(run.checkpoints, step, run.student, weights, run.tokenizer, training_state, meta)
    if processes.world > 1:
        torch.distributed.barrier()


def _save_final(run: Run, record: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Write the trained student to OUT/final and the run's summary to OUT/summary.json; return the summary."""
    config, out = run.config, run.out
    # A run resumed from its final checkpoint reports that checkpoint's metrics (the last step always evaluates).
    summary: dict[str, Any] = {"steps": config.max_steps, "out": str(out)}
    summary.update({k: record[k] for k in ("tokens", "tokens_per_s", "val_loss", "val_ppl")})
    summary["seconds"] = seconds
    weights = checkpoint.gathered_weights(run.student)
    if run.processes.main:
        final = out / "final"
        with staged(final) as staging:
            run.student.save_pretrained(staging, state_dict=weights)
            run.tokenizer.save_pretrained(staging)
        summary["final"] = str(final)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _stopped(run: Run, what: str) -> LmdistillError:
    return LmdistillError(
        f"{what}; stopped without updating the model. Last good checkpoint: "
        f"{checkpoint.latest_checkpoint(run.checkpoints) or 'none'} (try a lower --lr or --precision fp32)"
    )
