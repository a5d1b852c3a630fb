"""``ensemblecam sanity``: the thesis's pipeline check on the user's own data.

A square of side ``marker_size`` (default: 1/6 of the slice) is planted in the top-left
corner of every lesion slice of a COPY of the store; a classifier is trained on the copy
with the training module, and the check passes when the CAM's peak (argmax of the map)
falls inside the marker for at least ``min_fraction`` of the marked lesion slices of the fold.

Marker intensity: ``marker_value="auto"`` (default) makes the square contrast with what it
covers, per slice and channel: with ``lo, hi`` the channel's minimum and maximum over the
store, the square is ``hi`` (bright) if the mean of the covered corner is below the
mid-range ``(lo + hi) / 2``, else ``lo`` (dark). The thesis's dark square is invisible on
data whose corners are already dark (brain MRI / CT background after min-max: corners are
0), so there the auto marker is bright. A number sets one fixed value for every slice.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ensemblecam import models
from ensemblecam.cam.engine import CamEngine
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.split import PARTS, get_fold
from ensemblecam.io.store import MANIFEST, SliceStore


@dataclass
class SanityResult:
    """Outcome: share of marked lesion slices whose CAM peak lies in the marker."""

    fraction: float
    n_slices: int
    passed: bool
    checkpoint: Path
    marker_values: tuple[float, ...] = ()  # distinct intensities planted


MarkerValue = float | Literal["auto"]


def auto_marker_values(images: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """Contrasting marker value per (row, channel), shape (len(rows), C).

    ``hi_c`` where ``mean(images[row, c, :size, :size]) < (lo_c + hi_c) / 2``, else ``lo_c``;
    ``lo_c, hi_c`` are channel c's minimum and maximum over all of ``images`` (N, C, H, W).
    """
    if images.ndim != 4:
        raise InputError(f"images of shape {images.shape}: expected (N, C, H, W)")
    lo = np.empty(images.shape[1], np.float64)
    hi = np.empty(images.shape[1], np.float64)
    for c in range(images.shape[1]):  # one channel at a time: bounded memory on big stores
        lo[c], hi[c] = float(np.min(images[:, c])), float(np.max(images[:, c]))
    corner = np.asarray(images[rows, :, :size, :size], dtype=np.float64).mean(axis=(2, 3))
    return np.where(corner < (lo + hi) / 2, hi, lo)


def parse_marker_value(value: str | float | None) -> MarkerValue:
    """``"auto"``/None -> ``"auto"``; a number (or its text) -> float; else InputError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    try:
        out = float(value)
    except ValueError:
        raise InputError(f"--marker-value {value!r}: expected 'auto' or a number") from None
    if not np.isfinite(out):
        raise InputError(f"--marker-value {value!r}: must be finite")
    return out


def plant_markers(
    src: Path, dst: Path, rows: np.ndarray, size: int, value: MarkerValue | None = "auto"
) -> np.ndarray:
    """Copy the store ``src`` to ``dst`` and fill ``images[rows, :, :size, :size]``.

    ``value`` is a number or ``"auto"`` (see :func:`auto_marker_values`; None means auto).
    Returns the values planted, shape (len(rows), C).
    """
    value = parse_marker_value(value)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST))
    images = np.load(dst / "images.npy", mmap_mode="r+")
    if value == "auto":
        fill = auto_marker_values(images, rows, size)
    else:
        fill = np.full((len(rows), images.shape[1]), value, np.float64)
    images[rows, :, :size, :size] = fill.astype(images.dtype)[:, :, None, None]
    images.flush()
    del images
    shutil.copy2(src / MANIFEST, dst / MANIFEST)  # manifest last: the copy is complete
    fsutil.write_owner_marker(dst, "sanity")
    return fill


def run_sanity(
    store: str | Path,
    work: str | Path,
    splits: str | Path | None = None,
    fold: int | str = 0,
    model: str = "resnet18",
    method: str = "gradcam",
    marker_size: int | None = None,
    marker_value: MarkerValue | str | None = "auto",
    min_fraction: float = 0.9,
    train_options: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> SanityResult:
    """Plant markers in a copy of ``store`` under ``work``, train, and check CAM peaks."""
    from ensemblecam.config import TrainConfig
    from ensemblecam.stages.train import train_classifier
    from ensemblecam.training.data import StoreDataset

    src = SliceStore.open(store)
    splits = Path(splits) if splits is not None else src.path / "splits.json"
    f = get_fold(splits, fold)
    idx = np.unique(np.concatenate([src.indices_for_cases(f.part(p)) for p in PARTS]))
    pos = idx[src.labels[idx] == 1]
    if pos.size == 0:
        raise InputError(f"{splits}: fold {f.name} has no lesion slices to mark")
    h, w = src.size
    size = marker_size or max(2, min(h, w) // 6)
    if not 1 <= size < min(h, w):
        raise InputError(f"--marker-size {size}: must be between 1 and {min(h, w) - 1}")
    work = Path(work)
    fsutil.check_not_input(work, [src.path, splits])
    marked = work / "store"
    fsutil.check_replaceable(marked, True, MANIFEST)  # never a folder ensemblecam did not write
    fsutil.check_replaceable(work / "run", True, "train.json")
    fill = plant_markers(src.path, marked, pos, size, parse_marker_value(marker_value))
    opts = {"epochs": 5, **(train_options or {})}
    cfg = TrainConfig(
        store=marked, splits=splits, fold=fold, model=model, out=work / "run", force=True, **opts
    )
    run = train_classifier(cfg, progress=progress)
    if run is None:
        raise InputError(f"{work / 'run'}: training did not finish")
    net, _ = models.load_checkpoint(run / "best.pt")
    ms = SliceStore.open(marked)
    engine = CamEngine(net, [method])
    hits = 0
    for start in range(0, len(pos), 64):
        rows = pos[start : start + 64]
        ds = StoreDataset(ms, rows)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        maps = engine(x).maps[method].flatten(1)
        peak = maps.argmax(dim=1)
        py, px = peak // w, peak % w
        hits += int(((py < size) & (px < size) & (maps.amax(1) > 0)).sum())
    frac = hits / len(pos)
    values = tuple(float(v) for v in np.unique(fill))
    return SanityResult(frac, len(pos), frac >= min_fraction, run / "best.pt", values)
