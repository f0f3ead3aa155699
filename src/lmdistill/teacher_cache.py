"""Top-k teacher distribution cache: run the teacher once over the training blocks, distill from disk afterwards.

Format (version 2), one directory:

- `manifest.json`: `format` ("lmdistill-teacher-cache"), `version` (2), `teacher` (name), `teacher_fingerprint`
  (sha256 of the teacher's config and weights), `tokenizer_fingerprint`, `vocab_size`, `data_fingerprint` (of the
  packed data it was computed on), `data_num_blocks` (training blocks in that data), `seq_len`, `top_k`,
  `temperature` (always 1), `num_blocks` (blocks cached: all of the data's, or the ones a run of known length
  reads), and `shards`: a list of `{"file", "num_blocks"}`.
- `shard-NNNNNN.safetensors`, each holding `n` training blocks of `L` tokens:
  `blocks` int64 [n] (their indices among the data's training blocks),
  `ids` int32 [n, L, K] (the teacher's top-K next-token ids at each position, most probable first),
  `logprobs` float32 [n, L, K] (their log-probabilities at temperature 1) and `tail` float32 [n, L]
  (1 - the sum of those probabilities: the mass of the other V - K tokens).

Position t of a block holds the teacher's distribution over the token at t + 1. Shards are written atomically, so an
interrupted `cache-teacher` continues where it stopped.

Launch: `lmdistill cache-teacher --teacher default --seq-len 256 --top-k 64 --out runs/teacher-cache`
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmdistill.data.order import DataOrder
from lmdistill.data.packed import PackedData, prepare_data, tokenizer_fingerprint
from lmdistill.errors import LmdistillError
from lmdistill.evaluate import autocast
from lmdistill.models.load import load_teacher
from lmdistill.storage import staged

log = logging.getLogger(__name__)

FORMAT, VERSION = "lmdistill-teacher-cache", 2


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's config and every parameter's bytes (about a second for a 135M-parameter model)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def write_cache(
    teacher: torch.nn.Module,
    teacher_name: str,
    tokenizer: Any,
    data: PackedData,
    out: Path,
    *,
    top_k: int,
    blocks: np.ndarray | None = None,
    batch_size: int = 8,
    shard_blocks: int = 256,
    precision: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the teacher's top-k next-token distribution on training blocks.

    Args:
        teacher: the teacher causal LM (eval mode).
        teacher_name: recorded in the manifest.
        tokenizer: the teacher's tokenizer (its fingerprint must match the data's).
        data: packed data; its training blocks are cached.
        out: the cache directory.
        top_k: K, number of token ids kept per position (1 <= K <= V).
        blocks: indices of the training blocks to cache, distinct (default: all, in order).
        batch_size: blocks per teacher forward pass.
        shard_blocks: blocks per shard file.
        precision: "auto", "bf16" or "fp32" autocast of the teacher's forward pass.
        progress: show a progress bar.

    Returns:
        The manifest.
    """
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise LmdistillError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {top_k}")
    if tokenizer_fingerprint(tokenizer) != data.manifest["tokenizer_fingerprint"]:
        raise LmdistillError("the teacher's tokenizer is not the one the data was tokenized with")
    n_data_blocks, seq_len = data.train.shape
    blocks = np.arange(n_data_blocks) if blocks is None else np.asarray(blocks, dtype=np.int64)
    if len(np.unique(blocks)) != len(blocks) or blocks.min(initial=0) < 0 or blocks.max(initial=0) >= n_data_blocks:
        raise LmdistillError(f"blocks to cache must be distinct training block indices below {n_data_blocks}")
    out.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    shards = []
    bar = tqdm(total=len(blocks), unit="block", desc="teacher cache", disable=not progress)
    for first in range(0, len(blocks), shard_blocks):
        indices = blocks[first : first + shard_blocks]
        name = f"shard-{first // shard_blocks:06d}.safetensors"
        shards.append({"file": name, "num_blocks": len(indices)})
        if _shard_blocks(out / name) == indices.tolist():  # written atomically by an earlier, interrupted run
            bar.update(len(indices))
            continue
        ids = torch.empty(len(indices), seq_len, top_k, dtype=torch.int32)
        logprobs = torch.empty(len(indices), seq_len, top_k, dtype=torch.float32)
        for start in range(0, len(indices), batch_size):
            rows = slice(start, min(start + batch_size, len(indices)))
            block = torch.as_tensor(data.train[indices[rows]].astype(np.int64), device=device)
            with autocast(device, precision):
                logits = teacher(input_ids=block).logits  # [b, L, V]
            top = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # [b, L, K]
            ids[rows], logprobs[rows] = top.indices.int().cpu(), top.values.cpu()
            bar.update(rows.stop - rows.start)
        tail = (1 - logprobs.exp().sum(-1)).clamp_min(0)  # [n, L]
        tensors = {"blocks": torch.as_tensor(indices), "ids": ids, "logprobs": logprobs, "tail": tail}
        with staged(out / name, directory=False) as staging:
            save_file(tensors, staging)
    bar.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_name,
        "teacher_fingerprint": model_fingerprint(teacher),
        "tokenizer_fingerprint": data.manifest["tokenizer_fingerprint"],
        "vocab_size": vocab,
        "data_fingerprint": data.fingerprint,
        "data_num_blocks": n_data_blocks,
        "seq_len": seq_len,
        "top_k": top_k,
        "temperature": 1.0,
        "num_blocks": len(blocks),
        "shards": shards,
    }
    with staged(out / "manifest.json", directory=False) as staging:
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _shard_blocks(file: Path) -> list[int] | None:
    """The block indices an existing shard holds, or None when there is no readable shard."""
    try:
        with safe_open(file, framework="pt") as shard:
            return shard.get_tensor("blocks").tolist()
    except Exception:
        return None


@dataclass
class TeacherCache:
    """A teacher cache opened for training, checked against the data it will be read with."""

    manifest: dict[str, Any]
    slots: torch.Tensor  # [data blocks] int64: row of each training block in ids/logprobs, -1 where not cached
    ids: torch.Tensor  # [N, L, K] int32
    logprobs: torch.Tensor  # [N, L, K] float32

    @classmethod
    def open(cls, path: Path, data: PackedData) -> TeacherCache:
        """Read a cache and refuse it unless it was computed on exactly this data and tokenizer.

        Args:
            path: the cache directory.
            data: the packed data of the training run.

        Returns:
            The cache, loaded into memory.

        Raises:
            LmdistillError: missing or corrupt files, or a manifest that does not match the data.
        """
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise LmdistillError(f"no teacher cache in {path}: manifest.json is missing (run lmdistill cache-teacher)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise LmdistillError(f"teacher cache manifest {manifest_path} is corrupt: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise LmdistillError(f"{path} is not a version-{VERSION} lmdistill teacher cache")
        expected = {  # the most telling mismatch first: a different seq_len also changes the data fingerprint
            "seq_len": data.train.shape[1],
            "tokenizer_fingerprint": data.manifest["tokenizer_fingerprint"],
            "data_fingerprint": data.fingerprint,
            "data_num_blocks": data.train.shape[0],
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise LmdistillError(
                    f"teacher cache {path} does not match the training data: its {key} is {manifest.get(key)!r}, "
                    f"the data's is {value!r}; rebuild it with lmdistill cache-teacher on the same --data, "
                    "--seq-len and tokenizer"
                )
        blocks, ids, logprobs = [], [], []
        for shard in manifest["shards"]:
            file = path / shard["file"]
            try:
                tensors = load_file(file)
            except Exception as exc:
                raise LmdistillError(f"teacher cache shard {file} is missing or corrupt: {exc}") from exc
            shape = (shard["num_blocks"], manifest["seq_len"], manifest["top_k"])
            if tuple(tensors["ids"].shape) != shape or tuple(tensors["blocks"].shape) != shape[:1]:
                raise LmdistillError(f"teacher cache shard {file} does not hold the blocks the manifest says it does")
            blocks.append(tensors["blocks"])
            ids.append(tensors["ids"])
            logprobs.append(tensors["logprobs"])
        cached = torch.cat(blocks)
        if len(cached) != manifest["num_blocks"] or len(cached.unique()) != len(cached):
            raise LmdistillError(
                f"teacher cache {path} holds {len(cached)} blocks, not the {manifest['num_blocks']} "
                "distinct blocks its manifest lists"
            )
        slots = torch.full((data.train.shape[0],), -1, dtype=torch.long)
        slots[cached] = torch.arange(len(cached))
        return cls(manifest, slots, torch.cat(ids), torch.cat(logprobs))

    def missing(self, blocks: np.ndarray) -> np.ndarray:
        """The distinct training blocks among `blocks` that the cache does not hold."""
        unique = np.unique(blocks)
        return unique[self.slots[torch.as_tensor(unique)].numpy() < 0]

    def lookup(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached top-k ids (int64) and log-probabilities of training blocks `blocks`, each [B, L, K]."""
        rows = self.slots[torch.as_tensor(blocks, dtype=torch.long)]
        if (rows < 0).any():
            raise LmdistillError(f"the teacher cache does not hold training blocks {self.missing(blocks).tolist()}")
        return self.ids[rows].long(), self.logprobs[rows]


def run_cache_teacher(config: Any) -> dict[str, Any]:
    """`lmdistill cache-teacher`: load the teacher and the data, write the cache, return its manifest.

    Args:
        config: a `CacheTeacherConfig`.

    Returns:
        The manifest written to `OUT/manifest.json`.
    """
    teacher = load_teacher(config.teacher)
    data = prepare_data(
        config.data, teacher.tokenizer, config.seq_len, val_fraction=config.val_fraction, progress=config.progress
    )
    blocks = None
    if config.samples is not None:  # the blocks a run of that many samples reads, in storage order
        blocks = np.unique(DataOrder(len(data.train), config.seed).blocks(0, config.samples))
    return write_cache(
        teacher.model,
        teacher.name,
        teacher.tokenizer,
        data,
        Path(config.out),
        top_k=config.top_k,
        blocks=blocks,
        batch_size=config.batch_size,
        precision=config.precision,
        progress=config.progress,
    )
