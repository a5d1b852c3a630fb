"""``ensemblecam score``: score any folder of NIfTI masks against a data set's ground truth.

So ensemblecam and other tools can be compared on equal terms, in every convention.

Inputs: ``pred`` holds one mask per case, ``<case>.nii.gz`` or ``<case>.nii`` (what
``ensemblecam export`` writes; other files are ignored); the data set ``data`` in a
``layout`` of :mod:`ensemblecam.io.layouts` gives the cases and their seg files. Reference
lesion = seg labels in ``lesion_labels`` (default: the layout's
:data:`ensemblecam.io.layouts.DEFAULT_LESION_LABELS`; any non-zero label if None);
predicted lesion = every non-zero voxel of the mask.

Checks, all before any voxel is read and before anything is written: every case has a
prediction (``cases`` may name a subset); each prediction has the seg file's shape and
affine (``np.allclose(rtol=1e-5, atol=1e-3)``, the tolerance prepare uses between a
case's files). While scoring: masks and segs must hold finite integer values. Any fault:
one :class:`~ensemblecam.errors.InputError` line naming the file, nothing written.

Conventions (in the scan's voxel grid and spacing, mm from the seg file's affine):

- per case (``per_case.csv``, columns
  :data:`ensemblecam.metrics.conventions.CASE_COLUMNS`): 3-D Dice and IoU, HD95 and NSD
  through MONAI, BraTS 2023 lesion-wise Dice/HD95 and lesion detection
  (:func:`ensemblecam.metrics.case_metrics`);
- over the data set (``summary.json`` "slices"): the seed paper's conventions and the
  per-slice Dice/IoU (:func:`ensemblecam.metrics.conventions.score`) from per-slice
  counts of the FULL slices taken along ``axis`` of the RAS+ canonical volume (prepare's default 2 =
  axial; no crop, lesion-free slices included), so they need not equal a run's numbers,
  which are over the store's cropped slices.

- per seg label (``per_label.csv``, ``summary.json`` "labels", pooled over the cases):
  its voxels and how many of them the prediction marks
  (:func:`ensemblecam.metrics.label_coverage`). On a lesion label the share is that kind
  of lesion's recall (KiTS: tumour 2 and cyst 3 apart; BraTS: 1, 2 and 4), on another
  label the false positives lying on that tissue (KiTS: the kidney, 1).

Output folder (built as ``.<name>.partial``, renamed when complete)::

    per_case.csv    case, then every per-case column
    per_label.csv   case, label, lesion, voxels, marked, share
    summary.json    {"format": "ensemblecam-score", "version": 1, "pred", "data",
                     "layout", "lesion_labels", "cases": [...], "conventions": {...},
                     "metrics": {column: {"mean", "std", "n", "ci95"}}, "pooled": {...},
                     "slices": {...}, "labels": {label: {"lesion", "voxels", "marked",
                     "share"}}}   strict JSON: undefined values are null
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from nibabel.affines import voxel_sizes

from ensemblecam import metrics
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.layouts import DEFAULT_LESION_LABELS, discover
from ensemblecam.metrics.conventions import (
    CASE_COLUMNS,
    case_conventions,
    case_row,
    case_summary,
    score,
)

SCORE_FORMAT = "ensemblecam-score"
SCORE_VERSION = 1
MARKER = "summary.json"
#: affine tolerance between a prediction and its seg file (prepare's, between modalities)
AFFINE_RTOL, AFFINE_ATOL = 1e-5, 1e-3
_READ_ERRORS = (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError)


def _header(path: Path) -> Any:
    try:
        return nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: unreadable NIfTI ({exc})") from exc


def _shape3(img: Any, path: Path) -> tuple[int, ...]:
    shape = tuple(int(v) for v in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3-D volume, got shape {list(img.shape)}")
    return shape


def find_predictions(pred_dir: Path, cases: Sequence[str]) -> dict[str, Path]:
    """``<pred_dir>/<case>.nii.gz`` (or ``.nii``) of every case; a missing one: InputError."""
    out = {}
    for case in cases:
        found = [
            pred_dir / f"{case}{ext}"
            for ext in (".nii.gz", ".nii")
            if (pred_dir / f"{case}{ext}").is_file()
        ]
        if not found:
            raise InputError(
                f"{pred_dir / (case + '.nii.gz')}: missing prediction for case {case!r}"
            )
        if len(found) > 1:
            raise InputError(f"{found[1]}: second prediction for case {case!r} ({found[0].name})")
        out[case] = found[0]
    return out


def check_geometry(pred_path: Path, seg_path: Path) -> None:
    """The prediction must have the seg file's 3-D shape and affine (headers only)."""
    p_img, s_img = _header(pred_path), _header(seg_path)
    ps, ss = _shape3(p_img, pred_path), _shape3(s_img, seg_path)
    if ps != ss:
        raise InputError(
            f"{pred_path}: shape {list(ps)} differs from the ground truth's {list(ss)} ({seg_path})"
        )
    pa, sa = np.asarray(p_img.affine, float), np.asarray(s_img.affine, float)
    if not np.allclose(pa, sa, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        raise InputError(
            f"{pred_path}: affine differs from the ground truth's ({seg_path}; "
            f"largest difference {float(np.abs(pa - sa).max()):.4g})"
        )


def _voxels(path: Path, what: str) -> np.ndarray:
    """Integer voxels of a mask or seg file (3-D); NaN/Inf or fractions: InputError."""
    img = _header(path)
    try:
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: unreadable or truncated NIfTI ({exc})") from exc
    data = data.reshape(_shape3(img, path))
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"{path}: {bad} NaN or infinite voxels in the {what}")
        if not np.array_equal(data, np.rint(data)):
            raise InputError(f"{path}: the {what} holds non-integer values (not a mask)")
    return data


def _slice_counts(
    pred: np.ndarray, gt: np.ndarray, affine: np.ndarray, axis: int
) -> tuple[np.ndarray, ...]:
    """Per-slice (TP, FP, FN, TN) along ``axis`` of the RAS+ canonical volumes."""
    ornt = nio.io_orientation(affine)
    p = np.moveaxis(nio.apply_orientation(pred, ornt), axis, 0)
    g = np.moveaxis(nio.apply_orientation(gt, ornt), axis, 0)
    return metrics.confusion(p, g, axis=(1, 2))


def score_folder(
    pred: str | Path,
    data: str | Path,
    layout: str,
    out: str | Path | None = None,
    lesion_labels: Sequence[int] | None = None,
    cases: Sequence[str] | None = None,
    nsd_tolerance_mm: float = 1.0,
    dilation: int = metrics.BRATS_DILATION,
    min_lesion_volume: float = metrics.BRATS_MIN_VOLUME,
    fp_hd95: float = metrics.BRATS_FP_HD95,
    connectivity: int = 26,
    axis: int = 2,
    min_lesion_fraction: float = 0.02,
    force: bool = False,
) -> dict[str, Any]:
    """Score the masks in ``pred`` against ``data``'s ground truth; write ``out`` (default
    ``<pred>_score`` beside ``pred``); return the summary (see the module docstring)."""
    pred, data = Path(pred), Path(data)
    out = Path(out) if out is not None else pred.with_name(pred.name + "_score")
    if not pred.is_dir():
        raise InputError(f"{pred}: prediction folder not found")
    fsutil.check_not_input(out, [pred, data])
    if not np.isfinite(nsd_tolerance_mm) or nsd_tolerance_mm < 0:
        raise InputError(f"NSD tolerance {nsd_tolerance_mm}: must be a finite number >= 0")
    if dilation < 0:
        raise InputError(f"dilation {dilation}: must be >= 0")
    if connectivity not in (6, 18, 26):
        raise InputError(f"connectivity {connectivity}: expected 6, 18 or 26")
    if not np.isfinite(min_lesion_volume) or not np.isfinite(fp_hd95):
        raise InputError(
            f"minimum lesion volume {min_lesion_volume} / FP HD95 {fp_hd95}: must be finite"
        )
    if axis not in (0, 1, 2):
        raise InputError(f"axis {axis}: expected 0, 1 or 2")
    if not 0 <= min_lesion_fraction < 1:
        raise InputError(f"min lesion fraction {min_lesion_fraction}: expected 0 <= x < 1")
    found = {c.name: c for c in discover(layout, data).cases}
    names = list(found) if cases is None else list(dict.fromkeys(cases))
    unknown = [c for c in names if c not in found]
    if unknown:
        raise InputError(f"case {unknown[0]!r}: not in the {layout} data set {data}")
    if not names:
        raise InputError("no case to score")
    preds = find_predictions(pred, names)
    for c in names:
        seg = found[c].seg
        assert seg is not None  # discover(require_seg=True)
        check_geometry(preds[c], seg)
    labels = list(lesion_labels) if lesion_labels is not None else DEFAULT_LESION_LABELS.get(layout)
    lesion_options = {
        "dilation": dilation,
        "min_volume": float(min_lesion_volume),
        "fp_hd95": float(fp_hd95),
        "connectivity": connectivity,
    }
    with fsutil.output_guard(out, [pred, data]):
        partial = fsutil.prepare_output_dir(out, force, MARKER, stage="score")
        rows, counts, label_rows = [], [], []
        for i, c in enumerate(names):
            seg_path = found[c].seg
            assert seg_path is not None
            seg = _voxels(seg_path, "ground truth")
            gt = np.isin(seg, labels) if labels is not None else seg != 0
            pm = _voxels(preds[c], "prediction") != 0
            for v, (n, k) in metrics.label_coverage(pm, seg).items():
                lesion = v in labels if labels is not None else v != 0
                label_rows.append({"case": c, "label": v, "lesion": int(lesion), "voxels": n,
                                   "marked": k, "share": k / n})  # fmt: skip
            affine = np.asarray(_header(seg_path).affine, float)
            spacing = voxel_sizes(affine)
            rows.append(
                {"case": c, **case_row(pm, gt, spacing, nsd_tolerance_mm, **lesion_options)}
            )
            tp, fp, fn, tn = _slice_counts(pm, gt, affine, axis)
            counts.append((tp, fp, fn, tn, np.full(len(tp), i)))
        tp, fp, fn, tn, ids = (np.concatenate([c[k] for c in counts]) for k in range(5))
        summary = {
            "format": SCORE_FORMAT,
            "version": SCORE_VERSION,
            "pred": str(pred),
            "data": str(data),
            "layout": layout,
            "lesion_labels": labels,
            "cases": names,
            "conventions": {
                **case_conventions(nsd_tolerance_mm, **lesion_options),
                "slices": f"full slices along axis {axis} of the RAS+ canonical "
                "volume, lesion-free slices included",
                "min_lesion_fraction": min_lesion_fraction,
            },
            "metrics": column_statistics(rows),
            "pooled": case_summary(rows),
            "slices": score(tp, fp, fn, tn, ids, min_lesion_fraction=min_lesion_fraction),
            "labels": pooled_labels(label_rows),
        }
        fsutil.write_text(partial / "per_case.csv", fsutil.csv_text(rows))
        fsutil.write_text(partial / "per_label.csv", fsutil.csv_text(label_rows))
        fsutil.write_json(partial / MARKER, summary)
        fsutil.commit_output_dir(partial, out, stage="score")
    return summary


def pooled_labels(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per seg label (keys in label order): lesion or not, voxels and marked voxels summed
    over the cases, and share = marked / voxels."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        p = out.setdefault(r["label"], {"lesion": bool(r["lesion"]), "voxels": 0, "marked": 0})
        p["voxels"] += r["voxels"]
        p["marked"] += r["marked"]
    return {str(v): {**p, "share": p["marked"] / p["voxels"]} for v, p in sorted(out.items())}


def column_statistics(
    rows: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per column of :data:`CASE_COLUMNS`: mean, population std, number of cases with a
    defined value and the bootstrap 95% CI of the mean (None when undefined)."""
    out = {}
    for m in CASE_COLUMNS:
        v = np.array([r[m] for r in rows], float)
        ok = v[np.isfinite(v)]
        lo, hi = metrics.bootstrap_ci(ok, n_boot, seed)
        out[m] = {
            "mean": float(ok.mean()) if ok.size else None,
            "std": float(ok.std()) if ok.size else None,
            "n": int(ok.size),
            "ci95": [lo, hi] if ok.size else None,
        }
    return out
