"""Segmentation and classifier metrics from confusion counts, every convention by name.

All count functions broadcast: pass scalars or arrays of TP/FP/FN/TN (e.g. one entry per
threshold combination) and get arrays back. A ratio whose denominator is 0 means both
prediction and ground truth are empty for that class; it is defined as 1.0 (perfect
agreement), never NaN.

Conventions (each reported under its own name):

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
  ``ensemblecam.metrics.classification.classifier_metrics``; evaluate reports them.
- ``hd95``: per-case 95th-percentile Hausdorff distance between mask surfaces, computed
  by MONAI (equal to its values), in mm with the spacing if given; both empty 0, one
  empty NaN.
- ``nsd``: normalised surface Dice at a tolerance in mm (MONAI); both empty 1, one empty 0.
- ``lesion_wise``: BraTS 2023 lesion-wise Dice and HD95 (dilated-reference matching,
  26-connectivity, reference lesions <= 50 mm^3 dropped, false positive 0 / 374 mm,
  empty vs empty 1 / 0) with lesion sensitivity and false-positive lesions per case.
- ``case_metrics``: all per-case 3-D metrics of one case in scan spacing.
- ``label_coverage``: per label of a multi-label reference (e.g. tumour and cyst), its
  voxels and how many of them a mask marks: which kinds of lesion a method finds, and on
  which tissue its false positives lie.
- ``bootstrap_ci`` / ``paired_wilcoxon``: 95% CIs over cases and paired tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ensemblecam.metrics.classification import auroc as auroc
from ensemblecam.metrics.classification import classifier_metrics as classifier_metrics

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


def slice_metrics(tp: Array, fp: Array, fn: Array, selection: dict[str, Array]) -> dict[str, float]:
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


def label_coverage(pred: Array, seg: Array) -> dict[int, tuple[int, int]]:
    """{label: (voxels, marked)} for every value of the integer label map ``seg``: its
    voxel count and how many of those voxels the mask ``pred`` (same shape, non-zero =
    marked) marks. On a lesion label marked / voxels is the recall of that kind of lesion;
    on any other label it counts the false positives lying on that tissue."""
    seg = np.asarray(seg)
    pred = np.asarray(pred) != 0
    if pred.shape != seg.shape:
        raise ValueError(f"label_coverage: mask {pred.shape} and label map {seg.shape} differ")
    labels, voxels = np.unique(seg, return_counts=True)
    hit_labels, hits = np.unique(seg[pred], return_counts=True)
    marked = dict(zip(hit_labels.tolist(), hits.tolist(), strict=True))
    return {
        int(v): (int(n), int(marked.get(v, 0)))
        for v, n in zip(labels.tolist(), voxels.tolist(), strict=True)
    }


def _pair(pred: Array, gt: Array) -> tuple[Array, Array]:
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    return pred, gt


def _crop(margin: int, *masks: Array) -> tuple[Array, ...]:
    """The masks cut to the bounding box of their union widened by ``margin`` voxels
    (clipped to the array). Used only where the result provably does not change: the
    surface metrics (MONAI crops to the same box with margin 1 itself) and the lesion
    matching (dilations never reach past ``margin``)."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return masks
    box = []
    for ax in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != ax)))
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + margin + 1))
    return tuple(m[tuple(box)] for m in masks)


def _widen(
    boxes: Sequence[tuple[slice, ...]], margin: int, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """Union of bounding boxes (``find_objects`` slices) widened by ``margin``, clipped."""
    return tuple(
        slice(
            max(min(b[ax].start for b in boxes) - margin, 0),
            min(max(b[ax].stop for b in boxes) + margin, n),
        )
        for ax, n in enumerate(shape)
    )


def _monai(pred: Array, gt: Array) -> tuple[Any, Any]:
    """Binary masks as MONAI's one-channel, batch-first float tensors (1, 1, *spatial)."""
    import torch

    return (
        torch.as_tensor(pred[None, None].astype(np.float32)),
        torch.as_tensor(gt[None, None].astype(np.float32)),
    )


#: MONAI's own deprecation notice about its internal edge helper (not ours to act on)
_MONAI_NOTICE = ".*always_return_as_numpy.*"


def hd95(pred: Array, gt: Array, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance between the surfaces of two N-D masks.

    Computed by MONAI (``compute_hausdorff_distance(percentile=95, spacing=spacing)``), so
    values equal MONAI's: surface = mask XOR its erosion (scipy default, connectivity 1),
    euclidean distances from each surface voxel to the other surface, the 95th percentile
    of each direction, the larger of the two. Units: mm with ``spacing`` (per axis), else
    voxels. Both empty: 0.0; exactly one empty: NaN (undefined).
    """
    pred, gt = _pair(pred, gt)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return float("nan")
    from monai.metrics import compute_hausdorff_distance

    p, g = _monai(*_crop(1, pred, gt))
    sp = None if spacing is None else [float(v) for v in spacing]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MONAI_NOTICE)
        return float(
            compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=sp)[
                0, 0
            ]
        )


def nsd(
    pred: Array,
    gt: Array,
    tolerance: float,
    spacing: Sequence[float] | None = None,
    subvoxels: bool = False,
) -> float:
    """Normalised surface Dice at ``tolerance`` (mm with ``spacing``, else voxels).

    Computed by MONAI (``compute_surface_dice(class_thresholds=[tolerance], spacing)``):
    (|{p in dP: d(p, dG) <= tol}| + |{g in dG: d(g, dP) <= tol}|) / (|dP| + |dG|) with dP,
    dG the surface voxels (mask XOR erosion) and euclidean distances; ``subvoxels``: MONAI's
    surface elements weighted by area (DeepMind's definition) instead of voxel counts.
    Both empty: 1.0 (Metrics Reloaded: empty reference and prediction agree perfectly);
    exactly one empty: 0.0 (MONAI's value).
    """
    pred, gt = _pair(pred, gt)
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"NSD tolerance {tolerance}: must be finite and >= 0")
    from monai.metrics import compute_surface_dice

    p, g = _monai(*_crop(2, pred, gt))
    sp = None if spacing is None else [float(v) for v in spacing]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MONAI_NOTICE)
        return float(
            compute_surface_dice(
                p,
                g,
                [float(tolerance)],
                include_background=True,
                spacing=sp,
                use_subvoxels=subvoxels,
            )[0, 0]
        )


# ----------------------------------------------------------------- lesion-wise (BraTS 2023)

#: BraTS 2023 lesion-wise defaults (glioma, SSA, paediatric tasks of the challenge's code).
BRATS_DILATION = 3
BRATS_MIN_VOLUME = 50.0
BRATS_FP_HD95 = 374.0

_RANK = {(3, 6): 1, (3, 18): 2, (3, 26): 3, (2, 4): 1, (2, 8): 2, (1, 2): 1}


def neighbourhood(ndim: int, connectivity: int) -> Array:
    """scipy structuring element of ``connectivity`` neighbours (3-D: 6, 18, 26; 2-D: 4, 8)."""
    rank = _RANK.get((ndim, int(connectivity)))
    if rank is None:
        allowed = sorted(c for (d, c) in _RANK if d == ndim)
        raise ValueError(f"connectivity {connectivity} in {ndim}-D: expected one of {allowed}")
    return ndimage.generate_binary_structure(ndim, rank)


@dataclass(frozen=True)
class Lesion:
    """One reference lesion: volume (mm^3 with spacing, else voxels), its Dice and HD95
    against the predicted components matched to it, whether any matched, and whether it
    is above the minimum volume (only those are scored)."""

    volume: float
    dice: float
    hd95: float
    detected: bool
    kept: bool


@dataclass(frozen=True)
class LesionWise:
    """Lesion-wise scores of one case (see :func:`lesion_wise`)."""

    dice: float
    hd95: float
    ref_lesions: int  # reference lesions above the minimum volume
    detected: int  # ... of which some predicted component matched
    missed: int  # ... of which none matched
    fp: int  # predicted components that match no reference lesion (of any size)
    small: int  # reference lesions at or below the minimum volume (not scored)
    lesions: tuple[Lesion, ...] = ()

    @property
    def sensitivity(self) -> float:
        """Lesion sensitivity detected / ref_lesions; NaN without reference lesions."""
        return self.detected / self.ref_lesions if self.ref_lesions else float("nan")


def lesion_wise(
    pred: Array,
    gt: Array,
    spacing: Sequence[float] | None = None,
    dilation: int = BRATS_DILATION,
    dilation_connectivity: int = 18,
    connectivity: int = 26,
    min_volume: float = BRATS_MIN_VOLUME,
    fp_hd95: float = BRATS_FP_HD95,
) -> LesionWise:
    """Lesion-wise Dice and HD95 with the BraTS 2023 rules (the challenge's public code).

    1. Components: connected components (``connectivity``: 26 in 3-D) of the prediction
       and of the reference. The reference is dilated ``dilation`` times with the
       ``dilation_connectivity`` (18) neighbourhood; reference voxels lying in one
       component of the dilated reference form ONE lesion (nearby pieces merge). The
       reference voxels themselves are not changed.
    2. Matching: a predicted component matches a lesion if it touches the lesion dilated
       the same way; a component may match several lesions.
    3. Per lesion: Dice and HD95 (:func:`hd95`, MONAI; mm with ``spacing``) between the
       lesion and the union of its matched components; no match: Dice 0, HD95 ``fp_hd95``.
    4. Lesions of volume <= ``min_volume`` (voxel count x voxel volume: mm^3 with
       ``spacing``, voxels without; = voxels at BraTS's 1 mm^3) are dropped from scoring;
       components matching only them are still not false positives.
    5. FP = predicted components matching no lesion. Dice = sum(lesion Dice) / (L + FP),
       HD95 = (sum(lesion HD95) + FP * ``fp_hd95``) / (L + FP) over the L kept lesions.
       L + FP = 0 (nothing to score, e.g. empty vs empty): Dice 1, HD95 0.

    ``dilation`` 0: no dilation (matching by overlap, lesions = reference components).
    The one departure from the challenge's code: HD95 of a matched lesion is MONAI's
    (voxel-counted surfaces) where that code uses DeepMind's surface-distance package
    (area-weighted surfaces); the two can differ by a fraction of a voxel.
    """
    pred, gt = _pair(pred, gt)
    if dilation < 0:
        raise ValueError(f"dilation {dilation}: must be >= 0")
    struct = neighbourhood(gt.ndim, connectivity)
    grow = neighbourhood(gt.ndim, dilation_connectivity)
    vox = float(np.prod([float(v) for v in spacing])) if spacing is not None else 1.0
    pred, gt = _crop(dilation + 1, pred, gt)

    def dilate(m: Array) -> Array:
        return ndimage.binary_dilation(m, grow, iterations=dilation) if dilation else m

    dil_lab, _ = ndimage.label(dilate(gt), struct)
    lesion_lab = np.where(gt, dil_lab, 0)
    pred_lab, n_pred = ndimage.label(pred, struct)
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    pred_box = ndimage.find_objects(pred_lab)
    matched: set[int] = set()
    lesions = []
    # Each lesion is handled inside its bounding box (widened past the dilation's reach;
    # nothing outside can change the result), pred components inside theirs.
    for k, lbox in enumerate(ndimage.find_objects(lesion_lab), start=1):
        if lbox is None:  # pragma: no cover - every dilated component holds reference voxels
            continue
        box = _widen([lbox], dilation + 1, gt.shape)
        les = lesion_lab[box] == k
        hits = np.unique(pred_lab[box][dilate(les)])
        hits = hits[hits > 0]
        matched.update(int(h) for h in hits)
        n_l = int(les.sum())
        if len(hits):
            ubox = _widen([lbox, *(pred_box[h - 1] for h in hits)], 1, gt.shape)
            pm, les_u = np.isin(pred_lab[ubox], hits), lesion_lab[ubox] == k
            dice = 2.0 * int((pm & les_u).sum()) / (int(pred_size[hits].sum()) + n_l)
            dist = hd95(pm, les_u, spacing)
        else:
            dice, dist = 0.0, float(fp_hd95)
        lesions.append(Lesion(n_l * vox, dice, dist, bool(len(hits)), n_l * vox > min_volume))
    kept = [les for les in lesions if les.kept]
    fp = n_pred - len(matched)
    den = len(kept) + fp
    if den == 0:
        dice, dist = 1.0, 0.0
    else:
        dice = sum(les.dice for les in kept) / den
        dist = (sum(les.hd95 for les in kept) + fp * float(fp_hd95)) / den
    det = sum(les.detected for les in kept)
    return LesionWise(
        dice, dist, len(kept), det, len(kept) - det, fp, len(lesions) - len(kept), tuple(lesions)
    )


#: Per-case 3-D metrics of :func:`case_metrics`, in column order.
CASE_METRICS = (
    "dice",
    "iou",
    "hd95",
    "nsd",
    "lesionwise_dice",
    "lesionwise_hd95",
    "lesion_sensitivity",
    "ref_lesions",
    "detected_lesions",
    "missed_lesions",
    "fp_lesions",
    "small_ref_lesions",
    "ref_voxels",
    "pred_voxels",
)


def case_metrics(
    pred: Array,
    gt: Array,
    spacing: Sequence[float] | None = None,
    nsd_tolerance: float = 1.0,
    **lesion_options: Any,
) -> dict[str, float]:
    """Every per-case 3-D metric of one case (:data:`CASE_METRICS`).

    dice = 2TP/(2TP+FP+FN), iou = TP/(TP+FP+FN) (both empty: 1); hd95 (:func:`hd95`:
    both empty 0, one empty NaN) and nsd (:func:`nsd` at ``nsd_tolerance``) in mm with
    ``spacing``; lesion-wise Dice/HD95, lesion counts and lesion sensitivity from
    :func:`lesion_wise` (``lesion_options`` passed on).
    """
    pred, gt = _pair(pred, gt)
    tp, fp, fn, _ = confusion(pred, gt)
    lw = lesion_wise(pred, gt, spacing, **lesion_options)
    return {
        "dice": float(lesion_dice(tp, fp, fn)),
        "iou": float(lesion_iou(tp, fp, fn)),
        "hd95": hd95(pred, gt, spacing),
        "nsd": nsd(pred, gt, nsd_tolerance, spacing),
        "lesionwise_dice": lw.dice,
        "lesionwise_hd95": lw.hd95,
        "lesion_sensitivity": lw.sensitivity,
        "ref_lesions": lw.ref_lesions,
        "detected_lesions": lw.detected,
        "missed_lesions": lw.missed,
        "fp_lesions": lw.fp,
        "small_ref_lesions": lw.small,
        "ref_voxels": int(tp + fn),
        "pred_voxels": int(tp + fp),
    }


# ----------------------------------------------------------------- uncertainty, paired tests


def bootstrap_ci(
    values: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample the finite values with replacement
    ``n_boot`` times (numpy ``default_rng(seed)``), take the (1-level)/2 and (1+level)/2
    quantiles of the resampled means. No finite value: (NaN, NaN)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def signed_rank_sum(d: np.ndarray, axis: int = -1) -> np.ndarray:
    """Wilcoxon's W+ along ``axis``: the sum of the ranks of |d| (ties: mean ranks) over the
    positive d. ``d`` must hold no zeros; vectorised over the other axes."""
    from scipy.stats import rankdata

    return np.sum(rankdata(np.abs(d), axis=axis) * (d > 0), axis=axis)


def _wilcoxon(d: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) of ``scipy.stats.wilcoxon(d)``, two-sided, zeros dropped, its
    default method. For n <= 13 differences with ties or zeros that method is an exact
    permutation test over the 2^n sign patterns, which scipy evaluates one pattern at a time
    (~2 s per call, most of a resumed run's time); that case runs the same
    ``scipy.stats.permutation_test`` with the vectorised :func:`signed_rank_sum`, which gives
    the same statistic and p-value (zeros dropped first: each remaining sign pattern then
    stands for 2^zeros patterns, the same shares)."""
    from scipy.stats import permutation_test, wilcoxon

    nz = d[d != 0]
    exact = nz.size == d.size and np.unique(np.abs(d)).size == d.size  # no ties, no zeros
    if d.size > 13 or exact or nz.size < 2:  # < 2: permutation_test needs two values
        res = wilcoxon(d, alternative="two-sided", zero_method="wilcox")
        return float(res.statistic), float(res.pvalue)
    test = permutation_test(
        (nz,), signed_rank_sum, permutation_type="samples", vectorized=True,
        n_resamples=np.inf, alternative="two-sided",
    )  # fmt: skip
    total = nz.size * (nz.size + 1) / 2
    return float(min(test.statistic, total - test.statistic)), float(test.pvalue)


def paired_wilcoxon(a: Any, b: Any, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of per-case values ``a`` vs ``b`` (same cases, same order).

    Pairs where either value is not finite are dropped (n = pairs kept). Returns n, the
    mean difference mean(a - b), its bootstrap 95% CI (:func:`bootstrap_ci`) and the
    two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``'s, zero differences
    dropped: exact distribution for n <= 50 without ties or zeros, exact sign-flip
    permutation test for n <= 13 with them, else the normal approximation; see
    :func:`_wilcoxon`): statistic min(W+, W-) and p-value; None when undefined (no pair,
    or every difference zero).
    """

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values of different lengths {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    out: dict[str, Any] = {
        "n": int(d.size),
        "mean_difference": None,
        "ci95": None,
        "statistic": None,
        "p_value": None,
    }
    if d.size == 0:
        return out
    out["mean_difference"] = float(d.mean())
    out["ci95"] = list(bootstrap_ci(d, n_boot, seed))
    if np.any(d != 0):
        out["statistic"], out["p_value"] = _wilcoxon(d)
    return out
