"""Text data: the built-in held-out sample (corpora and task datasets join here)."""

from __future__ import annotations

from importlib.resources import files


def builtin_sample_text() -> str:
    """A short passage of plain modern English prose (about 900 tokens) written for this project.

    It gives every install a fixed held-out text for quick checks such as the step-0 loss of `lmdistill init`.
    It is far too small for conclusions about training: use a real held-out split for that.
    """
    return files("lmdistill.data").joinpath("sample.txt").read_text(encoding="utf-8")
