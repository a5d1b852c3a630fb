"""Row-indexed reading of (N, H, W) arrays: the search's and evaluate's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Rows:
    """An (N, H, W) array (memmap) read at ``rows`` (None: all rows in order)."""

    array: np.ndarray
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.rows is None:
            return np.asarray(self.array[start:stop])
        r = self.rows[start:stop]
        if len(r) and r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
            return np.asarray(self.array[r[0] : r[-1] + 1])
        return np.asarray(self.array[r])


def as_rows(a: np.ndarray | Rows) -> Rows:
    """``a`` itself if already :class:`Rows`, else all of its rows in order."""
    return a if isinstance(a, Rows) else Rows(a)
