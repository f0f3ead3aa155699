"""The machinery of the typed configs: type checks, range checks, per-command defaults of shared fields, YAML.

Every command config is a dataclass; `__post_init__` checks types (`check_types`) and ranges (`check_ranges`), so a
YAML file gets the same validation as the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lmdistill.errors import LmdistillError

T = TypeVar("T")


def flag(name: str) -> str:
    """The command-line flag of a field: ``max_steps`` -> ``--max-steps``."""
    return f"--{name.replace('_', '-')}"


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
            raise LmdistillError(f"{flag(f.name)}: {value!r} is not valid; expected {allowed}")


def check_required(config: Any, name: str, what: str) -> None:
    """Raise `LmdistillError` (``--NAME is required: WHAT``) when the field ``name`` is unset (None)."""
    if getattr(config, name) is None:
        raise LmdistillError(f"{flag(name)} is required: {what}")


def check_ranges(
    config: Any, names: Iterable[str], low: float, high: float | None = None, *, exclusive: bool = False
) -> None:
    """Raise `LmdistillError` for the first of the fields ``names`` outside its range (a None value is unset: valid).

    Args:
        config: a dataclass instance.
        names: the fields to check, in order.
        low: the lower bound (``--x must be at least LOW``; 0: ``non-negative``).
        high: with ``low``, the closed range ``[low, high]``; None: no upper bound.
        exclusive: the open range ``(low, high)``.
    """
    if high is None:
        text = "non-negative" if low == 0 else f"at least {low}"
    else:
        text = f"in ({low}, {high})" if exclusive else f"in [{low}, {high}]"
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if high is None:
            inside = value >= low
        else:
            inside = low < value < high if exclusive else low <= value <= high
        if not inside:
            raise LmdistillError(f"{flag(name)} must be {text}, got {value}")


def check_seeds(config: Any, names: Iterable[str]) -> None:
    """Raise `LmdistillError` unless each list field of ``names`` holds distinct non-negative seeds, at least one."""
    for name in names:
        seeds = getattr(config, name)
        if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
            raise LmdistillError(f"{flag(name)} must be distinct non-negative seeds, got {seeds}")


def override(*, help: dict[str, str] | None = None, **defaults: Any) -> Callable[[type[T]], type[T]]:
    """Class decorator, placed under `@dataclass`: inherited fields with this command's own default and/or help.

    The field keeps its base's type, flag and place among the options; only what is given changes. A list default
    becomes a fresh copy per instance.

    Args:
        help: field name -> this command's `--help` text of it.
        defaults: field name -> this command's default.
    """

    def apply(cls: type[T]) -> type[T]:
        annotations = inspect.get_annotations(cls)  # its own, a new dict
        for name in {**defaults, **(help or {})}:
            base = next(b for b in cls.__mro__[1:] if name in getattr(b, "__dataclass_fields__", {}))
            inherited = base.__dataclass_fields__[name]
            metadata = {**inherited.metadata, "help": help[name]} if help and name in help else inherited.metadata
            if name in defaults:
                value = defaults[name]
                kind = {"default_factory": lambda v=value: list(v)} if isinstance(value, list) else {"default": value}
            elif inherited.default_factory is not dataclasses.MISSING:
                kind = {"default_factory": inherited.default_factory}
            else:
                kind = {"default": inherited.default}
            setattr(cls, name, dataclasses.field(metadata=metadata, **kind))
            annotations[name] = typing.get_type_hints(base)[name]
        cls.__annotations__ = annotations
        return cls

    return apply


def fields_of(config: Any, *groups: type) -> dict[str, Any]:
    """The values of ``config``'s fields that the dataclasses ``groups`` (its bases) declare, by name."""
    return {f.name: getattr(config, f.name) for group in groups for f in dataclasses.fields(group)}


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
