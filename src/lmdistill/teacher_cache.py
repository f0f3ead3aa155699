"""Top-k teacher distribution cache: run the teacher once over the training blocks, distill from disk afterwards.

Format (version 1), one directory:

- `manifest.json`: `format` ("lmdistill-teacher-cache"), `version` (1), `teacher` (name), `teacher_fingerprint`
  (sha256 of the teacher's config and weights), `tokenizer_fingerprint`, `vocab_size`, `data_fingerprint` (of the
  packed data it was computed on), `seq_len`, `top_k`, `temperature` (always 1), `num_blocks`, and `shards`: a list
  of `{"file", "first_block", "num_blocks"}` covering training blocks 0..num_blocks-1 in order.
- `shard-NNNNNN.safetensors`, each holding, for `n` consecutive training blocks of `L` tokens:
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmdistill.data.packed import PackedData, prepare_data, tokenizer_fingerprint
from lmdistill.errors import LmdistillError
from lmdistill.evaluate import autocast
from lmdistill.models.load import load_teacher
from lmdistill.storage import staged

log = logging.getLogger(__name__)

FORMAT, VERSION = "lmdistill-teacher-cache", 1


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
    batch_size: int = 8,
    shard_blocks: int = 256,
    precision: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the teacher's top-k next-token distribution on every training block.

    Args:
        teacher: the teacher causal LM (eval mode).
        teacher_name: recorded in the manifest.
        tokenizer: the teacher's tokenizer (its fingerprint must match the data's).
        data: packed data; its training blocks are cached.
        out: the cache directory.
        top_k: K, number of token ids kept per position (1 <= K <= V).
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
    out.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    n_blocks, seq_len = data.train.shape
    shards = []
    bar = tqdm(total=n_blocks, unit="block", desc="teacher cache", disable=not progress)
    for first in range(0, n_blocks, shard_blocks):
        count = min(shard_blocks, n_blocks - first)
        name = f"shard-{first // shard_blocks:06d}.safetensors"
        shards.append({"file": name, "first_block": first, "num_blocks": count})
        if (out / name).exists():  # written atomically by an earlier, interrupted run
            bar.update(count)
            continue
        ids = torch.empty(count, seq_len, top_k, dtype=torch.int32)
        logprobs = torch.empty(count, seq_len, top_k, dtype=torch.float32)
        for start in range(0, count, batch_size):
            rows = slice(start, min(start + batch_size, count))
            block = torch.as_tensor(data.train[first + rows.start : first + rows.stop].astype(np.int64), device=device)
            with autocast(device, precision):
                logits = teacher(input_ids=block).logits  # [b, L, V]
            top = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # [b, L, K]
            ids[rows], logprobs[rows] = top.indices.int().cpu(), top.values.cpu()
            bar.update(rows.stop - rows.start)
        tail = (1 - logprobs.exp().sum(-1)).clamp_min(0)  # [n, L]
        with staged(out / name, directory=False) as staging:
            save_file({"ids": ids, "logprobs": logprobs, "tail": tail}, staging)
    bar.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_name,
        "teacher_fingerprint": model_fingerprint(teacher),
        "tokenizer_fingerprint": data.manifest["tokenizer_fingerprint"],
        "vocab_size": vocab,
        "data_fingerprint": data.fingerprint,
        "seq_len": seq_len,
        "top_k": top_k,
        "temperature": 1.0,
        "num_blocks": n_blocks,
        "shards": shards,
    }
    with staged(out / "manifest.json", directory=False) as staging:
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class TeacherCache:
    """A teacher cache opened for training, checked against the data it will be read with."""

    manifest: dict[str, Any]
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
            "num_blocks": data.train.shape[0],
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise LmdistillError(
                    f"teacher cache {path} does not match the training data: its {key} is {manifest.get(key)!r}, "
                    f"the data's is {value!r}; rebuild it with lmdistill cache-teacher on the same --data, "
                    "--seq-len and tokenizer"
                )
        ids, logprobs = [], []
        covered = 0
        for shard in manifest["shards"]:
            file = path / shard["file"]
            try:
                tensors = load_file(file)
            except Exception as exc:
                raise LmdistillError(f"teacher cache shard {file} is missing or corrupt: {exc}") from exc
            shape = (shard["num_blocks"], manifest["seq_len"], manifest["top_k"])
            if shard["first_block"] != covered or tuple(tensors["ids"].shape) != shape:
                raise LmdistillError(f"teacher cache shard {file} does not hold blocks the manifest says it does")
            ids.append(tensors["ids"])
            logprobs.append(tensors["logprobs"])
            covered += shard["num_blocks"]
        if covered != manifest["num_blocks"]:
            raise LmdistillError(f"teacher cache {path} covers {covered} of {manifest['num_blocks']} blocks")
        return cls(manifest, torch.cat(ids), torch.cat(logprobs))

    def lookup(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached top-k ids (int64) and log-probabilities of training blocks `blocks`, each [B, L, K]."""
        index = torch.as_tensor(blocks, dtype=torch.long)
        return self.ids[index].long(), self.logprobs[index]


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
    return write_cache(
        teacher.model,
        teacher.name,
        teacher.tokenizer,
        data,
        Path(config.out),
        top_k=config.top_k,
        batch_size=config.batch_size,
        precision=config.precision,
        progress=config.progress,
    )
