"""Expected peak memory of a training run, and the disk of a teacher cache, from configs alone (`--dry-run`).

Nothing here loads weights: parameter counts come from building the models of the config.json files on the meta
device. The student's terms are float32 (it trains in float32); the online teacher's weights are counted at its
`--teacher-dtype` (`teacher_weight_bytes`). The peak is the largest of three moments of a run: the end of a backward
pass (weights, gradients, AdamW state, the activations of one micro-batch, the loss's chunk buffers), the final
checkpoint write (weights, AdamW state, and a serialized copy of both, which safetensors builds in memory before it
writes), and the teacher's conversion to bf16 or int8 (it is loaded in float32 first, so for a moment it is held in
float32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from lmdistill.losses import dense_kd_in_closed_form

FLOAT = 4  # bytes of a float32 (and of an int32 cache id)
MIB = 2**20
# bytes per output row of an int8 linear layer besides its weights: a float64 scale and an int64 zero point
# (per-channel quantization) and fbgemm's int32 column offset
INT8_ROW = 8 + 8 + 4


def parameters(config: PretrainedConfig) -> int:
    """Distinct parameters of the causal LM of `config` (a tied head counted once), counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def teacher_weight_bytes(config: PretrainedConfig, dtype: str) -> tuple[int, str]:
    """Bytes of an online teacher's weights in the dtype it runs in (`lmdistill.models.teacher_dtype`), and how
    they were counted.

    fp32: 4 per parameter; bf16: 2. int8: every linear layer (the output head included) 1 per weight plus `INT8_ROW`
    per output row and 4 per bias value, the rest (embeddings, norms) float32; the training loop also keeps the int8
    head dequantized to float32 (`lmdistill.models.teacher_dtype.head_weight`), [V, d] x 4 more.
    """
    if dtype != "int8":
        n = parameters(config)
        size = 2 if dtype == "bf16" else FLOAT
        return size * n, f"{n:,} parameters, {dtype}"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear | Conv1D)]
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    linear_ids = {id(p) for m in linear for p in m.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in linear_ids or (tied and p is head.weight))
    rows = sum(m.weight.shape[1 if isinstance(m, Conv1D) else 0] for m in linear)
    weights = sum(m.weight.numel() for m in linear)
    biases = sum(m.bias.numel() for m in linear if m.bias is not None)
    dequantized_head = FLOAT * head.weight.numel()
    total = weights + INT8_ROW * rows + FLOAT * (biases + rest) + dequantized_head
    how = f"{weights:,} linear weights int8, {rest:,} parameters float32, the head dequantized to float32"
    return total, how


def activation_floats(config: PretrainedConfig, tokens: int) -> int:
    """Floats that the student's forward keeps for its backward over `tokens` (= batch x sequence) positions.

    Per decoder layer and token: the inputs and outputs of the two norms (4 h), the query/key/value projections and
    their rotated copies with the attention output (4 q + 4 kv, q = heads x head width, kv = KV heads x head width),
    and the MLP's gate, up, activated gate and product (4 i); plus the embeddings and the final norm (2 h per token).
    GPT-2 has no gate: its MLP keeps 3 i.
    """
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    mlp = 3 * inner if config.model_type == "gpt2" else 4 * inner
    per_layer = 4 * h + 4 * heads * head_dim + 4 * kv + mlp
    return tokens * (config.num_hidden_layers * per_layer + 2 * h)


def process_rss() -> int:
    """This process's resident memory now (VmRSS of /proc/self/status), in bytes; 0 where /proc is missing."""
    return _proc_kib(Path("/proc/self/status"), "VmRSS")


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes; 0 where it is missing."""
    return _proc_kib(Path("/proc/meminfo"), "MemAvailable")


def _proc_kib(path: Path, key: str) -> int:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


PHASES = ("", "step", "checkpoint", "conversion")


@dataclass(frozen=True)
class Term:
    """One component of the estimate: a name, its bytes, how they were counted, and when it is held: always
    (phase ""), during a training step ("step"), while the final checkpoint is written ("checkpoint") or while the
    teacher is converted from float32 to its dtype ("conversion")."""

    name: str
    bytes: int
    how: str
    phase: str = ""


@dataclass(frozen=True)
class Estimate:
    """The expected peak resident memory of one training process, by component, and a teacher cache's disk.

    Attributes:
        terms: every component in the peak.
        cache_disk: bytes of the teacher cache the run reads or builds (None: no cache).
        cache_how: how `cache_disk` was counted.
        teacher_dtype: the online teacher's dtype as resolved ("fp32", "bf16" or "int8"; None: no online teacher).
    """

    terms: tuple[Term, ...]
    cache_disk: int | None = None
    cache_how: str = ""
    teacher_dtype: str | None = None

    @property
    def peak(self) -> int:
        """What is always held plus the largest of the training step, the checkpoint write and the teacher's
        conversion."""
        held = {phase: sum(t.bytes for t in self.terms if t.phase == phase) for phase in PHASES}
        return held[""] + max(held[phase] for phase in PHASES[1:])

    def table(self) -> str:
        """The estimate as a text table, MiB per component."""
        width = max(len(term.name) for term in self.terms)
        rows = [
            f"{term.name:<{width}s} {term.bytes / MIB:10.1f} MiB  {f'({term.phase}) ' if term.phase else ''}{term.how}"
            for term in self.terms
        ]
        rows.append(f"{'expected peak per process':<{width}s} {self.peak / MIB:10.1f} MiB")
        if self.cache_disk is not None:
            rows.append(f"{'teacher cache on disk':<{width}s} {self.cache_disk / MIB:10.1f} MiB  {self.cache_how}")
        return "\n".join(rows)


def cache_bytes(blocks: int, seq_len: int, top_k: int, hidden: int = 0) -> int:
    """Disk of a teacher cache of `blocks` blocks: ids int32 and logprobs float32 [L, K], tail float32 [L], the
    block index (int64) and `hidden` float16 hidden-state values per position ([L, H, d_S]: H x d_S) per block
    (README, `cache-teacher`, format)."""
    return blocks * (seq_len * top_k * (FLOAT + FLOAT) + seq_len * FLOAT + 8 + seq_len * hidden * 2)


def _chunk_buffers(entries: int, online: bool, kd_loss: str, beta: float) -> Term:
    """The loss's [chunk, V] float32 buffers (`entries` = chunk x V) alive at once, as measured (VmHWM) at
    V = 262,144: an online teacher's forward KL (and JSD at β = 0) is differentiated in closed form, the other
    divergences through autograd, which holds more."""
    if not online:
        buffers, what = 3, "logits, softmax, grad"
    elif dense_kd_in_closed_form(kd_loss, beta):
        buffers, what = 4, "logits, CE grad, teacher logits, log ratio"
    else:
        buffers, what = 10, f"logits, CE grad, teacher logits, 7 in the autograd of {kd_loss}"
    return Term("loss chunk buffers", FLOAT * entries * buffers, f"{buffers} x [chunk, V] float32 ({what})", "step")


def training_estimate(
    student: PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    chunk_size: int,
    teacher: PretrainedConfig | None = None,
    teacher_dtype: str = "fp32",
    kd_loss: str = "forward-kl",
    beta: float = 0.0,
    held_teacher: PretrainedConfig | None = None,
    top_k: int | None = None,
    processes: int = 1,
    fsdp: bool = False,
    baseline: int | None = None,
) -> Estimate:
    """The expected peak memory of one training process.

    Args:
        student: the student's config.
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        chunk_size: positions per chunk of the loss.
        teacher: the online teacher's config (its weights and one no-grad forward), or None.
        teacher_dtype: the dtype the online teacher runs in ("fp32", "bf16" or "int8", as resolved).
        kd_loss: the online teacher's divergence (`_chunk_buffers`).
        beta: its JSD coefficient.
        held_teacher: a teacher whose weights the process holds without running it (a study's, while its runs
            train), or None.
        top_k: ids per position of a cached teacher, or None.
        processes: processes of the run (DDP replicates everything; FSDP shards the student's weights, gradients
            and AdamW state over them, plus one gathered decoder layer).
        fsdp: shard the student.
        baseline: bytes of the Python process before any model (default: this process's VmRSS now).
    """
    tokens = batch_size * seq_len
    vocab = student.vocab_size
    n = parameters(student)
    shards = processes if fsdp else 1
    weights = FLOAT * n // shards
    terms = [
        Term("python, torch, transformers", process_rss() if baseline is None else baseline, "VmRSS at the estimate"),
    ]
    if held_teacher is not None:
        terms.append(Term("teacher weights", FLOAT * parameters(held_teacher), "float32, held while runs train"))
    if teacher is not None:
        t_n = parameters(teacher)
        # the no-grad forward's largest transient: one layer's MLP (gate, up, product) plus the kept hidden states
        t_inner = getattr(teacher, "intermediate_size", None) or 4 * teacher.hidden_size
        size = 2 if teacher_dtype == "bf16" else FLOAT  # int8 layers take and return float32 activations
        t_forward = size * tokens * (3 * t_inner + 2 * teacher.hidden_size)
        t_weights, how = teacher_weight_bytes(teacher, teacher_dtype)
        terms.append(Term("teacher weights", t_weights, how))
        terms.append(Term("teacher forward", t_forward, "no grad, one micro-batch: one MLP and the hidden states"))
        if teacher_dtype != "fp32":
            loaded = FLOAT * t_n
            how = f"loaded in float32 ({loaded / MIB:,.1f} MiB), then converted"
            if teacher_dtype == "int8" and getattr(teacher, "tie_word_embeddings", True):
                loaded += FLOAT * teacher.vocab_size * teacher.hidden_size
                how += ", with a float32 copy of the tied head to quantize"
            terms.append(Term("teacher in float32", max(0, loaded - t_weights), how, "conversion"))
    share = f", 1/{shards} per process (FSDP)" if shards > 1 else ""
    terms.append(Term("student weights", weights, f"{n:,} parameters, float32{share}"))
    terms.append(Term("AdamW state", 2 * weights, "exp_avg and exp_avg_sq, float32"))
    activations = FLOAT * activation_floats(student, tokens)
    train = [
        Term("student gradients", weights, "float32", "step"),
        Term("activations", activations, f"one micro-batch of {batch_size} x {seq_len}", "step"),
    ]
    if fsdp and shards > 1:
        layer = FLOAT * (n - _embedding_parameters(student)) // student.num_hidden_layers
        train.append(Term("gathered layer", 2 * layer, "one decoder layer's weights and gradients, whole", "step"))
    train.append(_chunk_buffers(min(chunk_size, tokens) * vocab, teacher is not None, kd_loss, beta))
    if top_k is not None:
        top = tokens * top_k * 2 * FLOAT
        train.append(Term("cached top-k", top, f"ids and logprobs of a micro-batch, K={top_k}", "step"))
    # the final checkpoint: the serialized copy of the weights and AdamW state (gathered whole on rank 0)
    save = Term("checkpoint write", 3 * FLOAT * n, "serialized weights and AdamW state, whole", "checkpoint")
    return Estimate(tuple(terms + train + [save]), teacher_dtype=teacher_dtype if teacher is not None else None)


def _embedding_parameters(config: PretrainedConfig) -> int:
    tied = getattr(config, "tie_word_embeddings", True)
    return config.vocab_size * config.hidden_size * (1 if tied else 2)


def exceeds_available(estimate: Estimate) -> str | None:
    """A one-line warning when the expected peak exceeds MemAvailable, naming the levers; None when it fits."""
    available = available_memory()
    if not available or estimate.peak <= available:
        return None
    online = estimate.teacher_dtype == "fp32"  # an online teacher that a reduced dtype would shrink
    return (
        f"the expected peak memory per process, {estimate.peak / MIB:,.0f} MiB, exceeds the {available / MIB:,.0f} "
        "MiB available: consider --teacher-cache instead of an online --teacher"
        f"{' (or --teacher-dtype int8 or bf16 for it)' if online else ''}, a smaller --chunk-size or "
        "--batch-size (with --grad-accum), or --fsdp under torchrun (see --dry-run for the table)"
    )
