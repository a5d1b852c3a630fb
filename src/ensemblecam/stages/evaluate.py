"""Apply a chosen ensemble configuration to held-out maps and score it in every convention.

:func:`apply_config` is the reference semantics of the operators (search.py must agree
with it exactly); export/predict reuse it. Masks are read only to score.

Per-case 3-D metrics (:func:`case_row`, columns :data:`CASE_COLUMNS` of ``per_case.csv``
and ``per_case_empty.csv``): each case's evaluated slices (predicted and reference) are
put back into the scan's voxel grid with the store's geometry
(:func:`ensemblecam.io.export.slices_to_volume`; voxels outside the stored windows are
background in both) and scored in the scan's voxel spacing (mm, from its affine):
HD95 and NSD through MONAI, BraTS 2023 lesion-wise Dice/HD95, lesion detection
(:func:`ensemblecam.metrics.case_metrics`).

Over cases (:func:`add_case_statistics`, called by ``ensemblecam run``): per result row,
the per-case values of every fold pooled (a case is identified by (fold, case)), their
mean with a seeded percentile-bootstrap 95% CI, and paired Wilcoxon signed-rank tests of
the chosen configuration against every other row on the same cases.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import voxel_sizes
from tqdm import tqdm

from ensemblecam import metrics
from ensemblecam.config import EvaluateConfig
from ensemblecam.ensemble.search import (
    CONFIG_KEYS,
    Rows,
    _as_rows,
    annotated_part,
    mean_map,
    open_inputs,
    parse_operator,
)
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.export import slices_to_volume
from ensemblecam.io.mapstore import dequantise


def gate_probs(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Gating probability of a configuration: mean of its members' probabilities."""
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probs]), axis=0)


def apply_config(
    maps: Sequence[np.ndarray],
    config: dict[str, Any],
    probs: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Binary masks (S, H, W) of the configuration on the members' maps (in config order).

    ``config``: {"operator": and|or|min|max|vote:k|mean|single, "thresholds": [t_i] (one
    per member; one for mean), "gate": None or g}. ``m_i = dequantise(map_i) > float32(t_i)``;
    min/max pick per slice the member mask with fewest/most positives, ties to the first;
    gating empties slices with mean member probability < g.
    """
    op = config["operator"]
    thr = [np.float32(t) for t in config["thresholds"]]
    m = len(maps)
    if op == "mean":
        if len(thr) != 1:
            raise InputError(f"operator mean takes one threshold, got {len(thr)}")
        out = mean_map(maps) > thr[0]
    else:
        if op == "single":
            kind, k = "vote", 1
            if m != 1:
                raise InputError(f"operator single takes one member, got {m}")
        else:
            kind, k = parse_operator(op, m)
        if len(thr) != m:
            raise InputError(f"configuration has {m} members but {len(thr)} thresholds")
        bins = [dequantise(np.asarray(mp)) > t for mp, t in zip(maps, thr, strict=True)]
        if kind in ("min", "max"):
            out = bins[0].copy()
            best = bins[0].sum(axis=(1, 2))
            for b in bins[1:]:
                pos = b.sum(axis=(1, 2))
                better = pos < best if kind == "min" else pos > best
                out[better] = b[better]
                best = np.where(better, pos, best)
        else:
            votes = np.sum(np.stack(bins), axis=0)
            out = votes >= k
    gate = config.get("gate")
    if gate is not None:
        if probs is None:
            raise InputError("configuration uses a gate but no classifier probabilities given")
        out[gate_probs(probs) < gate] = False
    return out


def slice_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-slice (TP, FP, FN, TN) of (S, H, W) masks."""
    return metrics.confusion(pred, gt, axis=(1, 2))


def score(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray,
    case_ids: np.ndarray,
    probs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    min_lesion_fraction: float = 0.0,
    classifier_threshold: float = 0.5,
) -> dict[str, Any]:
    """Every metric convention from per-slice counts (see metrics.py)."""
    tp, fp, fn, tn = (np.asarray(a, np.int64) for a in (tp, fp, fn, tn))
    out: dict[str, Any] = {k: float(v) for k, v in metrics.dataset_metrics(
        tp.sum(), fp.sum(), fn.sum(), tn.sum()).items()}
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
    if probs is not None and labels is not None:
        from ensemblecam.stages.train import classifier_metrics  # torch import only when needed

        out["classifier"] = classifier_metrics(labels, probs, classifier_threshold)
    return out


def evaluate_arrays(
    maps: Sequence[np.ndarray | Rows],
    masks: np.ndarray | Rows,
    case_ids: np.ndarray,
    config: dict[str, Any],
    probs: Sequence[np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    min_lesion_fraction: float = 0.0,
    classifier_threshold: float = 0.5,
    chunk: int = 256,
    progress: bool | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Apply ``config`` chunk by chunk; return (metrics, per-slice counts incl. Empty baseline).

    The Empty baseline (all-background prediction) is scored alongside under "empty".
    """
    srcs = [_as_rows(a) for a in maps]
    gts = _as_rows(masks)
    n = len(gts)
    if n == 0:
        raise InputError("empty evaluation set: no slices to score")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tp", "fp", "fn", "tn")}
    for start in tqdm(range(0, n, chunk), desc="evaluate", unit="chunk",
                      disable=None if progress is None else not progress):
        stop = min(start + chunk, n)
        gt = gts.read(start, stop).astype(bool)
        mp = [s.read(start, stop) for s in srcs]
        for i, a in enumerate(mp):
            if a.shape != gt.shape:
                raise InputError(f"member {config['members'][i] if 'members' in config else i}:"
                                 f" maps of shape {a.shape[1:]} but masks of shape {gt.shape[1:]}")
        pr = None if probs is None else [np.asarray(p)[start:stop] for p in probs]
        pred = apply_config(mp, config, pr)
        for k, v in zip(("tp", "fp", "fn", "tn"), slice_counts(pred, gt), strict=True):
            parts[k].append(v)
    per = {k: np.concatenate(v) for k, v in parts.items()}
    p = None if probs is None else gate_probs(probs)
    res = score(per["tp"], per["fp"], per["fn"], per["tn"], case_ids, p, labels,
                min_lesion_fraction, classifier_threshold)
    empty = empty_baseline(per, case_ids, min_lesion_fraction, classifier_threshold)
    return {"config": config, "metrics": res, "empty_baseline": empty}, per


def case_hd95(pred_volume: np.ndarray, gt_volume: np.ndarray,
              spacing: Sequence[float] | None = None) -> float:
    """HD95 of one case's stacked slices (see metrics.hd95)."""
    return metrics.hd95(pred_volume, gt_volume, spacing)


#: Per-case 3-D columns of :func:`case_row` (volumes in scan spacing; HD95 in mm).
CASE_COLUMNS = ("dice", "iou", "hd95_mm", "nsd", "lesionwise_dice", "lesionwise_hd95_mm",
                "lesion_sensitivity", "ref_lesions", "detected_lesions", "missed_lesions",
                "fp_lesions", "small_ref_lesions", "ref_voxels", "pred_voxels")
_MM = {"hd95": "hd95_mm", "lesionwise_hd95": "lesionwise_hd95_mm"}
#: Per-case metrics given with a bootstrap CI and a paired test, and their direction.
STAT_METRICS = {"dice": "higher", "nsd": "higher", "hd95_mm": "lower",
                "lesionwise_dice": "higher", "lesionwise_hd95_mm": "lower",
                "lesion_sensitivity": "higher", "fp_lesions": "lower"}
#: Bootstrap resamples and seed of every CI (fixed: results are reproducible).
N_BOOT = 2000
BOOT_SEED = 0


def case_row(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
             nsd_tolerance_mm: float = 1.0, **lesion_options: Any) -> dict[str, Any]:
    """:func:`ensemblecam.metrics.case_metrics` of one case's volumes in scan ``spacing``
    (mm), keyed by :data:`CASE_COLUMNS` (the HD95 columns named ``_mm``)."""
    m = metrics.case_metrics(pred, gt, spacing, nsd_tolerance_mm, **lesion_options)
    return {_MM.get(k, k): v for k, v in m.items()}


def case_conventions(nsd_tolerance_mm: float, **lesion_options: Any) -> dict[str, Any]:
    """The parameters behind the per-case columns (written beside them)."""
    lw = {"dilation": metrics.BRATS_DILATION, "dilation_connectivity": 18,
          "connectivity": 26, "min_volume_mm3": metrics.BRATS_MIN_VOLUME,
          "fp_hd95_mm": metrics.BRATS_FP_HD95}
    names = {"min_volume": "min_volume_mm3", "fp_hd95": "fp_hd95_mm"}
    lw.update({names.get(k, k): v for k, v in lesion_options.items()})
    return {"space": "3-D per case, scan voxel grid and spacing (mm)",
            "nsd_tolerance_mm": nsd_tolerance_mm,
            "hd95": "MONAI compute_hausdorff_distance(percentile=95); both empty 0, one "
                    "empty undefined (null)",
            "nsd": "MONAI compute_surface_dice (voxel surfaces); both empty 1, one empty 0",
            "lesionwise": {"rules": "BraTS 2023", **lw}}


def _volume_columns(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                    nsd_tolerance_mm: float) -> dict[str, Any]:
    """case_row without the columns per_case.csv already has from the slice counts."""
    row = case_row(pred, gt, spacing, nsd_tolerance_mm)
    return {k: v for k, v in row.items() if k != "dice"}


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
        out.update(lesions_ref=ref, lesions_detected=det,
                   lesions_fp=sum(int(r["fp_lesions"]) for r in rows),
                   lesion_sensitivity_pooled=det / ref if ref else None)
    return out


def _csv_float(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def case_file(kind: str) -> str:
    """The per-case file of a result row in its eval folder (Empty: the Empty columns)."""
    return "per_case_empty.csv" if kind == "empty" else "per_case.csv"


def add_case_statistics(results: dict[str, Any], fold_results: dict[str, dict[str, Any]],
                        root: Path, n_boot: int = N_BOOT, seed: int = BOOT_SEED
                        ) -> dict[str, Any]:
    """Add per-case statistics to ``results`` (the run's results table) and return it.

    ``fold_results[fold]`` = {"dir": fold folder, "rows": [{"name", "kind", "slug"}...]};
    each row's per-case file is ``<dir>/eval/<slug>/`` :func:`case_file`. Every results
    row with such files gets ``cases`` = {"files": {fold: path relative to ``root``},
    "n_cases", "n": {m}, "mean": {m}, "ci95": {m: [lo, hi]}} over :data:`STAT_METRICS`
    (cases pooled over folds, key (fold, case); non-finite values left out), and every
    row but the chosen one ``"vs_chosen": {m: metrics.paired_wilcoxon(chosen, row)}`` on
    the cases both have (difference = chosen - row). ``results["case_statistics"]``
    records the chosen row, the best single member (highest mean of the objective over
    folds on held-out data, so the comparison is conservative), the bootstrap settings
    and the test. Undefined values are None.
    """
    values: dict[tuple[str, str], dict[tuple[str, str], dict[str, float]]] = {}
    files: dict[tuple[str, str], dict[str, str]] = {}
    for fold, res in fold_results.items():
        for row in res["rows"]:
            key = (row["kind"], row["name"])
            path = Path(res["dir"]) / "eval" / row["slug"] / case_file(row["kind"])
            if not path.is_file():
                continue
            files.setdefault(key, {})[fold] = Path(os.path.relpath(path, root)).as_posix()
            with open(path, newline="") as fh:
                for r in csv.DictReader(fh):
                    values.setdefault(key, {})[(fold, r["case"])] = {
                        m: _csv_float(r.get(m)) for m in STAT_METRICS}
    rows = results["rows"]
    chosen = next((r for r in rows if r["kind"] == "ensemble"), None)
    ckey = None if chosen is None else (chosen["kind"], chosen["name"])
    objective = results.get("objective", "paper_miou")
    singles = [r for r in rows if r["kind"] == "single"
               and (r.get("mean") or {}).get(objective) is not None]
    best_single = max(singles, key=lambda r: r["mean"][objective], default=None)
    for row in rows:
        key = (row["kind"], row["name"])
        vals = values.get(key)
        if not vals:
            continue
        cases = sorted(vals)
        stats: dict[str, Any] = {"files": files[key], "n_cases": len(cases), "n": {},
                                 "mean": {}, "ci95": {}}
        for m in STAT_METRICS:
            v = np.array([vals[c][m] for c in cases])
            ok = v[np.isfinite(v)]
            stats["n"][m] = int(ok.size)
            stats["mean"][m] = float(ok.mean()) if ok.size else None
            lo, hi = metrics.bootstrap_ci(ok, n_boot, seed)
            stats["ci95"][m] = [lo, hi] if ok.size else None
        if ckey is not None and key != ckey and values.get(ckey):
            both = sorted(set(cases) & set(values[ckey]))
            stats["vs_chosen"] = {
                m: metrics.paired_wilcoxon([values[ckey][c][m] for c in both],
                                           [vals[c][m] for c in both], n_boot, seed)
                for m in STAT_METRICS}
        row["cases"] = stats
    results["case_statistics"] = {
        "chosen": None if chosen is None else chosen["name"],
        "best_single": None if best_single is None else best_single["name"],
        "metrics": dict(STAT_METRICS),
        "unit": "case (3-D, scan spacing); cases of every fold pooled, key (fold, case)",
        "ci": f"95% percentile bootstrap of the mean over cases, {n_boot} resamples, "
              f"numpy default_rng({seed})",
        "test": "paired two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon, zero "
                "differences dropped) of the chosen row against each row, difference = "
                "chosen - row; p-values not corrected for multiple comparisons",
    }
    return results


def case_statistics_columns(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Extra results.csv columns per row: per-case mean, CI bounds, difference to the
    chosen row and its Wilcoxon p-value for each :data:`STAT_METRICS` (blank if none)."""
    if "case_statistics" not in results:
        return [], [[] for _ in results["rows"]]
    names = list(results["case_statistics"].get("metrics") or STAT_METRICS)
    header = [f"{m}_{s}" for m in names
              for s in ("case_mean", "ci_low", "ci_high", "diff_vs_chosen", "p_vs_chosen")]

    def f(v: Any) -> str:
        return "" if v is None or not np.isfinite(v) else f"{v:.6g}"

    out = []
    for row in results["rows"]:
        st = row.get("cases") or {}
        cells = []
        for m in names:
            ci = (st.get("ci95") or {}).get(m) or [None, None]
            vs = (st.get("vs_chosen") or {}).get(m) or {}
            cells += [f((st.get("mean") or {}).get(m)), f(ci[0]), f(ci[1]),
                      f(vs.get("mean_difference")), f(vs.get("p_value"))]
        out.append(cells)
    return header, out


def evaluate_stage(cfg: EvaluateConfig, chosen: dict[str, Any], out: Path, force: bool = False,
                   source: str = "") -> dict[str, Any]:
    """Apply ``chosen`` (operator, members, thresholds, gate) to ``cfg``'s part; write
    metrics.json (every convention + the Empty baseline), per_slice.csv, per_case.csv."""
    missing = [k for k in CONFIG_KEYS if k not in chosen]
    if missing:
        raise InputError(f"{source}: configuration lacks {', '.join(missing)}")
    partial = fsutil.prepare_output_dir(out, force, "metrics.json")
    inp = open_inputs(cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, chosen["members"],
                      what="evaluation")
    conf = {k: chosen[k] for k in CONFIG_KEYS}
    result, per = evaluate_arrays(inp.maps, inp.masks, inp.case_ids, conf, inp.probs,
                                  inp.labels, cfg.min_lesion_fraction,
                                  cfg.classifier_threshold, cfg.chunk)

    def predicted(rows: np.ndarray) -> np.ndarray:
        mp = [np.concatenate([m.read(int(k), int(k) + 1) for k in rows]) for m in inp.maps]
        return apply_config(mp, conf, [p[rows] for p in inp.probs])

    result.update(store=str(cfg.store), fold=cfg.fold, part=cfg.part, config_file=str(source))
    _write_evaluation(partial, cfg, inp.store, inp.indices, inp.masks, per, result,
                      gate_probs(inp.probs), predicted)
    fsutil.commit_output_dir(partial, out)
    return result


def evaluate_masks(cfg: EvaluateConfig, pred: np.ndarray, out: Path, force: bool = False,
                   source: str = "") -> dict[str, Any]:
    """Score predicted masks (S, H, W) of ``cfg``'s part (store order, e.g. a U-Net's) in
    every convention, like :func:`evaluate_stage`; the Empty baseline alongside."""
    store, idx, gts = _part_with_masks(cfg)
    if pred.shape != (len(idx), *store.size):
        raise InputError(f"{source}: {pred.shape} masks for {len(idx)} slices of "
                         f"{store.size[0]}x{store.size[1]}")
    partial = fsutil.prepare_output_dir(out, force, "metrics.json")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tp", "fp", "fn", "tn")}
    for s in range(0, len(idx), cfg.chunk):
        counts = slice_counts(pred[s:s + cfg.chunk].astype(bool),
                              gts.read(s, s + cfg.chunk).astype(bool))
        for k, v in zip(("tp", "fp", "fn", "tn"), counts, strict=True):
            parts[k].append(v)
    per = {k: np.concatenate(v) for k, v in parts.items()}
    case_ids = store.table["case"][idx]
    res = score(per["tp"], per["fp"], per["fn"], per["tn"], case_ids, None, None,
                cfg.min_lesion_fraction, cfg.classifier_threshold)
    result = {"config": None, "metrics": res, "empty_baseline": empty_baseline(
                  per, case_ids, cfg.min_lesion_fraction, cfg.classifier_threshold),
              "store": str(cfg.store), "fold": cfg.fold, "part": cfg.part, "source": source}
    _write_evaluation(partial, cfg, store, idx, gts, per, result, None,
                      lambda rows: pred[rows].astype(bool))
    fsutil.commit_output_dir(partial, out)
    return result


def evaluate_unet(cfg: EvaluateConfig, checkpoint: Path, out: Path,
                  force: bool = False) -> dict[str, Any]:
    """Predict ``cfg``'s part with a U-Net checkpoint and score it (:func:`evaluate_masks`)."""
    from ensemblecam.stages.unet import predict_unet

    store, idx, _ = _part_with_masks(cfg)
    pred = predict_unet(checkpoint, store, idx)
    return evaluate_masks(cfg, pred, out, force=force, source=str(checkpoint))


def config_masks(maps: Sequence[np.ndarray | Rows], probs: Sequence[np.ndarray],
                 chosen: dict[str, Any], chunk: int = 256) -> np.ndarray:
    """uint8 masks (S, H, W) of configuration ``chosen`` over aligned member maps (stored
    dtype) and probabilities, applied chunk by chunk (:func:`apply_config`)."""
    srcs = [_as_rows(m) for m in maps]
    n = len(srcs[0])
    conf = {k: chosen[k] for k in CONFIG_KEYS}
    first = srcs[0].read(0, 1)
    masks = np.zeros((n, *first.shape[1:]), np.uint8)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        masks[s:e] = apply_config([m.read(s, e) for m in srcs], conf,
                                  [np.asarray(p)[s:e] for p in probs])
    return masks


def write_config_masks(cfg: EvaluateConfig, chosen: dict[str, Any], path: Path) -> Path:
    """The configuration's masks of ``cfg``'s part as ``masks.npz`` (arrays ``index`` int64
    store indices, ``masks`` uint8 0/1), the format export and pseudo-label training read."""
    inp = open_inputs(cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, chosen["members"],
                      what="mask export")
    masks = config_masks(inp.maps, inp.probs, chosen, cfg.chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, index=inp.indices.astype(np.int64), masks=masks)
    return path


def _part_with_masks(cfg: EvaluateConfig) -> tuple[Any, np.ndarray, Rows]:
    store, _, idx = annotated_part(cfg.store, cfg.splits, cfg.fold, cfg.part, "evaluation")
    return store, idx, Rows(store.masks, idx)


def empty_baseline(per: dict[str, np.ndarray], case_ids: np.ndarray,
                   min_lesion_fraction: float = 0.0, classifier_threshold: float = 0.5
                   ) -> dict[str, Any]:
    """Scores of the Empty prediction (all background) on the slices of ``per``."""
    gt_pix = per["tp"] + per["fn"]
    npix = gt_pix + per["fp"] + per["tn"]
    zero = np.zeros_like(gt_pix)
    return score(zero, zero, gt_pix, npix - gt_pix, case_ids, None, None,
                 min_lesion_fraction, classifier_threshold)


def _write_evaluation(partial: Path, cfg: EvaluateConfig, store: Any, idx: np.ndarray,
                      gts: Rows, per: dict[str, np.ndarray], result: dict[str, Any],
                      probs: np.ndarray | None,
                      predicted: Callable[[np.ndarray], np.ndarray]) -> None:
    """metrics.json, per_slice.csv, per_case.csv (+ HD95 of the stacked slices in voxels if
    ``cfg.hd95``) and per_case_empty.csv (the Empty prediction's per-case values).

    ``predicted(rows)`` gives the predicted masks of positions ``rows`` of ``idx``.
    """
    table = store.table
    slice_rows = []
    for j, i in enumerate(idx):
        tp, fp, fn = int(per["tp"][j]), int(per["fp"][j]), int(per["fn"][j])
        d, u = 2 * tp + fp + fn, tp + fp + fn
        slice_rows.append({"index": int(i), "case": table["case"][i],
                           "slice": int(table["slice"][i]), "part": table["part"][i],
                           "label": int(table["label"][i]),
                           "prob": None if probs is None else float(probs[j]),
                           "tp": tp, "fp": fp, "fn": fn, "tn": int(per["tn"][j]),
                           "dice": 2 * tp / d if d else 1.0, "iou": tp / u if u else 1.0})
    case_ids = table["case"][idx]
    case_rows, empty_rows = [], []
    for case in dict.fromkeys(case_ids.tolist()):
        sel = np.flatnonzero(case_ids == case)
        tp, fp, fn = (int(per[k][sel].sum()) for k in ("tp", "fp", "fn"))
        d = 2 * tp + fp + fn
        row: dict[str, Any] = {"case": case, "n_slices": len(sel), "tp": tp, "fp": fp,
                               "fn": fn, "dice": 2 * tp / d if d else 1.0}
        gt = np.concatenate([gts.read(int(k), int(k) + 1) for k in sel]).astype(bool)
        pr = np.asarray(predicted(sel)).astype(bool)
        if cfg.hd95:
            order = np.lexsort((table["slice"][idx[sel]], table["part"][idx[sel]]))
            row["hd95_voxels"] = case_hd95(pr[order], gt[order])
        geo = store.cases[case]
        where = [{k: table[k][i] for k in ("slice", "y0", "y1", "x0", "x1")} for i in idx[sel]]
        gt_v = slices_to_volume(geo, where, gt)
        spacing = voxel_sizes(np.asarray(geo["affine"], np.float64))
        row.update(_volume_columns(slices_to_volume(geo, where, pr), gt_v, spacing,
                                   cfg.nsd_tolerance_mm))
        case_rows.append(row)
        gt_n = tp + fn
        empty_rows.append({"case": case, "n_slices": len(sel), "tp": 0, "fp": 0, "fn": gt_n,
                           "dice": 0.0 if gt_n else 1.0,
                           **_volume_columns(np.zeros_like(gt_v), gt_v, spacing,
                                             cfg.nsd_tolerance_mm)})
    if cfg.hd95:
        vals = np.array([r["hd95_voxels"] for r in case_rows], float)
        ok = vals[np.isfinite(vals)]
        result["metrics"]["hd95_voxels_mean"] = float(ok.mean()) if ok.size else float("nan")
        result["metrics"]["hd95_voxels_std"] = float(ok.std()) if ok.size else float("nan")
        result["metrics"]["hd95_undefined_cases"] = int((~np.isfinite(vals)).sum())
    result["metrics"].update(case_summary(case_rows))
    result["empty_baseline"].update(case_summary(empty_rows))
    result["case_conventions"] = case_conventions(cfg.nsd_tolerance_mm)
    fsutil.write_json(partial / "metrics.json", result)
    fsutil.write_text(partial / "per_slice.csv", fsutil.csv_text(slice_rows))
    fsutil.write_text(partial / "per_case.csv", fsutil.csv_text(case_rows))
    fsutil.write_text(partial / "per_case_empty.csv", fsutil.csv_text(empty_rows))
