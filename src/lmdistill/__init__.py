"""lmdistill: make a small language model out of a large one of the same vocabulary."""

__version__ = "0.1.0"
