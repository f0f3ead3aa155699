"""Top-k teacher distribution cache: run the teacher once over the training blocks, distill from disk afterwards.

Format (version 2), one directory:

- `manifest.json`: `format` ("lmdistill-teacher-cache"), `version` (2), `teacher` (name), `teacher_fingerprint`
  (sha256 of the teacher's config and weights, as loaded), `teacher_dtype` ("fp32", "bf16" or "int8": what the
  teacher ran in) and `teacher_dtype_reason`, `tokenizer_fingerprint`, `vocab_size`, `data_fingerprint` (of the
  packed data it was computed on), `data_num_blocks` (training blocks in that data), `seq_len`, `top_k`,
  `temperature` (always 1), `num_blocks` (blocks cached: all of the data's, or the ones a run of known length
  reads), and `shards`: a list of `{"file", "num_blocks"}`.
- `shard-NNNNNN.safetensors`, each holding `n` training blocks of `L` tokens:
  `blocks` int64 [n] (their indices among the data's training blocks),
  `ids` int32 [n, L, K] (the teacher's top-K next-token ids at each position, most probable first),
  `logprobs` float32 [n, L, K] (their log-probabilities at temperature 1) and `tail` float32 [n, L]
  (1 - the sum of those probabilities: the mass of the other V - K tokens).
- With hidden states (`cache-teacher --hidden-student`; `lmdistill.hidden`), the manifest also has `hidden`:
  `{"width": d_S, "student_num_layers": L_S, "layers": [{"student", "teacher"}], "projection": "uncentered",
  "projection_sha256", "dtype": "float16"}`, and each shard `hidden` float16 [n, L, H, d_S]: the teacher's residual
  stream after each of the H teacher blocks of `layers`, times the GUIDE projection M. A manifest without `hidden` is
  a cache without them (every cache written before they existed).

Position t of a block holds the teacher's distribution over the token at t + 1. While a build runs, its manifest is
`manifest.incomplete.json`; `manifest.json` replaces it after the last shard. Shards are written atomically, so an
interrupted build continues where it stopped with `resume` (`cache-teacher --resume`), which first checks that it is
the same build.

Launch: `lmdistill cache-teacher --teacher default --seq-len 256 --top-k 64 --out runs/teacher-cache`
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmdistill.data.packed import PackedData, tokenizer_fingerprint
from lmdistill.errors import LmdistillError
from lmdistill.hidden import (
    PROJECTION,
    HiddenSpec,
    decoder_layers,
    layer_pairs,
    projection,
    teacher_states,
)
from lmdistill.hidden import fingerprint as projection_fingerprint
from lmdistill.models.teacher_dtype import head_weight
from lmdistill.storage import staged

log = logging.getLogger(__name__)

FORMAT, VERSION = "lmdistill-teacher-cache", 2
INCOMPLETE = "manifest.incomplete.json"
SHARD_FILE = re.compile(r"shard-\d{6}\.safetensors")
_NAMES = rf"manifest\.json|{re.escape(INCOMPLETE)}|{SHARD_FILE.pattern}"
CACHE_FILE = re.compile(rf"(?:{_NAMES})|\.(?:{_NAMES})\.partial-[0-9a-f]{{32}}")  # with `staged`'s leftovers
# what must agree for --resume, the most telling first (a different seq_len also changes the data fingerprint)
RESUME_KEYS = (
    "format", "version", "seq_len", "top_k", "tokenizer_fingerprint", "vocab_size", "data_fingerprint",
    "data_num_blocks", "teacher_fingerprint", "teacher_dtype", "temperature", "num_blocks", "hidden", "shards",
)  # fmt: skip
_RESUME_HINTS = {"teacher_fingerprint": " (other teacher weights)", "data_fingerprint": " (other --data text)",
                 "num_blocks": " (another --samples or --seed)", "hidden": " (another --hidden-student)",
                 "teacher_dtype": " (another --teacher-dtype)"}  # fmt: skip


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
    teacher_dtype: tuple[str, str] = ("fp32", "set to fp32"),
    fingerprint: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    hidden: HiddenSpec | None = None,
) -> dict[str, Any]:
    """Compute and store the teacher's top-k next-token distribution on training blocks (and, for `hidden`, its
    projected hidden states, in the same forward passes).

    A non-empty `out` is refused unless `resume` (continue the build it holds: refused unless it has the same teacher
    fingerprint and dtype, data, seq_len, top_k, blocks and hidden states) or `overwrite` (delete its cache files
    first: refused if it holds any other file). Every refusal comes before the teacher's first forward pass.

    Args:
        teacher: the teacher causal LM (eval mode), in the dtype it runs in (see `to_teacher_dtype`).
        teacher_name: recorded in the manifest.
        tokenizer: the teacher's tokenizer (its fingerprint must match the data's).
        data: packed data; its training blocks are cached.
        out: the cache directory.
        top_k: K, number of token ids kept per position (1 <= K <= V).
        blocks: indices of the training blocks to cache, distinct (default: all, in order).
        batch_size: blocks per teacher forward pass.
        shard_blocks: blocks per shard file.
        teacher_dtype: the dtype `teacher` runs in and why (`to_teacher_dtype`), recorded in the manifest.
        fingerprint: `model_fingerprint` of the teacher as loaded, before `to_teacher_dtype` (default: of `teacher`,
            which must then be float).
        progress: show a progress bar.
        resume: continue the build in a non-empty `out`, reusing its shards.
        overwrite: replace the cache in a non-empty `out`.
        hidden: the student to store hidden-state targets for (`lmdistill.hidden`), or None.

    Returns:
        The manifest.
    """
    blocks = _blocks_to_cache(teacher, tokenizer, data, top_k, blocks)
    targets = _hidden_targets(teacher, hidden)
    existing = check_out(out, resume=resume, overwrite=overwrite)
    planned = {
        f"shard-{first // shard_blocks:06d}.safetensors": blocks[first : first + shard_blocks]
        for first in range(0, len(blocks), shard_blocks)
    }
    record = {"teacher": teacher_name, "teacher_fingerprint": fingerprint or model_fingerprint(teacher)}
    record.update(teacher_dtype=teacher_dtype[0], teacher_dtype_reason=teacher_dtype[1])
    manifest = _manifest(teacher, record, data, top_k, planned)
    if targets is not None:
        manifest["hidden"] = targets[0]
    if existing and resume:
        _check_resumable(out, manifest, planned)
    elif existing:  # overwrite: the manifest goes first, so that no half-deleted cache looks whole
        for path in sorted(existing, key=lambda path: path.name != "manifest.json"):
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    with staged(out / INCOMPLETE, directory=False) as staging:
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
    bar = tqdm(total=len(blocks), unit="block", desc="teacher cache", disable=not progress)
    for name, indices in planned.items():
        if _shard_blocks(out / name) == indices.tolist():  # written by the build this one resumes
            bar.update(len(indices))
            continue
        tensors = _shard(teacher, data, indices, top_k=top_k, batch_size=batch_size, bar=bar, hidden=targets)
        with staged(out / name, directory=False) as staging:
            save_file(tensors, staging)
    bar.close()
    with staged(out / "manifest.json", directory=False) as staging:
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / INCOMPLETE).unlink()
    return manifest


def _blocks_to_cache(
    teacher: torch.nn.Module, tokenizer: Any, data: PackedData, top_k: int, blocks: np.ndarray | None
) -> np.ndarray:
    """The training blocks `write_cache` caches, after refusing a top-k outside the vocabulary, another tokenizer
    than the data's, or blocks that are not distinct training blocks of the data."""
    vocab = head_weight(teacher).shape[0]
    if not 1 <= top_k <= vocab:
        raise LmdistillError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {top_k}")
    if tokenizer_fingerprint(tokenizer) != data.manifest["tokenizer_fingerprint"]:
        raise LmdistillError("the teacher's tokenizer is not the one the data was tokenized with")
    n_data_blocks = data.train.shape[0]
    blocks = np.arange(n_data_blocks) if blocks is None else np.asarray(blocks, dtype=np.int64)
    if len(np.unique(blocks)) != len(blocks) or blocks.min(initial=0) < 0 or blocks.max(initial=0) >= n_data_blocks:
        raise LmdistillError(f"blocks to cache must be distinct training block indices below {n_data_blocks}")
    return blocks


def _hidden_targets(teacher: torch.nn.Module, hidden: HiddenSpec | None) -> tuple[dict[str, Any], torch.Tensor] | None:
    """The manifest's `hidden` record of the targets of a student `hidden` and their projection M, or None."""
    if hidden is None:
        return None
    m = projection(teacher, hidden.width)
    pairs = layer_pairs(hidden.num_layers, len(decoder_layers(teacher)))
    record = {
        "width": hidden.width,
        "student_num_layers": hidden.num_layers,
        "layers": [{"student": student, "teacher": block} for student, block in pairs],
        "projection": PROJECTION,
        "projection_sha256": projection_fingerprint(m),
        "dtype": "float16",
    }
    return record, m


def _manifest(
    teacher: torch.nn.Module,
    teacher_record: dict[str, str],
    data: PackedData,
    top_k: int,
    planned: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The manifest of a cache of the `planned` shards (file name -> training blocks) of `data` (module docstring),
    with the teacher's `teacher_record` (name, fingerprint, dtype and its reason)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        **teacher_record,
        "tokenizer_fingerprint": data.manifest["tokenizer_fingerprint"],
        "vocab_size": head_weight(teacher).shape[0],
        "data_fingerprint": data.fingerprint,
        "data_num_blocks": data.train.shape[0],
        "seq_len": data.train.shape[1],
        "top_k": top_k,
        "temperature": 1.0,
        "num_blocks": sum(len(indices) for indices in planned.values()),
        "shards": [{"file": name, "num_blocks": len(indices)} for name, indices in planned.items()],
    }


def _shard(
    teacher: torch.nn.Module,
    data: PackedData,
    indices: np.ndarray,
    *,
    top_k: int,
    batch_size: int,
    bar: tqdm,
    hidden: tuple[dict[str, Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the shard of training blocks `indices` (see the module docstring), `batch_size` blocks per
    teacher forward pass in the teacher's own dtype, with the `hidden` targets (`_hidden_targets`) when given;
    called under `torch.no_grad()`."""
    device = next(teacher.parameters()).device
    seq_len = data.train.shape[1]
    ids = torch.empty(len(indices), seq_len, top_k, dtype=torch.int32)
    logprobs = torch.empty(len(indices), seq_len, top_k, dtype=torch.float32)
    blocks = [] if hidden is None else [pair["teacher"] for pair in hidden[0]["layers"]]
    states = torch.empty(len(indices), seq_len, len(blocks), 0 if hidden is None else hidden[1].shape[1])
    for start in range(0, len(indices), batch_size):
        rows = slice(start, min(start + batch_size, len(indices)))
        block = torch.as_tensor(data.train[indices[rows]].astype(np.int64), device=device)
        if hidden is None:
            logits = teacher(input_ids=block).logits  # [b, L, V]
        else:
            output, projected = teacher_states(teacher, block, blocks, hidden[1])  # projected: [b, L, H, d_S]
            logits, states[rows] = output.logits, projected.cpu()
        top = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # [b, L, K]
        ids[rows], logprobs[rows] = top.indices.int().cpu(), top.values.cpu()
        bar.update(rows.stop - rows.start)
    tail = (1 - logprobs.exp().sum(-1)).clamp_min(0)  # [n, L]
    tensors = {"blocks": torch.as_tensor(indices), "ids": ids, "logprobs": logprobs, "tail": tail}
    if hidden is not None:
        tensors["hidden"] = states.half()
        if not torch.isfinite(tensors["hidden"]).all():
            raise LmdistillError("the teacher's projected hidden states overflow float16: they cannot be cached")
    return tensors


def check_out(out: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse a non-empty cache directory unless `resume` or `overwrite`, and with `overwrite` one holding other files.

    Args:
        out: the cache directory (it need not exist).
        resume: the build continues the one in `out`.
        overwrite: the build replaces the cache in `out`.

    Returns:
        The entries of `out` (with `overwrite`, all of them cache files, see `CACHE_FILE`).
    """
    if out.exists() and not out.is_dir():
        raise LmdistillError(f"--out {out} is a file, not a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not (resume or overwrite):
        raise LmdistillError(
            f"--out {out} is not empty: pass --resume to continue the teacher cache build in it, --overwrite to "
            "replace it, or another --out"
        )
    if overwrite:
        foreign = [path.name for path in entries if not (path.is_file() and CACHE_FILE.fullmatch(path.name))]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise LmdistillError(
                f"--overwrite deletes only a teacher cache's manifests and shards, but {out} also holds "
                f"{foreign[0]!r}{more}: choose another --out"
            )
    return entries


def _check_resumable(out: Path, manifest: dict[str, Any], planned: dict[str, np.ndarray]) -> None:
    """Refuse to resume unless `out` holds a build of exactly `manifest` whose shards hold the `planned` blocks."""
    record = out / "manifest.json" if (out / "manifest.json").is_file() else out / INCOMPLETE
    try:
        previous = json.loads(record.read_text())
    except FileNotFoundError:
        raise LmdistillError(
            f"--resume: {out} holds no teacher cache manifest ({INCOMPLETE} or manifest.json), so nothing to "
            "continue; pass --overwrite to replace its cache files, or another --out"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LmdistillError(f"--resume: {record} is unreadable ({exc}); pass --overwrite to start afresh") from exc
    for key in RESUME_KEYS:
        old = previous.get(key) if isinstance(previous, dict) else None
        if old != manifest.get(key):
            raise LmdistillError(
                f"--resume: the build in {out} has another {key} ({_brief(old)} there, {_brief(manifest.get(key))} "
                f"now){_RESUME_HINTS.get(key, '')}; pass --overwrite to start afresh, or another --out"
            )
    for path in out.iterdir():
        if SHARD_FILE.fullmatch(path.name):
            held = _shard_blocks(path)  # None: unreadable, computed again
            if path.name not in planned or held not in (None, planned[path.name].tolist()):
                raise LmdistillError(
                    f"--resume: {path} holds other training blocks than this build caches (another --samples or "
                    "--seed?); pass --overwrite to start afresh"
                )


def _brief(value: Any) -> str:
    """A manifest value short enough for a one-line message."""
    if isinstance(value, list):
        return f"{len(value)} shards"
    if isinstance(value, dict):  # hidden
        return f"width {value.get('width')}, {value.get('student_num_layers')} student blocks"
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else repr(value)


def _shard_blocks(file: Path) -> list[int] | None:
    """The block indices an existing shard holds, or None when there is no readable shard."""
    try:
        with safe_open(file, framework="pt") as shard:
            return shard.get_tensor("blocks").tolist()
    except Exception:
        return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the finished teacher cache in `path`.

    Raises:
        LmdistillError: no cache there, an interrupted build, or a manifest that is corrupt or of another format.
    """
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        if (path / INCOMPLETE).is_file():
            raise LmdistillError(
                f"teacher cache {path} is incomplete: its build was interrupted; finish it with lmdistill "
                "cache-teacher --resume"
            )
        raise LmdistillError(f"no teacher cache in {path}: manifest.json is missing (run lmdistill cache-teacher)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise LmdistillError(f"teacher cache manifest {manifest_path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise LmdistillError(f"{path} is not a version-{VERSION} lmdistill teacher cache")
    _check_manifest(manifest_path, manifest)
    return manifest


@dataclass
class TeacherCache:
    """A teacher cache opened for training, checked against the data it will be read with."""

    manifest: dict[str, Any]
    slots: torch.Tensor  # [data blocks] int64: row of each training block in ids/logprobs, -1 where not cached
    ids: torch.Tensor  # [N, L, K] int32
    logprobs: torch.Tensor  # [N, L, K] float32
    hidden: torch.Tensor | None = None  # [N, L, H, d_S] float16, where the manifest has `hidden`

    @classmethod
    def open(cls, path: Path, data: PackedData, vocab_size: int) -> TeacherCache:
        """Read a cache and refuse it unless it was computed on exactly this data, tokenizer and vocabulary, and
        every shard holds what the format allows (see `_check_shard`).

        Args:
            path: the cache directory.
            data: the packed data of the training run.
            vocab_size: rows of the student's output head, the ids the cached distributions may name.

        Returns:
            The cache, loaded into memory.

        Raises:
            LmdistillError: missing or corrupt files, or a manifest that does not match the data or the vocabulary.
        """
        manifest = read_manifest(path)
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
        if manifest["vocab_size"] != vocab_size:
            raise LmdistillError(
                f"teacher cache {path} holds distributions over {manifest['vocab_size']} token ids, but the student's "
                f"output head has {vocab_size}: build it with the teacher the student was made from"
            )
        blocks, ids, logprobs, hidden = [], [], [], []
        for shard in manifest["shards"]:
            file = path / shard["file"]
            try:
                tensors = load_file(file)
            except Exception as exc:
                raise LmdistillError(f"teacher cache shard {file} is missing or corrupt: {exc}") from exc
            _check_shard(file, tensors, shard["num_blocks"], manifest)
            blocks.append(tensors["blocks"])
            ids.append(tensors["ids"])
            logprobs.append(tensors["logprobs"])
            hidden.append(tensors.get("hidden"))
        cached = torch.cat(blocks)
        if len(cached) != manifest["num_blocks"] or len(cached.unique()) != len(cached):
            raise LmdistillError(
                f"teacher cache {path} holds {len(cached)} blocks, not the {manifest['num_blocks']} "
                "distinct blocks its manifest lists"
            )
        slots = torch.full((data.train.shape[0],), -1, dtype=torch.long)
        slots[cached] = torch.arange(len(cached))
        states = torch.cat(hidden) if "hidden" in manifest else None
        return cls(manifest, slots, torch.cat(ids), torch.cat(logprobs), states)

    def missing(self, blocks: np.ndarray) -> np.ndarray:
        """The distinct training blocks among `blocks` that the cache does not hold."""
        unique = np.unique(blocks)
        return unique[self.slots[torch.as_tensor(unique)].numpy() < 0]

    def lookup(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached top-k ids (int64) and log-probabilities of training blocks `blocks`, each [B, L, K]."""
        rows = self._rows(blocks)
        return self.ids[rows].long(), self.logprobs[rows]

    def states(self, blocks: np.ndarray) -> torch.Tensor:
        """The cached hidden-state targets of training blocks `blocks`, float16 [B, L, H, d_S]."""
        return self.hidden[self._rows(blocks)]

    def _rows(self, blocks: np.ndarray) -> torch.Tensor:
        rows = self.slots[torch.as_tensor(blocks, dtype=torch.long)]
        if (rows < 0).any():
            raise LmdistillError(f"the teacher cache does not hold training blocks {self.missing(blocks).tolist()}")
        return rows


def _check_manifest(file: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose counts, vocabulary, fingerprint or shard list are missing or of the wrong kind."""
    for key in ("vocab_size", "seq_len", "top_k", "num_blocks", "data_num_blocks"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LmdistillError(f"teacher cache manifest {file} is malformed: {key} is {value!r}, not a count >= 1")
    if manifest["top_k"] > manifest["vocab_size"]:
        raise LmdistillError(f"teacher cache manifest {file} is malformed: top_k exceeds vocab_size")
    if not isinstance(manifest.get("teacher_fingerprint"), str):
        raise LmdistillError(f"teacher cache manifest {file} is malformed: it has no teacher_fingerprint")
    _check_hidden_record(file, manifest)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(shard, dict)
        and isinstance(shard.get("file"), str)
        and shard["file"] not in ("", "..")
        and Path(shard["file"]).name == shard["file"]
        and isinstance(shard.get("num_blocks"), int)
        and shard["num_blocks"] >= 1
        for shard in shards
    ):
        raise LmdistillError(
            f"teacher cache manifest {file} is malformed: shards must list {{file, num_blocks}} entries naming files "
            "in the cache directory, each of at least one block"
        )


def _check_hidden_record(file: Path, manifest: dict[str, Any]) -> None:
    """Refuse a `hidden` record (when there is one) that is not the format's (module docstring)."""
    if "hidden" not in manifest:
        return
    record = manifest["hidden"]

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not (
        isinstance(record, dict)
        and count(record.get("width"))
        and count(record.get("student_num_layers"))
        and isinstance(record.get("layers"), list)
        and record["layers"]
        and all(
            isinstance(pair, dict) and count(pair.get("student")) and count(pair.get("teacher"))
            for pair in record["layers"]
        )  # fmt: skip
        and record.get("projection") == PROJECTION
        and isinstance(record.get("projection_sha256"), str)
        and record.get("dtype") == "float16"
    ):
        raise LmdistillError(
            f"teacher cache manifest {file} is malformed: hidden must hold width, student_num_layers, layers "
            f"[{{student, teacher}}], projection {PROJECTION!r}, projection_sha256 and dtype 'float16'"
        )


def _check_shard(file: Path, tensors: dict[str, torch.Tensor], n: int, manifest: dict[str, Any]) -> None:
    """Refuse a shard unless its tensors have the format's dtypes, the shapes of `n` blocks of the manifest's
    seq_len and top_k, block indices among the data's training blocks, ids in the vocabulary, finite log-probabilities
    <= 0, tails in [0, 1] and, where the manifest has `hidden`, finite hidden states of its layers and width."""
    length, k, vocab = manifest["seq_len"], manifest["top_k"], manifest["vocab_size"]
    data_blocks = manifest["data_num_blocks"]
    layout = {
        "blocks": (torch.int64, (n,), lambda lo, hi: lo >= 0 and hi < data_blocks, f"in [0, {data_blocks})"),
        "ids": (torch.int32, (n, length, k), lambda lo, hi: lo >= 0 and hi < vocab, f"in [0, {vocab})"),
        "logprobs": (torch.float32, (n, length, k), lambda lo, hi: lo > -math.inf and hi <= 0, "finite and <= 0"),
        "tail": (torch.float32, (n, length), lambda lo, hi: lo >= 0 and hi <= 1, "in [0, 1]"),
    }
    if "hidden" in manifest:
        hidden = manifest["hidden"]
        shape = (n, length, len(hidden["layers"]), hidden["width"])
        layout["hidden"] = (torch.float16, shape, lambda lo, hi: math.isfinite(lo) and math.isfinite(hi), "finite")
    for name, (dtype, shape, valid, rule) in layout.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            found = "missing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
            raise LmdistillError(
                f"teacher cache shard {file}: {name} is {found}, where the manifest implies {dtype} {list(shape)}; "
                "rebuild the cache with lmdistill cache-teacher --overwrite"
            )
        lo, hi = (value.item() for value in torch.aminmax(tensor))
        if not valid(lo, hi):  # NaN fails every comparison
            raise LmdistillError(
                f"teacher cache shard {file}: {name} range from {lo} to {hi}, where they must be {rule}; rebuild "
                "the cache with lmdistill cache-teacher --overwrite"
            )
