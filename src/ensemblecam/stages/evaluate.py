"""Apply a chosen ensemble configuration to held-out maps and score it in every convention.

The operators' reference semantics: :func:`ensemblecam.ensemble.operators.apply_config`.
Masks are read only to score; scores from per-slice counts:
:mod:`ensemblecam.metrics.conventions`.

Per-case 3-D metrics (:func:`~ensemblecam.metrics.conventions.case_row`, columns
:data:`~ensemblecam.metrics.conventions.CASE_COLUMNS` of ``per_case.csv`` and
``per_case_empty.csv``): each case's evaluated slices (predicted and reference) are
put back into the scan's voxel grid with the store's geometry
(:func:`ensemblecam.io.export.slices_to_volume`; voxels outside the stored windows are
background in both) and scored in the scan's voxel spacing (mm, from its affine):
HD95 and NSD through MONAI, BraTS 2023 lesion-wise Dice/HD95, lesion detection
(:func:`ensemblecam.metrics.case_metrics`).

Predicted pixels outside the scan's foreground (:func:`foreground`: the body or head,
found per slice by Otsu's threshold with holes filled) are counted over the evaluated
slices: ``metrics.json`` holds ``predicted_pixels``, ``predicted_outside_foreground``
and their ratio ``outside_foreground_fraction`` (null when nothing is predicted); the
report quotes them.

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

from ensemblecam import metrics
from ensemblecam import progress as progress_out
from ensemblecam.config import EvaluateConfig
from ensemblecam.ensemble.operators import EnsembleConfig, apply_config, gate_probs
from ensemblecam.ensemble.rows import Rows, as_rows
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.export import slices_to_volume
from ensemblecam.io.masks import MASKS_FILE, write_masks
from ensemblecam.metrics.classification import classifier_metrics
from ensemblecam.metrics.conventions import (
    STAT_METRICS,
    case_conventions,
    case_row,
    case_summary,
    empty_baseline,
    score,
    slice_counts,
)
from ensemblecam.stages.search import annotated_part, open_inputs, part_slices


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
    desc: str = "",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Apply ``config`` chunk by chunk; return (metrics, per-slice counts incl. Empty baseline).

    The Empty baseline (all-background prediction) is scored alongside under "empty".
    """
    srcs = [as_rows(a) for a in maps]
    gts = as_rows(masks)
    n = len(gts)
    if n == 0:
        raise InputError("empty evaluation set: no slices to score")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tp", "fp", "fn", "tn")}
    for start in progress_out.bar(
        range(0, n, chunk), desc=desc, unit="chunks", label="evaluate", enabled=progress
    ):
        stop = min(start + chunk, n)
        gt = gts.read(start, stop).astype(bool)
        mp = [s.read(start, stop) for s in srcs]
        for i, a in enumerate(mp):
            if a.shape != gt.shape:
                raise InputError(
                    f"member {config['members'][i] if 'members' in config else i}:"
                    f" maps of shape {a.shape[1:]} but masks of shape {gt.shape[1:]}"
                )
        pr = None if probs is None else [np.asarray(p)[start:stop] for p in probs]
        pred = apply_config(mp, config, pr)
        for k, v in zip(("tp", "fp", "fn", "tn"), slice_counts(pred, gt), strict=True):
            parts[k].append(v)
    per = {k: np.concatenate(v) for k, v in parts.items()}
    p = None if probs is None else gate_probs(probs)
    res = score(
        per["tp"],
        per["fp"],
        per["fn"],
        per["tn"],
        case_ids,
        p,
        min_lesion_fraction,
        classifier_threshold,
    )
    if p is not None and labels is not None:
        res["classifier"] = classifier_metrics(labels, p, classifier_threshold)
    empty = empty_baseline(per, case_ids, min_lesion_fraction, classifier_threshold)
    return {"config": config, "metrics": res, "empty_baseline": empty}, per


def foreground(images: np.ndarray) -> np.ndarray:
    """Bool (n, H, W) body/head mask of images (n, C, H, W), per slice: pixels above the
    Otsu threshold of the slice in some channel (``skimage.filters.threshold_otsu``; a
    constant channel adds none), holes filled (``scipy.ndimage.binary_fill_holes``) so dark
    tissue the body encloses counts. Otsu separates the dark background from the body
    without an intensity constant; the slice minimum alone does not, as scans have noise in
    the background (every pixel of the demo phantom lies above its slice's minimum)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    x = np.asarray(images, dtype=np.float32)
    out = np.zeros((x.shape[0], *x.shape[2:]), bool)
    for k, sl in enumerate(x):
        m = out[k]
        for ch in sl:
            if ch.max() > ch.min():
                m |= ch > threshold_otsu(ch)
        out[k] = ndimage.binary_fill_holes(m)
    return out


def _slice_foreground(store: Any, indices: np.ndarray) -> np.ndarray:
    """:func:`foreground` of store slices ``indices``, cached per (store, slice): every
    result row of an evaluation reads the same slices."""
    key = (str(store.path), store.identity)
    cache = _FOREGROUND.setdefault(key, {})
    if len(_FOREGROUND) > 4:  # other stores of earlier calls
        for old in [k for k in _FOREGROUND if k != key]:
            del _FOREGROUND[old]
    todo = [int(i) for i in indices if int(i) not in cache]
    if todo:
        for i, m in zip(todo, foreground(np.asarray(store.images[todo])), strict=True):
            cache[i] = m
    return np.stack([cache[int(i)] for i in indices])


_FOREGROUND: dict[tuple[str, str], dict[int, np.ndarray]] = {}


def case_hd95(
    pred_volume: np.ndarray, gt_volume: np.ndarray, spacing: Sequence[float] | None = None
) -> float:
    """HD95 of one case's stacked slices (see metrics.hd95)."""
    return metrics.hd95(pred_volume, gt_volume, spacing)


#: Bootstrap resamples and seed of every CI (fixed: results are reproducible).
N_BOOT = 2000
BOOT_SEED = 0


def _volume_columns(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], nsd_tolerance_mm: float
) -> dict[str, Any]:
    """case_row without the columns per_case.csv already has from the slice counts."""
    row = case_row(pred, gt, spacing, nsd_tolerance_mm)
    return {k: v for k, v in row.items() if k != "dice"}


def _csv_float(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def case_file(kind: str) -> str:
    """The per-case file of a result row in its eval folder (Empty: the Empty columns)."""
    return "per_case_empty.csv" if kind == "empty" else "per_case.csv"


def add_case_statistics(
    results: dict[str, Any],
    fold_results: dict[str, dict[str, Any]],
    root: Path,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
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
                        m: _csv_float(r.get(m)) for m in STAT_METRICS
                    }
    rows = results["rows"]
    chosen = next((r for r in rows if r["kind"] == "ensemble"), None)
    ckey = None if chosen is None else (chosen["kind"], chosen["name"])
    objective = results.get("objective", "paper_miou")
    singles = [
        r
        for r in rows
        if r["kind"] == "single" and (r.get("mean") or {}).get(objective) is not None
    ]
    best_single = max(singles, key=lambda r: r["mean"][objective], default=None)
    for row in rows:
        key = (row["kind"], row["name"])
        vals = values.get(key)
        if not vals:
            continue
        cases = sorted(vals)
        stats: dict[str, Any] = {
            "files": files[key],
            "n_cases": len(cases),
            "n": {},
            "mean": {},
            "ci95": {},
        }
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
                m: metrics.paired_wilcoxon(
                    [values[ckey][c][m] for c in both], [vals[c][m] for c in both], n_boot, seed
                )
                for m in STAT_METRICS
            }
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
    header = [
        f"{m}_{s}"
        for m in names
        for s in ("case_mean", "ci_low", "ci_high", "diff_vs_chosen", "p_vs_chosen")
    ]

    def f(v: Any) -> str:
        return "" if v is None or not np.isfinite(v) else f"{v:.6g}"

    out = []
    for row in results["rows"]:
        st = row.get("cases") or {}
        cells = []
        for m in names:
            ci = (st.get("ci95") or {}).get(m) or [None, None]
            vs = (st.get("vs_chosen") or {}).get(m) or {}
            cells += [
                f((st.get("mean") or {}).get(m)),
                f(ci[0]),
                f(ci[1]),
                f(vs.get("mean_difference")),
                f(vs.get("p_value")),
            ]
        out.append(cells)
    return header, out


def evaluate_stage(
    cfg: EvaluateConfig, chosen: dict[str, Any], out: Path, force: bool = False, source: str = ""
) -> dict[str, Any]:
    """Apply ``chosen`` (operator, members, thresholds, gate) to ``cfg``'s part; write
    metrics.json (every convention + the Empty baseline), per_slice.csv, per_case.csv."""
    conf = EnsembleConfig.from_dict(chosen, source).to_dict()
    partial = fsutil.prepare_output_dir(out, force, "metrics.json")
    inp = open_inputs(
        cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, conf["members"], what="evaluation"
    )
    assert inp.masks is not None
    result, per = evaluate_arrays(
        inp.maps,
        inp.masks,
        inp.case_ids,
        conf,
        inp.probs,
        inp.labels,
        cfg.min_lesion_fraction,
        cfg.classifier_threshold,
        cfg.chunk,
        desc=out.name,
    )

    def predicted(rows: np.ndarray) -> np.ndarray:
        mp = [np.concatenate([m.read(int(k), int(k) + 1) for k in rows]) for m in inp.maps]
        return apply_config(mp, conf, [p[rows] for p in inp.probs])

    result.update(store=str(cfg.store), fold=cfg.fold, part=cfg.part, config_file=str(source))
    _write_evaluation(
        partial,
        cfg,
        inp.store,
        inp.indices,
        inp.masks,
        per,
        result,
        gate_probs(inp.probs),
        predicted,
    )
    fsutil.commit_output_dir(partial, out)
    return result


def evaluate_masks(
    cfg: EvaluateConfig,
    pred: np.ndarray,
    out: Path,
    force: bool = False,
    source: str = "",
    keep_masks: bool = False,
    keep: tuple[np.ndarray, np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score predicted masks (S, H, W) of ``cfg``'s part (store order, e.g. a U-Net's) in
    every convention, like :func:`evaluate_stage`; the Empty baseline alongside.
    ``keep_masks``: also write them as ``<out>/masks.npz`` (:func:`write_masks`); ``keep``
    (store indices, masks): write those instead (e.g. every slice of the part); ``extra``:
    more keys of metrics.json."""
    store, idx, gts = _part_with_masks(cfg)
    if pred.shape != (len(idx), *store.size):
        raise InputError(
            f"{source}: {pred.shape} masks for {len(idx)} slices of {store.size[0]}x{store.size[1]}"
        )
    partial = fsutil.prepare_output_dir(out, force, "metrics.json")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tp", "fp", "fn", "tn")}
    for s in range(0, len(idx), cfg.chunk):
        counts = slice_counts(
            pred[s : s + cfg.chunk].astype(bool), gts.read(s, s + cfg.chunk).astype(bool)
        )
        for k, v in zip(("tp", "fp", "fn", "tn"), counts, strict=True):
            parts[k].append(v)
    per = {k: np.concatenate(v) for k, v in parts.items()}
    case_ids = store.table["case"][idx]
    res = score(
        per["tp"],
        per["fp"],
        per["fn"],
        per["tn"],
        case_ids,
        None,
        cfg.min_lesion_fraction,
        cfg.classifier_threshold,
    )
    result = {
        "config": None,
        "metrics": res,
        "empty_baseline": empty_baseline(
            per, case_ids, cfg.min_lesion_fraction, cfg.classifier_threshold
        ),
        "store": str(cfg.store),
        "fold": cfg.fold,
        "part": cfg.part,
        "source": source,
        **(extra or {}),
    }
    _write_evaluation(
        partial, cfg, store, idx, gts, per, result, None, lambda rows: pred[rows].astype(bool)
    )
    if keep is not None:
        write_masks(partial / MASKS_FILE, *keep)
    elif keep_masks:
        write_masks(partial / MASKS_FILE, idx, pred)
    fsutil.commit_output_dir(partial, out)
    return result


def evaluate_unet(
    cfg: EvaluateConfig,
    checkpoint: Path,
    out: Path,
    force: bool = False,
    gate: tuple[Sequence[Path], float] | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Predict every slice of ``cfg``'s part with a U-Net checkpoint and score the annotated
    ones (:func:`evaluate_masks`); all predicted masks are kept as ``<out>/masks.npz`` (what
    ``run`` exports). A part without masks: masks.npz and a metrics.json with
    ``"scored": false`` and null metrics. ``threshold``: masks are P(lesion) > threshold
    (:mod:`ensemblecam.stages.threshold`; None: the argmax; metrics.json ``threshold``).
    ``gate`` (classifier map sets, threshold): slices whose mean classifier probability is
    below the threshold are emptied next (:mod:`ensemblecam.stages.gate`; metrics.json
    ``gate`` records it)."""
    from ensemblecam.stages.gate import gate_masks, gate_record, map_set_probs
    from ensemblecam.stages.unet import predict_unet

    store, _, idx = part_slices(cfg.store, cfg.splits, cfg.fold, cfg.part)
    pred = predict_unet(checkpoint, store, idx, threshold=threshold)
    extra: dict[str, Any] = {"threshold": threshold}
    if gate is not None:
        probs = map_set_probs(gate[0], idx)
        pred = gate_masks(pred, probs, gate[1])
        extra["gate"] = gate_record(probs, gate[1], [str(p) for p in gate[0]])
    ann = store.annotated(idx)
    if ann.any():
        return evaluate_masks(
            cfg, pred[ann], out, force=force, source=str(checkpoint), keep=(idx, pred),
            extra=extra,
        )  # fmt: skip
    partial = fsutil.prepare_output_dir(out, force, "metrics.json")
    write_masks(partial / MASKS_FILE, idx, pred)
    result = {
        "config": None,
        "metrics": None,
        "scored": False,
        "note": "no masks in this part: masks written, nothing scored",
        "store": str(cfg.store),
        "fold": cfg.fold,
        "part": cfg.part,
        "source": str(checkpoint),
        **extra,
    }
    fsutil.write_json(partial / "metrics.json", result)
    fsutil.commit_output_dir(partial, out)
    return result


def config_masks(
    maps: Sequence[np.ndarray | Rows],
    probs: Sequence[np.ndarray],
    chosen: EnsembleConfig | dict[str, Any],
    chunk: int = 256,
) -> np.ndarray:
    """uint8 masks (S, H, W) of configuration ``chosen`` over aligned member maps (stored
    dtype) and probabilities, applied chunk by chunk (:func:`apply_config`)."""
    srcs = [as_rows(m) for m in maps]
    n = len(srcs[0])
    conf = chosen if isinstance(chosen, EnsembleConfig) else EnsembleConfig.from_dict(chosen)
    first = srcs[0].read(0, 1)
    masks = np.zeros((n, *first.shape[1:]), np.uint8)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        masks[s:e] = apply_config(
            [m.read(s, e) for m in srcs], conf, [np.asarray(p)[s:e] for p in probs]
        )
    return masks


def write_config_masks(
    cfg: EvaluateConfig, chosen: EnsembleConfig | dict[str, Any], path: Path
) -> Path:
    """The configuration's masks of every slice of ``cfg``'s part (masks not needed) as
    ``masks.npz`` (:func:`ensemblecam.io.masks.write_masks`), the format export and
    pseudo-label training read."""
    conf = chosen if isinstance(chosen, EnsembleConfig) else EnsembleConfig.from_dict(chosen)
    inp = open_inputs(
        cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, conf.members, slices="all"
    )
    return write_masks(path, inp.indices, config_masks(inp.maps, inp.probs, conf, cfg.chunk))


def _part_with_masks(cfg: EvaluateConfig) -> tuple[Any, np.ndarray, Rows]:
    store, _, idx = annotated_part(cfg.store, cfg.splits, cfg.fold, cfg.part, "evaluation")
    return store, idx, Rows(store.masks, idx)


def _slice_rows(
    table: Any, idx: np.ndarray, per: dict[str, np.ndarray], probs: np.ndarray | None
) -> list[dict[str, Any]]:
    """per_slice.csv: one row per evaluated slice (counts, Dice and IoU; 1 when both masks
    are empty)."""
    rows = []
    for j, i in enumerate(idx):
        tp, fp, fn = int(per["tp"][j]), int(per["fp"][j]), int(per["fn"][j])
        d, u = 2 * tp + fp + fn, tp + fp + fn
        rows.append(
            {
                "index": int(i),
                "case": table["case"][i],
                "slice": int(table["slice"][i]),
                "part": table["part"][i],
                "label": int(table["label"][i]),
                "prob": None if probs is None else float(probs[j]),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": int(per["tn"][j]),
                "dice": 2 * tp / d if d else 1.0,
                "iou": tp / u if u else 1.0,
            }
        )
    return rows


def _case_rows(
    cfg: EvaluateConfig,
    store: Any,
    idx: np.ndarray,
    gts: Rows,
    per: dict[str, np.ndarray],
    predicted: Callable[[np.ndarray], np.ndarray],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
    """per_case.csv and per_case_empty.csv rows (the prediction's and the Empty
    prediction's), the predicted pixels and those outside the body foreground."""
    table = store.table
    case_ids = table["case"][idx]
    case_rows, empty_rows = [], []
    outside = predicted_px = 0
    for case in dict.fromkeys(case_ids.tolist()):
        sel = np.flatnonzero(case_ids == case)
        tp, fp, fn = (int(per[k][sel].sum()) for k in ("tp", "fp", "fn"))
        d = 2 * tp + fp + fn
        row: dict[str, Any] = {
            "case": case,
            "n_slices": len(sel),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "dice": 2 * tp / d if d else 1.0,
        }
        gt = np.concatenate([gts.read(int(k), int(k) + 1) for k in sel]).astype(bool)
        pr = np.asarray(predicted(sel)).astype(bool)
        fg = _slice_foreground(store, idx[sel])
        outside += int(np.count_nonzero(pr & ~fg))
        predicted_px += int(np.count_nonzero(pr))
        if cfg.hd95:
            order = np.lexsort((table["slice"][idx[sel]], table["part"][idx[sel]]))
            row["hd95_voxels"] = case_hd95(pr[order], gt[order])
        geo = store.cases[case]
        where = [{k: table[k][i] for k in ("slice", "y0", "y1", "x0", "x1")} for i in idx[sel]]
        gt_v = slices_to_volume(geo, where, gt)
        spacing = voxel_sizes(np.asarray(geo["affine"], np.float64))
        row.update(
            _volume_columns(slices_to_volume(geo, where, pr), gt_v, spacing, cfg.nsd_tolerance_mm)
        )
        case_rows.append(row)
        gt_n = tp + fn
        empty_rows.append(
            {
                "case": case,
                "n_slices": len(sel),
                "tp": 0,
                "fp": 0,
                "fn": gt_n,
                "dice": 0.0 if gt_n else 1.0,
                **_volume_columns(np.zeros_like(gt_v), gt_v, spacing, cfg.nsd_tolerance_mm),
            }
        )
    return case_rows, empty_rows, predicted_px, outside


def _write_evaluation(
    partial: Path,
    cfg: EvaluateConfig,
    store: Any,
    idx: np.ndarray,
    gts: Rows,
    per: dict[str, np.ndarray],
    result: dict[str, Any],
    probs: np.ndarray | None,
    predicted: Callable[[np.ndarray], np.ndarray],
) -> None:
    """metrics.json, per_slice.csv, per_case.csv (+ HD95 of the stacked slices in voxels if
    ``cfg.hd95``) and per_case_empty.csv (the Empty prediction's per-case values).

    ``predicted(rows)`` gives the predicted masks of positions ``rows`` of ``idx``.
    """
    slice_rows = _slice_rows(store.table, idx, per, probs)
    case_rows, empty_rows, predicted_px, outside = _case_rows(cfg, store, idx, gts, per, predicted)
    if cfg.hd95:
        vals = np.array([r["hd95_voxels"] for r in case_rows], float)
        ok = vals[np.isfinite(vals)]
        result["metrics"]["hd95_voxels_mean"] = float(ok.mean()) if ok.size else float("nan")
        result["metrics"]["hd95_voxels_std"] = float(ok.std()) if ok.size else float("nan")
        result["metrics"]["hd95_undefined_cases"] = int((~np.isfinite(vals)).sum())
    result["metrics"].update(case_summary(case_rows))
    result["metrics"].update(
        predicted_pixels=predicted_px,
        predicted_outside_foreground=outside,
        outside_foreground_fraction=outside / predicted_px if predicted_px else None,
    )
    result["empty_baseline"].update(case_summary(empty_rows))
    result["case_conventions"] = case_conventions(cfg.nsd_tolerance_mm)
    fsutil.write_json(partial / "metrics.json", result)
    fsutil.write_text(partial / "per_slice.csv", fsutil.csv_text(slice_rows))
    fsutil.write_text(partial / "per_case.csv", fsutil.csv_text(case_rows))
    fsutil.write_text(partial / "per_case_empty.csv", fsutil.csv_text(empty_rows))
