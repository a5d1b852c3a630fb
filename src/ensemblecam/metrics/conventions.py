"""Scores in every convention from per-slice counts, and the per-case 3-D columns.

:func:`score` turns per-slice (TP, FP, FN, TN) into the data-set, slice and case
conventions of :mod:`ensemblecam.metrics`; :func:`empty_baseline` scores the all-background
prediction on the same slices. :func:`case_row` gives one case's 3-D columns
(:data:`CASE_COLUMNS`, HD95 in mm) through :func:`ensemblecam.metrics.case_metrics`;
:func:`case_summary` their means over cases; :func:`case_conventions` the parameters
behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ensemblecam import metrics

#: Per-case 3-D columns of :func:`case_row` (volumes in scan spacing; HD95 in mm).
_MM = {"hd95": "hd95_mm", "lesionwise_hd95": "lesionwise_hd95_mm"}
CASE_COLUMNS = tuple(_MM.get(m, m) for m in metrics.CASE_METRICS)
#: Per-case metrics given with a bootstrap CI and a paired test, and their direction.
STAT_METRICS = {
    "dice": "higher",
    "nsd": "higher",
    "hd95_mm": "lower",
    "lesionwise_dice": "higher",
    "lesionwise_hd95_mm": "lower",
    "lesion_sensitivity": "higher",
    "fp_lesions": "lower",
}


def slice_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-slice (TP, FP, FN, TN) of (S, H, W) masks."""
    return metrics.confusion(pred, gt, axis=(1, 2))


def score(
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    tn: np.ndarray,
    case_ids: np.ndarray,
    probs: np.ndarray | None = None,
    min_lesion_fraction: float = 0.0,
    classifier_threshold: float = 0.5,
) -> dict[str, Any]:
    """Every metric convention from per-slice counts (see :mod:`ensemblecam.metrics`);
    ``probs`` (per slice) select the correctly classified lesion slices."""
    tp, fp, fn, tn = (np.asarray(a, np.int64) for a in (tp, fp, fn, tn))
    out: dict[str, Any] = {
        k: float(v)
        for k, v in metrics.dataset_metrics(tp.sum(), fp.sum(), fn.sum(), tn.sum()).items()
    }
    out.update(tp=int(tp.sum()), fp=int(fp.sum()), fn=int(fn.sum()), tn=int(tn.sum()))
    gt_pix = tp + fn
    npix = int((tp + fp + fn + tn)[0]) if len(tp) else 0
    sel = metrics.slice_selection(gt_pix, npix, min_lesion_fraction, probs, classifier_threshold)
    out.update(metrics.slice_metrics(tp, fp, fn, sel))
    _, cid = np.unique(case_ids, return_inverse=True)
    ctp, cfp, cfn = metrics.case_counts(cid, int(cid.max()) + 1, tp, fp, fn)
    cd = metrics.case_dice(ctp, cfp, cfn)
    out["case_dice_mean"], out["case_dice_std"] = (float(v) for v in metrics.mean_std(cd))
    out["n_slices"] = len(tp)
    out["n_cases"] = len(cd)
    return out


def empty_baseline(
    per: dict[str, np.ndarray],
    case_ids: np.ndarray,
    min_lesion_fraction: float = 0.0,
    classifier_threshold: float = 0.5,
) -> dict[str, Any]:
    """Scores of the Empty prediction (all background) on the slices of ``per``."""
    gt_pix = per["tp"] + per["fn"]
    npix = gt_pix + per["fp"] + per["tn"]
    zero = np.zeros_like(gt_pix)
    return score(
        zero, zero, gt_pix, npix - gt_pix, case_ids, None, min_lesion_fraction, classifier_threshold
    )


def case_row(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    **lesion_options: Any,
) -> dict[str, Any]:
    """:func:`ensemblecam.metrics.case_metrics` of one case's volumes in scan ``spacing``
    (mm), keyed by :data:`CASE_COLUMNS` (the HD95 columns named ``_mm``)."""
    m = metrics.case_metrics(pred, gt, spacing, nsd_tolerance_mm, **lesion_options)
    return {_MM.get(k, k): v for k, v in m.items()}


def case_conventions(nsd_tolerance_mm: float, **lesion_options: Any) -> dict[str, Any]:
    """The parameters behind the per-case columns (written beside them)."""
    lw = {
        "dilation": metrics.BRATS_DILATION,
        "dilation_connectivity": 18,
        "connectivity": 26,
        "min_volume_mm3": metrics.BRATS_MIN_VOLUME,
        "fp_hd95_mm": metrics.BRATS_FP_HD95,
    }
    names = {"min_volume": "min_volume_mm3", "fp_hd95": "fp_hd95_mm"}
    lw.update({names.get(k, k): v for k, v in lesion_options.items()})
    return {
        "space": "3-D per case, scan voxel grid and spacing (mm)",
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "hd95": "MONAI compute_hausdorff_distance(percentile=95); both empty 0, one "
        "empty undefined (null)",
        "nsd": "MONAI compute_surface_dice (voxel surfaces); both empty 1, one empty 0",
        "lesionwise": {"rules": "BraTS 2023", **lw},
    }


def case_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means and population stds over cases of the per-case 3-D columns (finite values
    only; ``case_<m>_n``: cases with a defined value) and pooled lesion counts."""
    out: dict[str, Any] = {}
    for m in STAT_METRICS:
        if m == "dice" or not rows or m not in rows[0]:
            continue
        v = np.array([np.nan if r[m] is None else r[m] for r in rows], float)
        ok = v[np.isfinite(v)]
        out[f"case_{m}_mean"] = float(ok.mean()) if ok.size else None
        out[f"case_{m}_std"] = float(ok.std()) if ok.size else None
        out[f"case_{m}_n"] = int(ok.size)
    if rows and "ref_lesions" in rows[0]:
        ref = sum(int(r["ref_lesions"]) for r in rows)
        det = sum(int(r["detected_lesions"]) for r in rows)
        out.update(
            lesions_ref=ref,
            lesions_detected=det,
            lesions_fp=sum(int(r["fp_lesions"]) for r in rows),
            lesion_sensitivity_pooled=det / ref if ref else None,
        )
    return out
