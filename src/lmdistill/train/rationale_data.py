"""The data of multitask causal-LM training on labels and rationales (`lmdistill rationales train`), for the engine.

Each example gives a ``predict:`` sequence (its prompt, then the label) and, when it has a rationale, an ``explain:``
sequence (its prompt, ending in its own cue ``Rationale:`` instead of the answer cue, then the rationale); both
targets are `continuation` texts followed by the end-of-sequence token. Prompt tokens and padding are masked (label
-100): only target tokens are predicted. A sequence over ``--max-len`` tokens loses tokens of the example's own text
(`cut_example_text`), never of its prefix, template, cue or target.

Loss of one optimizer step over the examples E of the step (all micro-batches, all processes)::

    L = L_label + λ · L_rationale
    L_label     = (Σ CE over the label target tokens of E)     / N_label      N_label = their count
    L_rationale = (Σ CE over the rationale target tokens of E) / N_rationale  N_rationale = their count

Each micro-batch contributes its own sums divided by the step's global counts N_label and N_rationale (computed
from the step's example indices before its first micro-batch), so the accumulated gradient is exactly that of the
whole step at once, whatever the split into micro-batches and processes. A step without rationale tokens has
L_rationale = 0. With λ = 0 the ``explain:`` sequences are not built at all: the run is plain fine-tuning on labels,
the same as a run without rationales.

Rationale sources (``--rationale-source``): ``file``, the ``rationale`` of the records of ``--rationales`` (written by
``lmdistill rationales extract``), matched by id; ``llm``, the 540B model's chain-of-thought rationales the task
loader gives for SVAMP and CQA (Distilling step-by-step); ``gold``, the data's own rationales (gsm-symbolic's
solution steps, CQA's and e-SNLI's explanations); ``none``, plain fine-tuning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill import distributed
from lmdistill.config import RationaleTrainConfig
from lmdistill.errors import LmdistillError
from lmdistill.losses import chunked_distill_loss
from lmdistill.objective import LMLoss
from lmdistill.precision import autocast
from lmdistill.rationales.records import parse_records
from lmdistill.rationales.tasks import Example, Prompt, continuation, render_prompt

log = logging.getLogger(__name__)

LABEL, RATIONALE = 0, 1  # term index of a sequence: its target is the label or the rationale
HELD_OUT_SEED = 0  # the held-out examples do not depend on --seed, so that runs of several seeds share them


@dataclass(frozen=True)
class TargetSequence:
    """One training sequence: prompt + target token ids, where the target starts, and its term."""

    ids: tuple[int, ...]
    start: int
    term: int

    @property
    def targets(self) -> int:
        """Number of predicted (target) tokens."""
        return len(self.ids) - self.start


class MultitaskLoss(LMLoss):
    """Σ_k w_k · (Σ CE over the target tokens of the rows of term k) / N_k, from one forward pass of a causal LM.

    The terms are disjoint sets of rows of the batch; each is one `chunked_distill_loss` call on the same hidden
    states with the other rows' labels masked. Returns ``(total, label, rationale)``, the parts each normalized by
    their own ``num_items``.
    """

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        row_terms: torch.Tensor,
        weights: tuple[float, float],
        num_items: tuple[int, int],
        chunk_size: int = 256,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.lm.base_model(input_ids=input_ids).last_hidden_state  # [B, L, d]
        head = self.lm.get_output_embeddings().weight
        total, parts = None, []
        for term, (weight, count) in enumerate(zip(weights, num_items)):
            masked = labels.masked_fill((row_terms != term).unsqueeze(-1), -100)
            loss, _, _ = chunked_distill_loss(hidden, head, masked, num_items=count, chunk_size=chunk_size)
            parts.append(loss)
            total = weight * loss if total is None else total + weight * loss
        return total, parts[0], parts[1]


def pad_right(rows: list[TargetSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids ``[B, L]`` right-padded, labels ``[B, L]`` (position t predicts target token t + 1; -100 at prompt and
    padding) and the term of each row ``[B]``. Right padding needs no attention mask in a causal model: the padding
    comes after every token that is predicted."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        labels[i, row.start - 1 : len(row.ids) - 1] = ids[i, row.start : len(row.ids)]
    return ids, labels, torch.tensor([r.term for r in rows], dtype=torch.long)


class RationaleTrainData:
    """Labelled examples as `predict:` and `explain:` sequences: a `TrainData` of the training engine."""

    terms = ("label", "rationale")
    teacher_dtype = None  # no teacher runs during training

    def __init__(
        self,
        train: list[list[TargetSequence]],
        val: list[list[TargetSequence]],
        *,
        weight: float,
        pad_id: int,
        batch_size: int,
        chunk_size: int,
        precision: str,
        manifest: dict[str, Any],
    ) -> None:
        self.train, self.val, self.weight, self.pad_id = train, val, weight, pad_id
        self.batch_size, self.chunk_size, self.precision, self.manifest = batch_size, chunk_size, precision, manifest

    def __len__(self) -> int:
        return len(self.train)

    def loss_module(self, student: PreTrainedModel) -> MultitaskLoss:
        return MultitaskLoss(student)

    def _counts(self, examples: list[list[TargetSequence]]) -> tuple[int, int]:
        counts = [0, 0]
        for sequences in examples:
            for s in sequences:
                counts[s.term] += s.targets
        return counts[0], counts[1]

    def step_options(self, indices: np.ndarray) -> dict[str, Any]:
        return {
            "weights": (1.0, self.weight),
            "num_items": self._counts([self.train[i] for i in indices]),
            "chunk_size": self.chunk_size,
        }

    def batch(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        ids, labels, row_terms = pad_right([s for i in indices for s in self.train[i]], self.pad_id)
        return ids.to(device), labels.to(device), {"row_terms": row_terms.to(device)}

    def teacher_targets(self, ids: torch.Tensor, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """``{}``: no teacher; the targets are the examples' own label and rationale tokens."""
        return {}

    def tokens(self, indices: np.ndarray) -> int:
        return sum(len(s.ids) for i in indices for s in self.train[i])

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, processes: distributed.Processes) -> float:
        """Label cross-entropy per target token on the held-out examples' ``predict:`` sequences (every process
        evaluates all of them, so every process runs the same forward passes and gets the same number)."""
        rows = [s for sequences in self.val for s in sequences if s.term == LABEL]
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            ids, labels, row_terms = (t.to(processes.device) for t in pad_right(batch, self.pad_id))
            n = sum(s.targets for s in batch)
            with autocast(processes.device, self.precision):
                _, loss, _ = module(
                    ids, labels, row_terms=row_terms, weights=(1.0, 0.0), num_items=(n, 0), chunk_size=self.chunk_size
                )
            total += loss.item() * n
            count += n
        module.train(was_training)
        return total / max(count, 1)


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, target: str, term: int, max_len: int
) -> tuple[TargetSequence, bool]:
    """Tokenize prompt + `continuation(target)` + end-of-sequence; over ``max_len`` tokens the example's own text is
    cut (`cut_example_text`) and the prefix, the template, its cue and the target stay whole. Returns the sequence and
    whether it was cut."""
    prompt_ids = tokenizer(prompt.text)["input_ids"]
    target_ids = tokenizer(continuation(target), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    excess = len(prompt_ids) + len(target_ids) - max_len
    if excess > 0:
        prompt_ids = cut_example_text(tokenizer, prompt, excess, len(target_ids), max_len)
    return TargetSequence(ids=tuple(prompt_ids + target_ids), start=len(prompt_ids), term=term), excess > 0


def cut_example_text(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, excess: int, target_tokens: int, max_len: int
) -> list[int]:
    """The prompt's token ids less ``excess`` tokens of the example's own text (tokens overlapping its spans): one at
    a time from the end of the span that has the most tokens left (the earliest on ties).

    Raises:
        LmdistillError: a tokenizer without offsets, or a prompt whose other tokens and the target exceed ``max_len``.
    """
    if not tokenizer.is_fast:
        raise LmdistillError("sequences over --max-len are cut inside the example's text: that needs a fast tokenizer")
    encoded = tokenizer(prompt.text, return_offsets_mapping=True)
    members: list[list[int]] = [[] for _ in prompt.spans]  # the token positions of each span
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        owner = next((i for i, (a, b) in enumerate(prompt.spans) if start < b and a < end), None)
        if owner is not None and end > start:
            members[owner].append(t)
    kept = len(encoded["input_ids"]) - sum(map(len, members)) + target_tokens
    if kept > max_len:
        raise LmdistillError(
            f"--max-len {max_len} is too short: the prompt without the example's text and the target take {kept} tokens"
        )
    dropped = set()
    for _ in range(excess):
        dropped.add(max(members, key=len).pop())
    return [token for t, token in enumerate(encoded["input_ids"]) if t not in dropped]


def rationale_targets(examples: list[Example], config: RationaleTrainConfig) -> dict[str, str]:
    """The rationale text of each example that has one, by id, from ``config.rationale_source``.

    Raises:
        LmdistillError: missing rationales file, a line that is not a record with a string id and rationale (named
            by file and line), ids that match none of the examples, records whose label differs from the example's
            (a file extracted from other data), a source that gives no rationale at all.
    """
    source = config.rationale_source
    if source == "none" or config.lambda_rationale == 0:
        return {}
    if source in ("llm", "gold"):
        key = "llm_rationale" if source == "llm" else "rationale"
        found = {e.id: getattr(e, key) for e in examples if getattr(e, key)}
        if not found:
            where = "a rationale" if source == "gold" else "a 540B-model rationale (SVAMP and CQA, shared data)"
            raise LmdistillError(f"--rationale-source {source}: no example of task {config.task} has {where}")
        return found
    path = Path(config.rationales)
    if not path.is_file():
        raise LmdistillError(f"rationales file {path} does not exist (write it with `lmdistill rationales extract`)")
    records = parse_records(path, "--rationales", ("id", "rationale"))
    if not records:
        raise LmdistillError(f"rationales file {path} holds no records")
    by_id = {e.id: e for e in examples}
    matched = [r for r in records if r["id"] in by_id]
    if not matched:
        shown = ", ".join(repr(r["id"]) for r in records[:3])
        raise LmdistillError(
            f"none of the {len(records)} ids in {path} ({shown}, ...) is the id of an example of task {config.task} "
            f"split {config.split}: was it extracted from other data?"
        )
    found = {}
    for r in matched:
        label = by_id[r["id"]].label
        if "label" in r and r["label"] != label:
            raise LmdistillError(
                f"{path}: the record of id {r['id']!r} has the label {r['label']!r}, the example {label!r}: "
                "the file was extracted from other data"
            )
        if r["rationale"].strip():
            found[r["id"]] = r["rationale"]
    if len(matched) < len(records):
        unmatched = len(records) - len(matched)
        log.warning("%d of the %d records in %s match no training example", unmatched, len(records), path)
    return found


def build_data(
    config: RationaleTrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    rationales: dict[str, str],
) -> RationaleTrainData:
    """Encode the examples and split off the held-out ones (a fixed permutation: the same for every --seed)."""
    if tokenizer.eos_token_id is None:
        raise LmdistillError("the student's tokenizer has no end-of-sequence token: targets end with it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template, cut = config.prompt_template, 0
    encoded = []
    for e in examples:
        targets = [("predict", e.label, LABEL)]
        if e.id in rationales:
            targets.append(("explain", rationales[e.id], RATIONALE))
        sequences = []
        for mode, target, term in targets:
            try:
                sequence, was_cut = encode(tokenizer, render_prompt(e, template, mode), target, term, config.max_len)
            except LmdistillError as exc:
                raise LmdistillError(f"the {mode}: sequence of example {e.id!r}: {exc}") from None
            sequences.append(sequence)
            cut += was_cut
        encoded.append(sequences)
    if cut:
        log.warning("%d sequences were longer than --max-len %d and were cut", cut, config.max_len)
    held = max(1, round(len(encoded) * config.val_fraction))
    if len(encoded) - held < 1:
        raise LmdistillError(f"{len(encoded)} example(s): too few to hold {held} out and train on the rest")
    permutation = np.random.default_rng(HELD_OUT_SEED).permutation(len(encoded))
    val_ids = set(permutation[:held].tolist())
    train = [s for i, s in enumerate(encoded) if i not in val_ids]
    val = [s for i, s in enumerate(encoded) if i in val_ids]
    ids = [e.id for i, e in enumerate(examples) if i not in val_ids]
    manifest = {
        "task": config.task,
        "split": config.split,
        "data": config.data,
        "limit": config.limit,
        "template": template,
        "rationale_source": config.rationale_source,
        "rationales": config.rationales,
        "lambda_rationale": config.lambda_rationale,
        "train_examples": len(train),
        "train_with_rationale": sum(len(s) == 2 for s in train),
        "heldout_examples": len(val),
        "sequences_cut": cut,
        "train_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }
    return RationaleTrainData(
        train,
        val,
        weight=config.lambda_rationale,
        pad_id=pad_id,
        batch_size=config.batch_size,
        chunk_size=config.chunk_size,
        precision=config.precision,
        manifest=manifest,
    )
