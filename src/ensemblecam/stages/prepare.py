"""Volumes -> 2-D slices in a slice store (``ensemblecam prepare``).

Per case: every modality and the seg are reoriented to RAS+ canonical
(``nibabel.as_closest_canonical``); slice ``s`` is ``moveaxis(volume, axis, 0)[s]``
and the stored image is the window ``[y0:y1, x0:x1]`` of that slice (zero padding
where the window leaves the slice; no resampling ever). See :mod:`ensemblecam.io.store`
for the format.

Normalisation (per channel, computed on the raw voxels):

- ``minmax_slice`` (paper): ``(x - min) / (max - min)`` over the full canonical slice
  (background included) before cropping; a constant slice gives zeros.
- ``zscore_volume``: ``(x - mean) / std`` with mean and std over the volume's non-zero
  voxels (std 0 -> 1).
- ``percentile``: ``clip((x - p_lo) / (p_hi - p_lo), 0, 1)`` with the volume's
  percentiles; ``p_hi == p_lo`` gives zeros.
- ``ct_window``: the radiological display window of level ``L`` and width ``W`` (HU):
  ``clip((x - (L - W/2)) / W, 0, 1)``. Default L50 W400 (-150..250 HU), the standard
  abdominal soft-tissue window: fat, soft tissue, enhanced kidney and their lesions keep
  their contrast, air and bone saturate. Fixed in HU, so identical for every scan.

Default per layout (:data:`ensemblecam.io.layouts.DEFAULT_NORMALISE`): ``kits``
``ct_window``, the others ``percentile`` (per volume; the paper's ``minmax_slice`` is
per slice, and its configs keep it).

Crops (windows are per case, the same on every slice):

- ``none``: the full slice (all cases must then share the slice size).
- ``fixed``: the box ``y0,y1,x0,x1`` (paper: 56,184,56,184).
- ``bbox``: a ``crop_size`` window centred on the case's foreground bounding box (union
  over all slices). Foreground = voxels of the first channel above its background:
  ``> -500`` HU for a channel named ``ct``, else ``> min`` of the volume. Default size:
  the largest bounding box over the cases rounded up to a multiple of 8 (this needs one
  extra read of the first channel of every case before the main pass).
- ``kidney`` (thesis): the body midline is the centre of the foreground's extent along
  the left-right axis (canonical axis 0, which must be in the slice plane); per half, a
  ``crop_size`` window (default 150x150) centred on the centroid, over the whole volume,
  of that half's kidney voxels (seg label 1 or a lesion label), or on the centre of the
  half's body extent if the half has no kidney (or the data set has no masks). Two rows
  per slice, part ``left`` (low canonical x = patient's left) then ``right``.

Slice label: ``lesion_fraction > min_lesion_fraction`` where ``lesion_fraction`` = merged
lesion pixels in the window / window pixels (so with the default 0, any lesion voxel).
With a labels CSV (``case,slice,label``) the labels of every slice come from the CSV. Seg
files are then optional: the cases that have one (and ``masks`` on) keep their masks
(``has_mask`` 1, ``lesion_fraction`` from the mask; used to calibrate and to score), the
others have ``lesion_fraction`` NaN and ``has_mask`` 0. The store has ``masks.npy`` if any
case has a mask (zeros for the others).

Resume: the store is built in ``.<out>.partial``; the arrays are preallocated there
(``np.lib.format.open_memmap``) and each finished case is recorded in ``done/<case>.json``.
A rerun with identical settings and unchanged input files skips the finished cases; any
difference starts over.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import shutil
import signal
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from ensemblecam import progress as progress_out
from ensemblecam.config import PrepareConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.layouts import (
    DEFAULT_LESION_LABELS,
    DEFAULT_NORMALISE,
    KIDNEY_LABEL,
    Case,
    Discovery,
    discover,
)
from ensemblecam.io.store import (
    MANIFEST,
    STORE_FORMAT,
    STORE_VERSION,
    UNKNOWN_LABEL,
    write_slice_table,
)

KIDNEY_DEFAULT_SIZE = (150, 150)
CT_BODY_HU = -500.0
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    gzip.BadGzipFile,
    nib.filebasedimages.ImageFileError,
)


# ----------------------------------------------------------------------------- arrays


def minmax_slices(x: np.ndarray) -> np.ndarray:
    """Min-max scale each 2-D slice of ``x`` (..., H, W) to [0, 1]; constant -> 0."""
    lo = x.min(axis=(-2, -1), keepdims=True)
    rng = x.max(axis=(-2, -1), keepdims=True) - lo
    out = np.zeros_like(x, dtype=np.float32)
    np.divide(x - lo, rng, out=out, where=np.broadcast_to(rng > 0, x.shape))
    return out


def minmax_slices_(x: np.ndarray) -> None:
    """In-place :func:`minmax_slices` of a float array."""
    lo = x.min(axis=(-2, -1), keepdims=True)
    rng = x.max(axis=(-2, -1), keepdims=True) - lo
    x -= lo
    x *= np.divide(1.0, rng, out=np.zeros_like(rng), where=rng > 0)


def zscore_nonzero(v: np.ndarray) -> np.ndarray:
    """``(v - mean) / std`` with mean, std over the non-zero voxels of ``v`` (std 0 -> 1)."""
    nz = v[v != 0]
    mean = float(nz.mean()) if nz.size else 0.0
    std = float(nz.std()) if nz.size else 1.0
    return ((v - mean) / (std if std > 0 else 1.0)).astype(np.float32)


def percentile_clip(v: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """``clip((v - p_lo) / (p_hi - p_lo), 0, 1)``; ``p_hi == p_lo`` gives zeros."""
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    if hi <= lo:
        return np.zeros_like(v, dtype=np.float32)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def ct_window(v: np.ndarray, level: float, width: float) -> np.ndarray:
    """Display window in HU: ``clip((v - (level - width / 2)) / width, 0, 1)`` (float32)."""
    lo = level - width / 2.0
    return np.clip((v - np.float32(lo)) / np.float32(width), 0.0, 1.0).astype(np.float32)


def crop_pad(x: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Window ``[y0:y1, x0:x1]`` of the last two axes of ``x``, zero outside ``x``."""
    h, w = x.shape[-2:]
    if (y0, y1, x0, x1) == (0, h, 0, w):
        return x
    out = np.zeros((*x.shape[:-2], y1 - y0, x1 - x0), dtype=x.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy0 < sy1 and sx0 < sx1:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = x[..., sy0:sy1, sx0:sx1]
    return out


def centred_window(cy: float, cx: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer window ``(y0, y1, x0, x1)`` of ``size`` centred on ``(cy, cx)``."""
    h, w = size
    y0 = math.floor(cy - h / 2 + 0.5)
    x0 = math.floor(cx - w / 2 + 0.5)
    return y0, y0 + h, x0, x0 + w


def bbox_2d(fg: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, y1, x0, x1)`` (end exclusive) of a 2-D boolean array."""
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def foreground(volume: np.ndarray, channel: str) -> np.ndarray:
    """Foreground voxels: ``> -500`` HU for CT, else above the volume's minimum."""
    if channel == "ct":
        return volume > CT_BODY_HU
    return volume > volume.min()


def kidney_windows(
    body2d: np.ndarray, kidney: np.ndarray | None, size: tuple[int, int]
) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Left/right windows of the thesis's kidney crop.

    ``body2d`` (H, W): foreground projected over the slices; ``kidney`` (S, H, W) kidney
    voxels (or None). The midline splits dim 0 (canonical left-right axis); each window is
    centred on its half's kidney centroid, else on the centre of the half's body extent.
    """
    h, w = body2d.shape
    box = bbox_2d(body2d) or (0, h, 0, w)
    mid = (box[0] + box[1]) // 2
    cx_body = (box[2] + box[3]) / 2
    counts = kidney.sum(axis=0, dtype=np.float64) if kidney is not None else None
    out = []
    for part, (a, b) in (("left", (box[0], mid)), ("right", (mid, box[1]))):
        cy, cx = (a + b) / 2, cx_body
        if counts is not None:
            half = np.zeros_like(counts)
            half[a:b] = counts[a:b] if b > a else 0
            total = half.sum()
            if total > 0:
                yy, xx = np.indices(half.shape)
                cy, cx = float((yy * half).sum() / total), float((xx * half).sum() / total)
        out.append((part, centred_window(cy, cx, size)))
    return out


# ----------------------------------------------------------------------------- planning


@dataclass
class CasePlan:
    """Everything known about a case before its voxels are read."""

    name: str
    images: dict[str, str]
    seg: str | None
    volume_index: dict[str, int]
    shape: list[int]
    affine: list[list[float]]
    ornt: list[list[float]]
    canonical_shape: list[int]
    slices: list[int]
    offset: int = 0
    n_rows: int = 0
    windows: list[tuple[str, tuple[int, int, int, int]]] | None = None
    csv_labels: dict[int, int] | None = None
    fingerprint: list[Any] = field(default_factory=list)


def _load_header(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: unreadable NIfTI ({exc})") from exc


def _spatial(
    img: Any, path: Path, volume_index: int | None, mod: str = ""
) -> tuple[tuple[int, ...], Any]:
    """Spatial shape and affine; a 4-D file (MSD) must hold channel ``volume_index``."""
    shape = tuple(int(v) for v in img.shape)
    if volume_index is not None and len(shape) == 4:
        if volume_index >= shape[3]:
            raise InputError(
                f"{path}: has {shape[3]} channels (shape {list(shape)}), no "
                f"channel {volume_index} ({mod or 'the modality asked for'})"
            )
        return shape[:3], img.affine
    if volume_index is not None and volume_index > 0 and len(shape) == 3:
        raise InputError(
            f"{path}: has 1 channel (3-D, shape {list(shape)}), no channel "
            f"{volume_index} ({mod or 'the modality asked for'})"
        )
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3-D volume, got shape {list(shape)}")
    return shape, img.affine


def plan_case(
    case: Case, axis: int, slice_range: tuple[int, int] | None, every_nth: int
) -> CasePlan:
    """Read headers, check shapes/affines agree, pick slices; no voxel is read."""
    ref_shape: tuple[int, ...] | None = None
    ref_affine: np.ndarray | None = None
    ref_path: Path | None = None
    files = [(m, p) for m, p in case.images.items()]
    if case.seg is not None:
        files.append(("seg", case.seg))
    fingerprint = []
    for mod, path in files:
        img = _load_header(path)
        shape, affine = _spatial(img, path, case.volume_index.get(mod), mod)
        st = path.stat()
        fingerprint.append([str(path), st.st_size, st.st_mtime_ns])
        if ref_shape is None:
            ref_shape, ref_affine, ref_path = shape, affine, path
            continue
        if shape != ref_shape:
            raise InputError(
                f"{path}: shape {list(shape)} differs from {ref_path.name} {list(ref_shape)}"
            )
        if not np.allclose(affine, ref_affine, rtol=1e-5, atol=1e-3):
            raise InputError(f"{path}: affine differs from {ref_path.name}'s")
    assert ref_shape is not None and ref_affine is not None
    ornt = nio.io_orientation(ref_affine)
    canonical = [0, 0, 0]
    for i, (ax, _) in enumerate(ornt):
        canonical[int(ax)] = ref_shape[i]
    n_s = canonical[axis]
    first, last = (0, n_s - 1) if slice_range is None else slice_range
    slices = list(range(max(first, 0), min(last, n_s - 1) + 1, every_nth))
    return CasePlan(
        name=case.name,
        images={m: str(p.resolve()) for m, p in case.images.items()},
        seg=str(case.seg.resolve()) if case.seg is not None else None,
        volume_index=dict(case.volume_index),
        shape=list(ref_shape),
        affine=np.asarray(ref_affine, dtype=float).tolist(),
        ornt=ornt.tolist(),
        canonical_shape=canonical,
        slices=slices,
        fingerprint=fingerprint,
    )


def read_labels_csv(path: Path, plans: list[CasePlan], axis: int) -> None:
    """Attach ``case,slice,label`` rows to the plans; unknown cases/slices are errors."""
    by_name = {p.name: p for p in plans}
    for p in plans:
        p.csv_labels = {}
    with (
        fsutil.reading_text(path, "labels CSV"),
        open(path, newline="", encoding="utf-8-sig") as fh,
    ):
        reader = csv.DictReader(fh)
        missing = {"case", "slice", "label"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            name = (row["case"] or "").strip()
            if name not in by_name:
                raise InputError(f"{path}: line {line}: unknown case {name!r}")
            plan = by_name[name]
            try:
                s, label = int(row["slice"]), int(row["label"])
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path}: line {line}: bad slice or label ({exc})") from exc
            n_s = plan.canonical_shape[axis]
            if not 0 <= s < n_s:
                raise InputError(
                    f"{path}: line {line}: case {name!r} has no slice {s} (0..{n_s - 1})"
                )
            if label not in (0, 1):
                raise InputError(f"{path}: line {line}: label {label} is not 0 or 1")
            assert plan.csv_labels is not None
            if s in plan.csv_labels:
                raise InputError(f"{path}: line {line}: case {name!r} slice {s} given twice")
            plan.csv_labels[s] = label
    for plan in plans:
        assert plan.csv_labels is not None
        lacking = [s for s in plan.slices if s not in plan.csv_labels]
        if lacking:
            raise InputError(f"{path}: no label for case {plan.name!r} slice {lacking[0]}")


# ----------------------------------------------------------------------------- workers


@dataclass
class Settings:
    """Resolved prepare settings (what the store depends on)."""

    layout: str
    modalities: list[str]
    axis: int
    normalise: str
    percentiles: tuple[float, float]
    window: tuple[float, float]
    crop: str
    crop_box: tuple[int, int, int, int] | None
    crop_size: tuple[int, int] | None
    slice_range: tuple[int, int] | None
    every_nth: int
    lesion_labels: list[int] | None
    allowed_labels: list[int] | None
    min_lesion_fraction: float
    dtype: str
    has_masks: bool
    labels_csv: str | None
    nonfinite: str = "error"


def _read_volume(path: str, volume_index: int | None) -> np.ndarray:
    """Canonical (RAS+) float32 voxels of one file (one volume of a 4-D file)."""
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: unreadable or truncated NIfTI ({exc})") from exc
    if data.ndim == 4:
        data = data[..., volume_index or 0]
    return data


def finite_volume(v: np.ndarray, path: str, mode: str) -> tuple[np.ndarray, int]:
    """``(volume, n)``: ``n`` NaN/Inf voxels of ``v``; ``mode`` "error" refuses them (file
    and count named), "replace" sets them to the finite minimum of ``v`` (0 if none)."""
    if v.dtype.kind != "f":
        return v, 0
    bad = ~np.isfinite(v)
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return v, 0
    if mode != "replace":
        raise InputError(
            f"{path}: {n_bad} of {v.size} voxels are NaN or infinite; use "
            f"--nonfinite replace to set them to the volume's finite minimum"
        )
    fill = v[~bad].min() if n_bad < v.size else 0
    return np.where(bad, fill, v), n_bad


def _read_image(plan: CasePlan, mod: str, settings: Settings) -> tuple[np.ndarray, int]:
    """One channel's canonical voxels checked by :func:`finite_volume`."""
    path = plan.images[mod]
    return finite_volume(_read_volume(path, plan.volume_index.get(mod)), path, settings.nonfinite)


def _read_seg(path: str, allowed: list[int] | None) -> np.ndarray:
    seg = _read_volume(path, None)
    if seg.dtype.kind == "f" and not np.all(np.isfinite(seg)):
        raise InputError(
            f"{path}: seg holds {int(np.count_nonzero(~np.isfinite(seg)))} NaN or infinite values"
        )
    if seg.dtype.kind == "f" and not np.array_equal(seg, np.rint(seg)):
        raise InputError(f"{path}: seg holds non-integer values")
    lo, hi = float(seg.min()), float(seg.max())
    if lo < 0:
        raise InputError(f"{path}: unexpected label value {lo:g} in seg")
    seg = seg.astype(np.int32 if hi > 255 else np.uint8, copy=False)
    if allowed is not None:
        values = np.flatnonzero(np.bincount(seg.ravel()))
        bad = sorted(set(values.tolist()) - set(allowed))
        if bad:
            raise InputError(
                f"{path}: unexpected label value(s) {', '.join(map(str, bad))} in seg "
                f"(allowed: {', '.join(map(str, sorted(allowed)))})"
            )
    return seg


def first_channel_bbox(plan: CasePlan, settings: Settings) -> tuple[int, int, int, int] | None:
    """In-slice bounding box of the first channel's foreground over all slices."""
    mod = settings.modalities[0]
    vol, _ = _read_image(plan, mod, settings)
    fg = foreground(vol, mod).any(axis=settings.axis)
    return bbox_2d(fg)


def process_case(
    plan: CasePlan, settings: Settings, partial: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read, normalise and crop one case; write its rows into the partial store's arrays.

    Returns the slice-table rows (``index`` = store position) and ``{file: n}`` of the
    NaN/Inf voxels replaced (``nonfinite: replace``; empty otherwise).
    """
    axis, mods = settings.axis, settings.modalities
    vols = []
    replaced: dict[str, int] = {}
    for mod in mods:
        v, n_bad = _read_image(plan, mod, settings)
        if n_bad:
            replaced[plan.images[mod]] = n_bad
        if v.shape != tuple(plan.canonical_shape):
            raise InputError(
                f"{plan.images[mod]}: voxel array shape {list(v.shape)} differs from its header"
            )
        vols.append(v)
    seg = _read_seg(plan.seg, settings.allowed_labels) if plan.seg else None
    # windows need the raw first channel (foreground) and the seg (kidney)
    windows = plan.windows
    if windows is None:
        fg2d = foreground(vols[0], mods[0]).any(axis=axis)
        size = settings.crop_size
        assert size is not None
        if settings.crop == "bbox":
            box = bbox_2d(fg2d)
            h, w = fg2d.shape
            cy, cx = ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2) if box else (h / 2, w / 2)
            windows = [("", centred_window(cy, cx, size))]
        else:  # kidney
            kid = None
            if seg is not None:
                labels = [KIDNEY_LABEL, *(settings.lesion_labels or [])]
                kid = np.moveaxis(np.isin(seg, labels), axis, 0)
            windows = kidney_windows(fg2d, kid, size)
    # normalise; kept slices stacked as (n, C, H, W) float32 (one copy per channel)
    idx = plan.slices
    if settings.normalise == "zscore_volume":
        vols = [zscore_nonzero(v.astype(np.float32, copy=False)) for v in vols]
    elif settings.normalise == "percentile":
        lo_p, hi_p = settings.percentiles
        vols = [percentile_clip(v.astype(np.float32, copy=False), lo_p, hi_p) for v in vols]
    elif settings.normalise == "ct_window":
        level, width = settings.window
        vols = [ct_window(v.astype(np.float32, copy=False), level, width) for v in vols]
    plane = [d for a, d in enumerate(plan.canonical_shape) if a != axis]
    stack = np.empty((len(idx), len(vols), *plane), np.float32)
    for c, v in enumerate(vols):
        stack[:, c] = np.moveaxis(v, axis, 0)[idx]
    if settings.normalise == "minmax_slice":
        minmax_slices_(stack)
    merged = None
    if seg is not None:
        seg_s = np.moveaxis(np.take(seg, idx, axis=axis), axis, 0)
        lesion = settings.lesion_labels
        merged = (np.isin(seg_s, lesion) if lesion is not None else seg_s > 0).astype(np.uint8)
    n_parts = len(windows)
    images = np.load(os.path.join(partial, "images.npy"), mmap_mode="r+")
    masks = (
        np.load(os.path.join(partial, "masks.npy"), mmap_mode="r+") if settings.has_masks else None
    )
    rows: list[dict[str, Any]] = []
    for p, (part, (y0, y1, x0, x1)) in enumerate(windows):
        pos = plan.offset + p + n_parts * np.arange(len(idx))
        images[pos] = crop_pad(stack, y0, y1, x0, x1)  # (n, C, h, w), cast on assignment
        m = crop_pad(merged, y0, y1, x0, x1) if merged is not None else None
        if masks is not None and m is not None:
            masks[pos] = m
        area = (y1 - y0) * (x1 - x0)
        for k, s in enumerate(idx):
            if m is not None:
                frac = float(m[k].sum()) / area
                label = int(frac > settings.min_lesion_fraction)
                if plan.csv_labels is not None:  # the CSV's labels are the labels
                    label = plan.csv_labels[s]
            elif plan.csv_labels is not None:
                frac, label = float("nan"), plan.csv_labels[s]
            else:  # unlabelled scans (masks off, no CSV): label unknown
                frac, label = float("nan"), UNKNOWN_LABEL
            rows.append(
                dict(
                    index=int(pos[k]),
                    case=plan.name,
                    slice=int(s),
                    part=part,
                    y0=y0,
                    y1=y1,
                    x0=x0,
                    x1=x1,
                    label=label,
                    lesion_fraction=frac,
                    has_mask=int(m is not None),
                )
            )
    images.flush()
    if masks is not None:
        masks.flush()
    del images, masks
    rows.sort(key=lambda r: r["index"])
    return rows, replaced


def _case_geometry(plan: CasePlan, axis: int, has_masks: bool) -> dict[str, Any]:
    """cases.json entry; ``has_mask``: the store has masks and this case has a seg file."""
    has_mask = bool(has_masks and plan.seg)
    files: dict[str, str] = dict(plan.images)
    if plan.seg:
        files["seg"] = plan.seg
    geo: dict[str, Any] = {
        "shape": plan.shape,
        "affine": plan.affine,
        "canonical_shape": plan.canonical_shape,
        "axis": axis,
        "ornt": plan.ornt,
        "files": files,
        "has_mask": has_mask,
    }
    if plan.volume_index:
        geo["volume_index"] = plan.volume_index
    return geo


# ----------------------------------------------------------------------------- driver


def resolve_settings(
    cfg: PrepareConfig,
    allowed: set[int] | None,
    modalities: list[str],
    seg_cases: list[Any] | None = None,
) -> Settings:
    """Fill per-layout defaults and validate option combinations; ``seg_cases``: the
    discovered cases (with a labels CSV the store has masks if any of them has a seg)."""
    seg_cases = seg_cases or []
    lesion = (
        cfg.lesion_labels if cfg.lesion_labels is not None else (DEFAULT_LESION_LABELS[cfg.layout])
    )
    if lesion is not None and allowed is not None:
        bad = sorted(set(lesion) - allowed)
        if bad:
            raise InputError(
                f"lesion labels {bad}: not labels of the {cfg.layout} layout "
                f"({', '.join(map(str, sorted(allowed)))})"
            )
    if cfg.crop_box is not None and cfg.crop != "fixed":
        raise InputError(f"crop box {list(cfg.crop_box)}: only used with --crop fixed")
    if cfg.crop == "fixed":
        if cfg.crop_box is None:
            raise InputError("--crop fixed needs --crop-box y0,y1,x0,x1")
        y0, y1, x0, x1 = cfg.crop_box
        if y1 <= y0 or x1 <= x0:
            raise InputError(f"crop box {y0},{y1},{x0},{x1}: invalid (needs y0<y1 and x0<x1)")
    crop_size = cfg.crop_size
    if crop_size is not None and cfg.crop not in ("bbox", "kidney"):
        raise InputError(f"crop size {list(crop_size)}: only used with --crop bbox or kidney")
    if crop_size is not None and min(crop_size) < 1:
        raise InputError(f"crop size {list(crop_size)}: must be positive")
    if cfg.crop == "kidney":
        if cfg.axis == 0:
            raise InputError("--crop kidney needs --axis 1 or 2 (the midline splits axis 0)")
        crop_size = crop_size or KIDNEY_DEFAULT_SIZE
    if cfg.slice_range is not None and cfg.slice_range[0] > cfg.slice_range[1]:
        raise InputError(f"slice range {list(cfg.slice_range)}: first is after last")
    lo_p, hi_p = cfg.percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise InputError(f"percentiles {lo_p},{hi_p}: need 0 <= low < high <= 100")
    level, width = cfg.window
    if not (math.isfinite(level) and math.isfinite(width) and width > 0):
        raise InputError(f"window {level:g},{width:g}: need a finite level and a width > 0 (HU)")
    normalise = cfg.normalise or DEFAULT_NORMALISE[cfg.layout]
    return Settings(
        layout=cfg.layout,
        modalities=modalities,
        axis=cfg.axis,
        normalise=normalise,
        percentiles=(lo_p, hi_p),
        window=(level, width),
        crop=cfg.crop,
        crop_box=cfg.crop_box,
        crop_size=tuple(crop_size) if crop_size else None,
        slice_range=cfg.slice_range,
        every_nth=cfg.every_nth,
        lesion_labels=sorted(lesion) if lesion is not None else None,
        allowed_labels=sorted(allowed) if allowed is not None else None,
        min_lesion_fraction=cfg.min_lesion_fraction,
        dtype=cfg.dtype,
        has_masks=cfg.masks and (cfg.labels_csv is None or any(c.seg for c in seg_cases)),
        labels_csv=str(cfg.labels_csv) if cfg.labels_csv else None,
        nonfinite=cfg.nonfinite,
    )


def _worker_init() -> None:
    """Worker processes leave SIGINT (Ctrl-C reaches the whole process group) and SIGTERM
    to the main process, which stops them after their current case."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_parallel(
    fn: Any, jobs: list[tuple[Any, ...]], workers: int, desc: str
) -> Iterator[tuple[int, Any]]:
    """Yield ``(job_position, fn(*job))`` as results arrive; InputErrors propagate; on any
    exception or interruption the jobs not yet started are cancelled."""
    bar = progress_out.bar(total=len(jobs), desc=desc, unit="cases", label="prepare")
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                yield i, fn(*job)
                bar.update()
            return
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_worker_init)
        try:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        raise exc
                    yield futures[fut], fut.result()
                    bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def _discover(cfg: PrepareConfig) -> Discovery:
    """The cases ``cfg`` prepares: seg files required unless slice labels come from
    ``labels_csv`` or masks are off, kept where they exist."""
    if cfg.data is None:
        raise InputError("no data folder given (--data)")
    return discover(
        cfg.layout,
        Path(cfg.data),
        cfg.modalities,
        require_seg=cfg.labels_csv is None and cfg.masks,
        keep_seg=cfg.masks,
    )


def input_fingerprint(cfg: PrepareConfig) -> list[Any]:
    """What a store prepared with ``cfg`` reads, as [case, [[path, size, mtime_ns], ...]]
    per case (image files, then seg) and [path, size, mtime_ns] per metadata file (MSD's
    dataset.json), paths relative to the data folder. Files are stat'ed, not read: a file
    rewritten in place changes it, a data folder moved with its time stamps (mv, cp -p,
    rsync -a) does not. ``labels_csv`` is not in it (keyed by content with the options)."""
    found = _discover(cfg)
    root = Path(str(cfg.data))

    def stat(path: Path) -> list[Any]:
        st = path.stat()
        return [Path(os.path.relpath(path, root)).as_posix(), st.st_size, st.st_mtime_ns]

    cases = [
        [c.name, [stat(p) for p in [*c.images.values(), *([c.seg] if c.seg else [])]]]
        for c in found.cases
    ]
    return [cases, [stat(p) for p in found.metadata]]


def prepare_store(cfg: PrepareConfig, force: bool = False, checkpoint: bool = True) -> Path:
    """Build the slice store described by ``cfg`` at ``cfg.out``; return its path.

    ``checkpoint`` keeps a per-case done list in the partial folder for resuming.
    """
    out = Path(cfg.out)
    if (out / MANIFEST).exists() and not force:
        raise InputError(f"{out}: already holds results ({MANIFEST}); use --force to replace them")
    found = _discover(cfg)
    settings = resolve_settings(cfg, found.allowed_labels, found.modalities, found.cases)
    plans = [plan_case(c, cfg.axis, cfg.slice_range, cfg.every_nth) for c in found.cases]
    if cfg.labels_csv is not None:
        read_labels_csv(Path(cfg.labels_csv), plans, cfg.axis)
    n_parts = 2 if settings.crop == "kidney" else 1
    offset = 0
    for p in plans:
        p.offset, p.n_rows = offset, n_parts * len(p.slices)
        offset += p.n_rows
    n = offset
    if n == 0:
        raise InputError(
            f"{cfg.data}: empty data set (no slice selected from "
            f"{len(plans)} case(s); check --slice-range)"
        )
    size = _store_size(plans, settings)

    partial = fsutil.prepare_output_dir(out, force, MANIFEST)
    resume_key = {
        "settings": asdict(settings),
        "n": n,
        "cases": [[p.name, p.fingerprint, p.slices] for p in plans],
    }
    done_dir = partial / "done"
    state = partial / "resume.json"
    resuming = checkpoint and state.is_file() and _same(state, resume_key)
    if not resuming:
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
    if settings.crop == "bbox" and cfg.crop_size is None:
        size = _default_bbox(plans, settings, cfg.workers, partial, resuming)
    if settings.crop == "fixed":
        _check_fixed_box(plans, settings)
    elif settings.crop == "none":
        for p in plans:
            p.windows = [("", (0, size[0], 0, size[1]))]
    h, w = size
    if not resuming:
        dtype = np.dtype(settings.dtype)
        np.lib.format.open_memmap(
            partial / "images.npy",
            mode="w+",
            dtype=dtype,
            shape=(n, len(settings.modalities), h, w),
        ).flush()
        if settings.has_masks:
            np.lib.format.open_memmap(
                partial / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, h, w)
            ).flush()
        done_dir.mkdir()
        if checkpoint:
            fsutil.write_json(state, resume_key)
    rows_by_case, replaced = _done_cases(plans, done_dir) if resuming else ({}, {})
    todo = [p for p in plans if p.name not in rows_by_case]
    jobs = [(p, settings, str(partial)) for p in todo]
    for i, (rows, fixed) in _run_parallel(process_case, jobs, cfg.workers, "prepare"):
        rows_by_case[todo[i].name] = rows
        replaced.update(fixed)
        if checkpoint:
            fsutil.write_json(done_dir / f"{todo[i].name}.json", {"rows": rows, "replaced": fixed})
    shutil.rmtree(done_dir, ignore_errors=True)
    for extra in (state, partial / "bbox.json"):
        extra.unlink(missing_ok=True)
    table = [r for p in plans for r in rows_by_case[p.name]]
    _write_store(partial, cfg, plans, settings, table, (n, h, w), replaced)
    fsutil.commit_output_dir(partial, out)
    if replaced:
        first = next(iter(replaced))
        print(
            f"note: replaced {sum(replaced.values())} NaN/Inf voxel(s) in {len(replaced)} "
            f"file(s) by each volume's finite minimum (e.g. {replaced[first]} in {first}); "
            f"listed in {out / MANIFEST}",
            file=sys.stderr,
        )
    return out


def _done_cases(
    plans: list[CasePlan], done_dir: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Rows and replaced-voxel counts of the cases an interrupted attempt finished."""
    rows_by_case: dict[str, list[dict[str, Any]]] = {}
    replaced: dict[str, int] = {}
    for p in plans:
        f = done_dir / f"{p.name}.json"
        if f.is_file():
            record = fsutil.read_json(f, "resume record")
            try:
                rows, fixed = _rows_from_json(record["rows"]), dict(record["replaced"])
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # not a record of this version: the case is done again
            rows_by_case[p.name] = rows
            replaced.update(fixed)
    return rows_by_case, replaced


def _write_store(
    partial: Path,
    cfg: PrepareConfig,
    plans: list[CasePlan],
    settings: Settings,
    table: list[dict[str, Any]],
    shape: tuple[int, int, int],
    replaced: dict[str, int],
) -> None:
    """slices.csv, cases.json and the manifest (store.json, written last) of a store of
    ``shape`` (slices, height, width)."""
    n, h, w = shape
    write_slice_table(partial / "slices.csv", table)
    fsutil.write_json(
        partial / "cases.json",
        {p.name: _case_geometry(p, settings.axis, settings.has_masks) for p in plans},
    )
    fsutil.write_json(
        partial / MANIFEST,
        {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "n_slices": n,
            "channels": list(settings.modalities),
            "size": [h, w],
            "dtype": settings.dtype,
            "has_masks": settings.has_masks,
            "prepare": {
                **asdict(settings),
                "data": str(cfg.data),
                "crop_size": [h, w],
                "nonfinite_replaced": replaced,
            },
        },
    )


def _rows_from_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slice rows read back from a resume record (strict JSON wrote NaN as null)."""
    for r in rows:
        if r.get("lesion_fraction") is None:
            r["lesion_fraction"] = float("nan")
    return rows


def _same(path: Path, key: dict[str, Any]) -> bool:
    import json

    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(key, default=str))
    except (OSError, ValueError):
        return False


def _store_size(plans: list[CasePlan], s: Settings) -> tuple[int, int]:
    if s.crop == "fixed":
        assert s.crop_box is not None
        y0, y1, x0, x1 = s.crop_box
        return y1 - y0, x1 - x0
    if s.crop in ("bbox", "kidney"):
        return tuple(s.crop_size) if s.crop_size else (0, 0)  # type: ignore[return-value]
    sizes = {}
    for p in plans:
        sl = [d for a, d in enumerate(p.canonical_shape) if a != s.axis]
        sizes.setdefault((sl[0], sl[1]), p.name)
    if len(sizes) > 1:
        (a, na), (b, nb) = list(sizes.items())[:2]
        raise InputError(
            f"case {nb}: slice size {list(b)} differs from case {na}'s {list(a)}; "
            f"use --crop fixed or bbox"
        )
    return next(iter(sizes))


def _check_fixed_box(plans: list[CasePlan], s: Settings) -> None:
    assert s.crop_box is not None
    y0, y1, x0, x1 = s.crop_box
    for p in plans:
        h, w = (d for a, d in enumerate(p.canonical_shape) if a != s.axis)
        if y1 <= 0 or x1 <= 0 or y0 >= h or x0 >= w:
            raise InputError(
                f"crop box {y0},{y1},{x0},{x1}: invalid, entirely outside "
                f"case {p.name}'s {h}x{w} slice"
            )
        p.windows = [("", (y0, y1, x0, x1))]


def _default_bbox(
    plans: list[CasePlan], s: Settings, workers: int, partial: Path, resuming: bool
) -> tuple[int, int]:
    """Bounding boxes of every case (cached in the partial folder); set windows; size."""
    cache = partial / "bbox.json"
    boxes: dict[str, Any] = (
        fsutil.read_json(cache, "bbox cache") if resuming and cache.is_file() else {}
    )
    todo = [p for p in plans if p.name not in boxes]
    jobs = [(p, s) for p in todo]
    for i, box in _run_parallel(first_channel_bbox, jobs, workers, "bbox"):
        boxes[todo[i].name] = box
    fsutil.write_json(cache, boxes)
    hmax = max([b[1] - b[0] for b in boxes.values() if b] or [8])
    wmax = max([b[3] - b[2] for b in boxes.values() if b] or [8])
    size = (8 * math.ceil(hmax / 8), 8 * math.ceil(wmax / 8))
    s.crop_size = size
    for p in plans:
        box = boxes[p.name]
        if box:
            cy, cx = (box[0] + box[1]) / 2, (box[2] + box[3]) / 2
        else:
            h, w = (d for a, d in enumerate(p.canonical_shape) if a != s.axis)
            cy, cx = h / 2, w / 2
        p.windows = [("", centred_window(cy, cx, size))]
    return size
