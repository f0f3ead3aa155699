"""Expected peak memory of a training run, and the disk of a teacher cache, from configs alone (`--dry-run`).

Nothing here loads weights: parameter counts come from building the models of the config.json files on the meta
device. Every term is float32 (the student trains in float32 and the teacher is loaded in float32). The peak is the
larger of two moments of a run: the end of a backward pass (weights, gradients, AdamW state, the activations of one
micro-batch, the loss's chunk buffers) and the final checkpoint write (weights, AdamW state, and a serialized copy of
both, which safetensors builds in memory before it writes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

FLOAT = 4  # bytes of a float32 (and of an int32 cache id)
MIB = 2**20


def parameters(config: PretrainedConfig) -> int:
    """Distinct parameters of the causal LM of `config` (a tied head counted once), counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


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


@dataclass(frozen=True)
class Term:
    """One component of the estimate: a name, its bytes, how they were counted, and when it is held: always
    (phase ""), during a training step ("step") or while the final checkpoint is written ("checkpoint")."""

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
    """

    terms: tuple[Term, ...]
    cache_disk: int | None = None
    cache_how: str = ""

    @property
    def peak(self) -> int:
        """What is always held plus the larger of the training step and the checkpoint write."""
        held = {phase: sum(t.bytes for t in self.terms if t.phase == phase) for phase in ("", "step", "checkpoint")}
        return held[""] + max(held["step"], held["checkpoint"])

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


def training_estimate(
    student: PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    chunk_size: int,
    teacher: PretrainedConfig | None = None,
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
        t_forward = FLOAT * tokens * (3 * t_inner + 2 * teacher.hidden_size)
        terms.append(Term("teacher weights", FLOAT * t_n, f"{t_n:,} parameters, float32"))
        terms.append(Term("teacher forward", t_forward, "no grad, one micro-batch: one MLP and the hidden states"))
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
    what = "logits, softmax, grad" + (", teacher logits, softmax" if teacher is not None else "")
    buffers = what.count(",") + 1
    chunk = FLOAT * min(chunk_size, tokens) * vocab * buffers
    train.append(Term("loss chunk buffers", chunk, f"{buffers} x [chunk, V] float32 ({what})", "step"))
    if top_k is not None:
        top = tokens * top_k * 2 * FLOAT
        train.append(Term("cached top-k", top, f"ids and logprobs of a micro-batch, K={top_k}", "step"))
    # the final checkpoint: the serialized copy of the weights and AdamW state (gathered whole on rank 0)
    save = Term("checkpoint write", 3 * FLOAT * n, "serialized weights and AdamW state, whole", "checkpoint")
    return Estimate(tuple(terms + train + [save]))


def _embedding_parameters(config: PretrainedConfig) -> int:
    tied = getattr(config, "tie_word_embeddings", True)
    return config.vocab_size * config.hidden_size * (1 if tied else 2)


def exceeds_available(estimate: Estimate) -> str | None:
    """A one-line warning when the expected peak exceeds MemAvailable, naming the levers; None when it fits."""
    available = available_memory()
    if not available or estimate.peak <= available:
        return None
    return (
        f"the expected peak memory per process, {estimate.peak / MIB:,.0f} MiB, exceeds the {available / MIB:,.0f} "
        "MiB available: consider --teacher-cache instead of an online --teacher, a smaller --chunk-size or "
        "--batch-size (with --grad-accum), or --fsdp under torchrun (see --dry-run for the table)"
    )
