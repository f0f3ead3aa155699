"""The order in which training reads its blocks."""

from __future__ import annotations

import numpy as np
import torch


class DataOrder:
    """Which training blocks each micro-batch reads: a seeded permutation per epoch, a pure function of the position.

    Sample position p (counted over the whole run) is block `perm(p // N)[p % N]`, so resuming at a step needs no
    iterator state, and any split of a step's samples over micro-batches and processes reads the same set.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block indices of sample positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        for i, position in enumerate(range(start, start + count)):
            epoch = position // self.n_blocks
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n_blocks, generator=generator).numpy()
            out[i] = self._perm[position % self.n_blocks]
        return out
