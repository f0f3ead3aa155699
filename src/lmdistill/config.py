"""Typed configs: the only schema. A YAML file is a serialized instance; the CLI builds flags from the fields.

Each field's `help` becomes its `--help` text. `__post_init__` checks types and ranges, so a YAML file gets the same
validation as the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmdistill.errors import LmdistillError
from lmdistill.init.build import InitMethod
from lmdistill.init.guide import PCAMode


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, annotation)


def check_types(config: Any) -> None:
    """Raise `LmdistillError` naming the first field whose value does not match its annotation.

    Args:
        config: a dataclass instance.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else hints[f.name]
            raise LmdistillError(f"--{f.name.replace('_', '-')}: {value!r} is not valid; expected {allowed}")


def to_yaml(config: Any) -> str:
    """The config as a YAML mapping of its fields, readable back with `--config`."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def load_yaml(path: str | Path, config_class: type) -> dict[str, Any]:
    """Read a YAML config file into a dict of `config_class` fields.

    Args:
        path: the YAML file.
        config_class: the dataclass whose fields the file may set.

    Returns:
        The mapping (validated later, when the dataclass is built).

    Raises:
        LmdistillError: missing file, invalid YAML, not a mapping, or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise LmdistillError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LmdistillError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmdistillError(f"config file {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LmdistillError(f"config file {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    return data


@dataclass
class InitConfig:
    """`lmdistill init`: build a student from a teacher and write it as a Hugging Face directory."""

    teacher: str = field(
        default="default",
        metadata={"help": "teacher: a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)"},
    )
    method: InitMethod = field(
        default="guide",
        metadata={"help": "initialization: random, weight-selection, guide (block 1 + embeddings) or guide-all"},
    )
    hidden_size: int | None = field(default=None, metadata={"help": "student width (default: the teacher's)"})
    num_layers: int | None = field(default=None, metadata={"help": "student blocks (default: the teacher's)"})
    num_heads: int | None = field(default=None, metadata={"help": "student query heads (default: the teacher's)"})
    num_kv_heads: int | None = field(
        default=None, metadata={"help": "student key/value heads (default: the teacher's query heads per KV head)"}
    )
    intermediate_size: int | None = field(default=None, metadata={"help": "student MLP width (default: the teacher's)"})
    head_dim: int | None = field(default=None, metadata={"help": "student head width (default: the teacher's)"})
    pca: PCAMode = field(
        default="uncentered", metadata={"help": "GUIDE projection: SVD of the embeddings, or PCA of centered ones"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random initialization of what is not transferred"})
    out: str | None = field(default=None, metadata={"help": "output directory (required)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.out is None:
            raise LmdistillError("--out is required: the directory to write the student to")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LmdistillError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.seed < 0:
            raise LmdistillError(f"--seed must be non-negative, got {self.seed}")

    def student_sizes(self) -> dict[str, int | None]:
        """The shape flags, as keyword arguments of `derive_student_shape`."""
        names = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim")
        return {name: getattr(self, name) for name in names}
