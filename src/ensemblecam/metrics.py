"""Segmentation and classifier metrics from confusion counts, every convention by name.

All count functions broadcast: pass scalars or arrays of TP/FP/FN/TN (e.g. one entry per
threshold combination) and get arrays back. A ratio whose denominator is 0 means both
prediction and ground truth are empty for that class; it is defined as 1.0 (perfect
agreement), never NaN.

Conventions (DESIGN.md, "Metrics"):

- ``paper_miou``: ONE confusion matrix accumulated over all pixels of all evaluated slices
  (lesion-free slices included); IoU_bg = TN/(TN+FP+FN), IoU_lesion = TP/(TP+FP+FN);
  paper_miou = (IoU_bg + IoU_lesion)/2.
- ``paper_dsc`` = 2 paper_miou / (1 + paper_miou). This is how the seed paper's tables are
  computed: its "DSC" is derived from mIoU, it is not a measured Dice.
- ``lesion_iou``/``lesion_dice``: lesion class only, accumulated over the data set;
  Dice = 2TP/(2TP+FP+FN).
- ``slice_dice``/``slice_iou``: per-slice scores, mean and population std (ddof=0) over
  lesion slices (optionally only slices whose lesion covers more than x of the slice, or
  only correctly classified lesion slices).
- ``case_dice``: per-case 3-D Dice of all slices of the case together (BraTS convention);
  a case with empty prediction and empty ground truth scores 1.
- classifier metrics (accuracy, precision, recall, F1, AUROC, confusion matrix) are
  ``ensemblecam.train.classifier_metrics``; evaluate reports them.
- ``hd95``: per-case 95th-percentile Hausdorff distance between mask surfaces, MONAI
  convention (max of the two directed 95th percentiles), in mm with the spacing if given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

Array = np.ndarray


def _ratio(num: Any, den: Any) -> Array:
    """num/den with 0/0 := 1 (both empty)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return out


def confusion(pred: Array, gt: Array, axis: int | tuple[int, ...] | None = None) -> tuple:
    """(TP, FP, FN, TN) of boolean masks, summed over ``axis`` (all axes if None)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    tp = np.sum(pred & gt, axis=axis, dtype=np.int64)
    fp = np.sum(pred & ~gt, axis=axis, dtype=np.int64)
    fn = np.sum(~pred & gt, axis=axis, dtype=np.int64)
    tn = np.sum(~pred & ~gt, axis=axis, dtype=np.int64)
    return tp, fp, fn, tn


def background_iou(tp: Any, fp: Any, fn: Any, tn: Any) -> Array:
    """IoU of the background class: TN / (TN + FP + FN)."""
    return _ratio(tn, np.asarray(tn) + fp + fn)


def lesion_iou(tp: Any, fp: Any, fn: Any, tn: Any = None) -> Array:
    """IoU of the lesion class: TP / (TP + FP + FN)."""
    return _ratio(tp, np.asarray(tp) + fp + fn)


def lesion_dice(tp: Any, fp: Any, fn: Any, tn: Any = None) -> Array:
    """Dice of the lesion class: 2TP / (2TP + FP + FN)."""
    return _ratio(2 * np.asarray(tp), 2 * np.asarray(tp) + fp + fn)


def paper_miou(tp: Any, fp: Any, fn: Any, tn: Any) -> Array:
    """Seed paper's mIoU: (IoU_bg + IoU_lesion) / 2 from one confusion matrix."""
    return 0.5 * (background_iou(tp, fp, fn, tn) + lesion_iou(tp, fp, fn))


def paper_dsc_from_miou(miou: Any) -> Array:
    """Seed paper's DSC, derived from mIoU (not measured): 2 mIoU / (1 + mIoU)."""
    miou = np.asarray(miou, dtype=np.float64)
    return 2.0 * miou / (1.0 + miou)


def paper_dsc(tp: Any, fp: Any, fn: Any, tn: Any) -> Array:
    """Seed paper's DSC = 2 paper_miou / (1 + paper_miou)."""
    return paper_dsc_from_miou(paper_miou(tp, fp, fn, tn))


def dataset_metrics(tp: Any, fp: Any, fn: Any, tn: Any) -> dict[str, Array]:
    """Every data-set-level convention from one (accumulated) confusion matrix."""
    miou = paper_miou(tp, fp, fn, tn)
    return {
        "paper_miou": miou,
        "paper_dsc": paper_dsc_from_miou(miou),
        "background_iou": background_iou(tp, fp, fn, tn),
        "lesion_iou": lesion_iou(tp, fp, fn),
        "lesion_dice": lesion_dice(tp, fp, fn),
    }


def mean_std(values: Array, axis: int = 0) -> tuple[Array, Array]:
    """Mean and population std (ddof=0) along ``axis``; NaN if there are no values."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[axis] == 0:
        shape = values.shape[:axis] + values.shape[axis + 1 :]
        return np.full(shape, np.nan), np.full(shape, np.nan)
    return values.mean(axis=axis), values.std(axis=axis)


def slice_selection(
    gt_pixels: Array,
    n_pixels: int,
    min_lesion_fraction: float = 0.0,
    probs: Array | None = None,
    classifier_threshold: float = 0.5,
) -> dict[str, Array]:
    """Boolean slice subsets over which slice scores are averaged.

    ``lesion``: slices with any lesion pixel; ``lesion_gt<x>``: lesion covers more than
    ``min_lesion_fraction`` of the slice (thesis: 0.02); ``correct``: lesion slices the
    classifier calls positive (prob >= classifier_threshold; thesis Table 4.3).
    """
    gt_pixels = np.asarray(gt_pixels)
    sel = {"lesion": gt_pixels > 0}
    if min_lesion_fraction > 0:
        sel["large"] = gt_pixels > min_lesion_fraction * n_pixels
    if probs is not None:
        sel["correct"] = (gt_pixels > 0) & (np.asarray(probs) >= classifier_threshold)
    return sel


def slice_metrics(
    tp: Array, fp: Array, fn: Array, selection: dict[str, Array]
) -> dict[str, float]:
    """slice_dice / slice_iou mean and std over each slice subset (per-slice counts)."""
    dice = lesion_dice(tp, fp, fn)
    iou = lesion_iou(tp, fp, fn)
    out: dict[str, float] = {}
    for key, sel in selection.items():
        suffix = "" if key == "lesion" else f"_{key}"
        for name, vals in (("slice_dice", dice), ("slice_iou", iou)):
            m, s = mean_std(vals[sel])
            out[f"{name}{suffix}_mean"] = float(m)
            out[f"{name}{suffix}_std"] = float(s)
        out[f"n_slices{suffix}"] = int(np.sum(sel))
    return out


def case_counts(case_ids: Array, n_cases: int, *counts: Array) -> list[Array]:
    """Sum per-slice counts per case (``case_ids`` in 0..n_cases-1)."""
    return [np.bincount(case_ids, weights=c, minlength=n_cases).astype(np.int64) for c in counts]


def case_dice(tp: Array, fp: Array, fn: Array) -> Array:
    """Per-case 3-D Dice 2TP/(2TP+FP+FN) from per-case counts; empty vs empty = 1."""
    return lesion_dice(tp, fp, fn)


def hd95(pred: Array, gt: Array, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance between the surfaces of two N-D masks.

    MONAI convention: max of the directed 95th percentiles of surface-to-surface
    distances (surface = mask minus its erosion, full connectivity). Units: ``spacing``
    (mm) if given, else voxels. Both empty: 0.0; exactly one empty: NaN (undefined).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return float("nan")
    struct = ndimage.generate_binary_structure(pred.ndim, pred.ndim)

    def surface(m: Array) -> Array:
        return m & ~ndimage.binary_erosion(m, structure=struct)

    sp, sg = surface(pred), surface(gt)
    dist_to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d1 = np.percentile(dist_to_g[sp], 95)
    d2 = np.percentile(dist_to_p[sg], 95)
    return float(max(d1, d2))

