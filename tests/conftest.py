"""Tiny teachers built from `transformers` configs (no downloads), with every parameter randomized.

Random norm gains and biases matter: with the default init (gains 1, biases 0) a missing diag(g) or bias fold would
go unnoticed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
WORDS = "the a of and to in is was it that for on with as by at from this be are".split()


def tiny_config(kind: str, **overrides) -> PretrainedConfig:
    """A 3-block teacher config of width 32: llama (GQA 4/2), qwen2 (q/k/v biases), qwen3 (q/k norms), gpt2 or
    gemma3 (gemma3_text: sliding-window blocks of 4 positions, every second block full attention)."""
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if kind == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_positions=64, layer_norm_epsilon=1e-12, **common, **overrides
        )
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-12,  # the GUIDE identities are exact up to the eps term of the norms
    )
    llama_like.update(overrides)
    if kind == "gemma3":
        layers = llama_like["num_hidden_layers"]
        kinds = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
        llama_like = dict(sliding_window=4, query_pre_attn_scalar=8, layer_types=kinds) | llama_like
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[kind]
    return config_class(**common, **llama_like)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter seeded random values: norm gains in [0.5, 1.5], everything else N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=generator))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def tiny_teacher(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    return randomize(model, seed).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_tokenizer():
    """An offline word-level tokenizer with exactly VOCAB entries (unknown words map to id 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + list("bcdefghijklmnopqrstuvwxyz.,;:!?'\"-()0123456789")  # "a" is a word already
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", "<unk>", *words])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_teacher(path, kind: str = "llama", **overrides):
    """Save a randomized tiny teacher with its tokenizer as a Hugging Face directory; return the path."""
    tiny_teacher(kind, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_corpus(path, documents: int = 12, words: int = 400):
    """A directory of text documents drawn from the tiny tokenizer's words (seeded); return the path."""
    import random

    rng = random.Random(0)
    path.mkdir()
    for i in range(documents):
        (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread: tiny models gain nothing from threads, and on a busy 2-core machine thread contention
    made them 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption(
        "--integration", action="store_true", help="also run the integration tier (torchrun, whole studies); CI does"
    )


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `integration` unless --integration is given."""
    if config.getoption("--integration"):
        return
    skip = pytest.mark.skip(reason="integration tier (torchrun, whole studies): pass --integration, as .ci/run does")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def torchrun(*args, processes: int = 2, timeout: float = 300) -> None:
    """`lmdistill ARGS` in `processes` gloo processes under torchrun, one thread each; fails with its stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "lmdistill.cli", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as done:
        try:
            _, stderr = done.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(done.pid, signal.SIGKILL)  # the workers too (a hung collective), not only torchrun
            raise
    assert done.returncode == 0, stderr[-3000:]


@contextmanager
def lmdistill_cache(path: Path) -> Iterator[Path]:
    """Point LMDISTILL_CACHE at `path` for the block (module-scoped fixtures cannot take `monkeypatch`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMDISTILL_CACHE", str(path))
        yield path
