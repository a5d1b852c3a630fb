"""``masks.npz``: predicted masks of store slices (a configuration's, or pseudo-labels).

Format: ``np.savez_compressed`` with arrays ``index`` (int64 (n,), store indices) and
``masks`` (uint8 (n, H, W), 0/1). :func:`write_masks` writes it atomically,
:func:`read_masks` reads it (or a folder holding it) without unpickling; what ``export``
and pseudo-label training read (:func:`ensemblecam.io.export.load_slice_arrays`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ensemblecam.io import fsutil
from ensemblecam.io.export import load_slice_arrays

MASKS_FILE = "masks.npz"


def write_masks(path: str | os.PathLike[str], index: np.ndarray, masks: np.ndarray) -> Path:
    """Write ``masks.npz`` at ``path`` (temp name, then rename); parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh, index=np.asarray(index).astype(np.int64), masks=np.asarray(masks, np.uint8)
        )
    return path


def read_masks(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 (n,), masks (n, H, W)) of a ``masks.npz`` or a folder holding one; a
    missing file or array is one InputError line."""
    index, masks = load_slice_arrays(path, "masks")
    return index.astype(np.int64), masks
