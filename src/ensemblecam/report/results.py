"""The Results and Threshold search sections: the results table beside the published
figures, every metric convention, the per-case statistics and the threshold heatmaps, all
read from results.json and the files the stages wrote."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ensemblecam.ensemble.grid import DEFAULT_GRID, parse_grid
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import FoldLayout
from ensemblecam.report.figures import (
    case_box_plot,
    results_bar_chart,
    threshold_heatmap,
)
from ensemblecam.report.html import Page, esc, html_table
from ensemblecam.report.reference import (
    REFERENCE_FIGURES,
    REFERENCE_METRICS,
    REFERENCE_SOURCES,
    fold_configs,
    is_phantom,
    reference_matches,
    reference_setting,
    row_identity,
)
from ensemblecam.report.run import (
    Run,
    best_json,
    read_csv,
)
from ensemblecam.report.text import (
    describe_config,
    format_metric,
    num,
    row_config_text,
)

#: Short explanation of each metric convention (:mod:`ensemblecam.metrics`).
METRIC_EXPLANATIONS: dict[str, str] = {
    "paper_miou": "Seed paper's mIoU: ONE confusion matrix over all pixels of all evaluated "
    "slices (lesion-free slices included); mean of background IoU and lesion IoU.",
    "paper_dsc": "Seed paper's DSC = 2 mIoU / (1 + mIoU), DERIVED from paper_miou as in the "
    "paper's tables; it is not a measured Dice.",
    "background_iou": "IoU of the background class over the data set: TN / (TN + FP + FN).",
    "lesion_iou": "IoU of the lesion class over the data set: TP / (TP + FP + FN).",
    "lesion_dice": "Dice of the lesion class over the data set: 2TP / (2TP + FP + FN).",
    "slice_dice": "Per-slice Dice averaged over lesion slices (empty prediction scores 0).",
    "slice_iou": "Per-slice IoU averaged over lesion slices.",
    "slice_dice_large": "slice_dice over slices whose lesion covers more than the configured "
    "share of the slice (thesis: 2%).",
    "slice_iou_large": "slice_iou over slices whose lesion covers more than the configured share.",
    "slice_dice_correct": "slice_dice over lesion slices the classifier calls positive.",
    "slice_iou_correct": "slice_iou over lesion slices the classifier calls positive "
    "(the thesis's Table 4.3 subset).",
    "case_dice": "Per-case 3-D Dice of all slices of the case together (BraTS convention); "
    "empty prediction on a lesion-free case scores 1.",
    "hd95_voxels": "95th-percentile Hausdorff distance per case, in voxels (lower is better).",
}

#: Headline metrics, in this order when present.
HEADLINE = (
    "paper_miou",
    "paper_dsc",
    "lesion_iou",
    "lesion_dice",
    "slice_dice_mean",
    "case_dice_mean",
)


def _is_set_level(name: str) -> bool:
    """Metrics of ONE confusion matrix over the data set (vs per-slice / per-case means)."""
    return not any(x in name for x in ("slice_", "case_", "hd95"))


def _metric_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    return html_table(
        ["result", *names],
        [
            [
                r["name"],
                *(
                    format_metric(n, (r.get("mean") or {}).get(n), (r.get("std") or {}).get(n))
                    for n in names
                ),
            ]
            for r in rows
        ],
    )


def section_results(rep: Page, run: Run, folds: list[str]) -> None:
    res = run.results
    rows: list[dict[str, Any]] = res["rows"]
    names = [str(n) for n in res.get("metric_names") or []]
    if not names:
        names = list(dict.fromkeys(k for r in rows for k in (r.get("mean") or {})))
    objective = str(res.get("objective", "paper_miou"))
    rep.h2("results", "Results")
    prep = run.store.manifest.get("prepare", {}) if run.store is not None else {}
    phantom = is_phantom(prep, run.run_json)
    ref_key, reason = reference_setting(prep, phantom)
    rep.p(
        f"{len(folds)} fold(s): {', '.join(folds)}. Mean ± std over folds (population "
        f"std), in percent with one decimal as in the paper. Configurations were chosen "
        f"on the calibration part by {objective}; every number is on held-out data. "
        "Operator and single-member rows use each fold's own best members and "
        "thresholds (listed below)."
    )
    rep.p(reason, "note" if ref_key is None else "")
    rep.add(_results_table(rows, names, ref_key))
    if ref_key is not None:
        rep.p(f"Published: {REFERENCE_SOURCES[ref_key]}.")
    _outside_foreground(rep, run, rows)
    okrows = [r for r in rows if np.isfinite(num((r.get("mean") or {}).get(objective)))]
    if okrows:
        rep.figure(
            "results_" + re.sub(r"[^\w]", "_", objective) + ".png",
            results_bar_chart(
                [str(r["name"]) for r in okrows],
                [num(r["mean"][objective]) for r in okrows],
                [num((r.get("std") or {}).get(objective)) for r in okrows],
                objective,
            ),
            f"{objective}: mean ± std over folds per result row",
            760,
        )
    with_cfg = [r for r in rows if fold_configs(r.get("config"))]
    if folds and with_cfg:
        rep.add("<h3>Configuration of each row per fold (operator: member map > threshold)</h3>\n")
        rep.add(
            html_table(
                ["result", *folds],
                [[r["name"], *(row_config_text(r, f) for f in folds)] for r in with_cfg],
                "configs",
            )
        )
    set_level = [n for n in names if _is_set_level(n)]
    per_item = [n for n in names if not _is_set_level(n)]
    rep.add("<h3>Every metric convention</h3>\n")
    if set_level:
        rep.add(
            "<p>Over the data set (one confusion matrix of all evaluated pixels):</p>\n"
            + _metric_table(rows, set_level)
        )
    if per_item:
        rep.add(
            "<p>Per slice and per case (means over lesion slices / cases):</p>\n"
            + _metric_table(rows, per_item)
        )
    if folds:
        rep.add(f"<h3>{esc(objective)} per fold</h3>\n")
        rep.add(
            html_table(
                ["result", *folds],
                [
                    [
                        r["name"],
                        *(
                            format_metric(
                                objective, ((r.get("per_fold") or {}).get(f) or {}).get(objective)
                            )
                            for f in folds
                        ),
                    ]
                    for r in rows
                ],
            )
        )
    _conventions_and_references(rep, names, ref_key, prep, phantom)


def _results_table(rows: list[dict[str, Any]], names: list[str], ref_key: str | None) -> str:
    """The headline metrics of every row, with the published figure of the matching row
    (:func:`reference_matches`) when the setting is comparable."""
    head = [n for n in HEADLINE if n in names] or names[:6]
    refs = REFERENCE_FIGURES.get(ref_key or "", [])
    ref_cols = list(REFERENCE_METRICS.get(ref_key or "", ()))
    header = ["result", "kind", *head, *(f"published {m}" for m in ref_cols)]
    body = []
    for r in rows:
        mean, std = r.get("mean") or {}, r.get("std") or {}
        ident = row_identity(r)
        pub = []
        for m in ref_cols:
            hit = next((x for x in refs if reference_matches(x, ident) and m in x.values), None)
            if hit is None:
                pub.append("")
            else:
                v, s = hit.values[m]
                pub.append(
                    f"{v:.1f}" + (f" ± {s:.1f}" if s is not None else "") + f" ({hit.method})"
                )
        body.append(
            [
                r["name"],
                r.get("kind", ""),
                *(format_metric(n, mean.get(n), std.get(n)) for n in head),
                *pub,
            ]
        )
    return html_table(header, body, "results")


def _conventions_and_references(
    rep: Page, names: list[str], ref_key: str | None, prep: dict[str, Any], phantom: bool | None
) -> None:
    """The legend of the metric conventions, then the published figures (for orientation
    only when the data is a phantom of a comparable setting)."""
    legend = []
    for n in names:
        text = METRIC_EXPLANATIONS.get(n) or METRIC_EXPLANATIONS.get(re.sub(r"_(mean|std)$", "", n))
        if text is not None:
            legend.append((n, text))
    if legend:
        rep.add(
            "<h3>Metric conventions</h3>\n" + html_table(["metric", "meaning"], legend, "facts")
        )
    other = REFERENCE_FIGURES.get(ref_key or "") if ref_key else None
    if other is None and prep:
        layout = str(prep.get("layout", ""))
        other_key = {"brats": "brats", "msd": "prostate", "kits": "kits"}.get(layout)
        if other_key and phantom:
            rep.add("<h3>Published figures (for orientation only, NOT comparable)</h3>\n")
            _reference_table(rep, other_key)
    elif other:
        rep.add("<h3>Published figures</h3>\n")
        _reference_table(rep, ref_key or "")


#: Per-case metrics shown as box/strip plots (when in results.json's case statistics).
CASE_PLOT_METRICS = ("dice", "lesionwise_dice")
_CASE_LABELS = {
    "dice": "case Dice (3-D)",
    "nsd": "NSD",
    "hd95_mm": "HD95 (mm)",
    "lesionwise_dice": "lesion-wise Dice (BraTS 2023)",
    "lesionwise_hd95_mm": "lesion-wise HD95 (mm, BraTS 2023)",
    "lesion_sensitivity": "lesion sensitivity",
    "fp_lesions": "FP lesions per case",
}


CASE_EXPLANATIONS = {
    "dice": "3-D Dice of the case's evaluated slices: 2TP / (2TP + FP + FN); empty "
    "prediction on a lesion-free case scores 1.",
    "nsd": "Normalised surface Dice (MONAI): share of both surfaces (voxels) within the "
    "tolerance (mm) of the other; both empty 1, one empty 0.",
    "hd95_mm": "95th-percentile Hausdorff distance (MONAI) in mm; both empty 0, undefined "
    "when exactly one is empty (left out).",
    "lesionwise_dice": "BraTS 2023 lesion-wise Dice: reference lesions = 26-connected "
    "components after merging by dilation (3 x 18-neighbourhood), lesions "
    "<= 50 mm^3 dropped; matched predicted components scored per lesion, "
    "every missed lesion and false-positive component scores 0; mean over "
    "lesions + false positives; nothing to score: 1.",
    "lesionwise_hd95_mm": "BraTS 2023 lesion-wise HD95 (same matching): missed lesions and "
    "false positives 374 mm; nothing to score: 0.",
    "lesion_sensitivity": "Reference lesions (above the minimum volume) matched by a "
    "predicted component / all such lesions; undefined without any.",
    "fp_lesions": "Predicted components matching no reference lesion, per case.",
}


def _case_value(metric: str, v: Any) -> str:
    """A per-case statistic: fractions in % (one decimal), mm and counts plain."""
    if v is None or not np.isfinite(num(v)):
        return "–"
    v = float(v)
    if metric in ("hd95_mm", "lesionwise_hd95_mm", "fp_lesions"):
        return f"{v:.3g}"
    return f"{100 * v:.1f}"


def _case_diff(metric: str, v: Any) -> str:
    if v is None or not np.isfinite(num(v)):
        return "–"
    return ("+" if float(v) >= 0 else "") + _case_value(metric, v)


def _p_text(p: Any) -> str:
    if p is None or not np.isfinite(num(p)):
        return "p –"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def outside_foreground(run: Run, row: dict[str, Any]) -> tuple[int, int] | None:
    """(predicted lesion pixels, those outside the scan's foreground) of a result row, summed
    over its folds' evaluations (``metrics.json`` beside each per-case file results.json
    names); None when an evaluation did not record them (an older run) or for Empty."""
    files = ((row.get("cases") or {}).get("files") or {}).values()
    if row.get("kind") == "empty" or not files:
        return None
    total = outside = 0
    for f in files:
        path = (run.path / str(f)).parent / "metrics.json"
        if not path.is_file():
            return None
        m = fsutil.read_json(path, "evaluation").get("metrics") or {}
        if m.get("predicted_pixels") is None or m.get("predicted_outside_foreground") is None:
            return None
        total += int(m["predicted_pixels"])
        outside += int(m["predicted_outside_foreground"])
    return total, outside


def _outside_foreground(rep: Page, run: Run, rows: list[dict[str, Any]]) -> None:
    """Per row: the share of predicted lesion pixels outside the scan's foreground, as the
    evaluation counted it (never recomputed here)."""
    found = [(r, outside_foreground(run, r)) for r in rows]
    body = [
        [
            r["name"],
            f"{v[0]:,}",
            f"{v[1]:,}",
            f"{100 * v[1] / v[0]:.1f}" if v[0] else "–",
        ]
        for r, v in found
        if v is not None
    ]
    rep.add("<h3>Predicted lesion outside the scan</h3>\n")
    if not body:
        rep.p(
            "Not recorded: this run's evaluations predate the count of predicted pixels "
            "outside the scan's foreground (rerun the evaluate stage to get it).",
            "note",
        )
        return
    rep.p(
        "Predicted lesion pixels that lie outside the body or head (per slice: pixels above "
        "Otsu's threshold in some channel, holes filled; as the evaluation counted them), "
        "evaluated part, all folds together. A lesion cannot lie there, so every such pixel "
        "is a false positive; a large share means blobs outside the body."
    )
    worst = max(body, key=lambda c: num(c[3]) if c[3] != "–" else -1.0)
    if worst[3] != "–" and float(worst[3]) > 0:
        rep.p(
            f"Highest share: {worst[0]}, {worst[3]}% of its predicted lesion pixels lie "
            "outside the scan.",
            "note",
        )
    rep.add(
        html_table(
            ["result", "predicted lesion pixels", "outside the foreground", "share outside (%)"],
            body,
            "sortable",
        )
    )


def section_case_statistics(rep: Page, run: Run) -> None:
    """Per-case 3-D metrics with 95% CIs, paired tests against the chosen configuration and
    box/strip plots; every number is read from results.json and the per-case CSV files
    it names (nothing is recomputed)."""
    stats = run.results.get("case_statistics")
    rows = [r for r in run.results["rows"] if isinstance(r.get("cases"), dict)]
    if not isinstance(stats, dict) or not rows:
        return
    names = [m for m in (stats.get("metrics") or {}) if isinstance(m, str)]
    chosen, best_single = stats.get("chosen"), stats.get("best_single")
    rep.add(
        '<h3 id="cases">Per case (3-D, scan spacing): means with 95% confidence intervals</h3>\n'
    )
    rep.p(
        f"Unit: {stats.get('unit', 'case')}. CI: {stats.get('ci', '')}. Dice, NSD, "
        "lesion-wise Dice and lesion sensitivity in percent; HD95 in mm; FP lesions per "
        "case. HD95 is left out where exactly one of prediction and reference is empty; "
        "lesion sensitivity where the reference has no lesion."
    )

    def label(r: dict[str, Any]) -> str:
        return str(r["name"]) + (" [best single member]" if r["name"] == best_single else "")

    body = []
    for r in rows:
        c = r["cases"]
        cells = [label(r), str(c.get("n_cases", ""))]
        for m in names:
            ci = (c.get("ci95") or {}).get(m) or [None, None]
            cells.append(
                f"{_case_value(m, (c.get('mean') or {}).get(m))} "
                f"[{_case_value(m, ci[0])}, {_case_value(m, ci[1])}]"
            )
        body.append(cells)
    rep.add(
        html_table(
            ["result", "cases", *(_CASE_LABELS.get(m, m) for m in names)], body, "cases sortable"
        )
    )
    rep.add(
        "<details><summary>Per-case conventions</summary>\n"
        + html_table(
            ["metric", "meaning"],
            [
                (_CASE_LABELS.get(m, m), CASE_EXPLANATIONS[m])
                for m in names
                if m in CASE_EXPLANATIONS
            ],
            "facts",
        )
        + "</details>\n"
    )
    compared = [r for r in rows if isinstance(r["cases"].get("vs_chosen"), dict)]
    if chosen and compared:
        rep.add(f"<h3>Paired comparison: {esc(chosen)} minus each row</h3>\n")
        rep.p(
            f"Mean difference over the cases both rows scored [95% bootstrap CI], and the "
            f"p-value of the {stats.get('test', 'paired Wilcoxon signed-rank test')}. "
            "Higher is better for Dice, NSD and sensitivity, lower for HD95 and FP lesions."
        )
        body = []
        for r in compared:
            vs = r["cases"]["vs_chosen"]
            cells = [label(r)]
            for m in names:
                t = vs.get(m) or {}
                ci = t.get("ci95") or [None, None]
                cells.append(
                    f"{_case_diff(m, t.get('mean_difference'))} "
                    f"[{_case_diff(m, ci[0])}, {_case_diff(m, ci[1])}], "
                    f"{_p_text(t.get('p_value'))} (n={t.get('n', 0)})"
                )
            body.append(cells)
        rep.add(
            html_table(
                ["compared with", *(_CASE_LABELS.get(m, m) for m in names)], body, "comparisons"
            )
        )
    _case_plots(rep, run, rows, names, label)
    top = next((r for r in rows if r["name"] == chosen), None)
    if top is not None:
        _per_case_table(rep, run, top, names)


def _case_rows(run: Run, row: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(fold, per-case line) of every case of a row, from the per-case files results.json
    names for it (``cases.files``: {fold: path relative to the run folder})."""
    out = []
    for fold, f in (row["cases"].get("files") or {}).items():
        path = run.path / str(f)
        if not path.is_file():
            raise InputError(f"{path}: per-case file named in results.json not found")
        out += [(str(fold), line) for line in read_csv(path)]
    return out


def _case_floats(run: Run, row: dict[str, Any], metric: str) -> list[float]:
    """The row's per-case values of ``metric`` (blank: undefined, left out)."""
    files = (row["cases"].get("files") or {}).values()
    try:
        return [
            float(x[metric]) for _, x in _case_rows(run, row) if x.get(metric) not in (None, "")
        ]
    except (KeyError, ValueError) as exc:
        where = ", ".join(str(run.path / str(f)) for f in files)
        raise InputError(f"{where}: malformed per-case file ({exc})") from exc


def _case_plots(
    rep: Page, run: Run, rows: list[dict[str, Any]], names: list[str], label: Any
) -> None:
    """Box/strip plots of :data:`CASE_PLOT_METRICS`, one box per result row."""
    for m in CASE_PLOT_METRICS:
        if m not in names:
            continue
        shown = [label(r) for r in rows]
        values = [_case_floats(run, r, m) for r in rows]
        scale = 100.0 if m not in ("hd95_mm", "lesionwise_hd95_mm", "fp_lesions") else 1.0
        unit = " (%)" if scale == 100.0 else ""
        rep.figure(
            f"cases_{m}.png",
            case_box_plot(
                shown,
                [np.asarray(v) * scale for v in values],
                f"{_CASE_LABELS.get(m, m)}{unit}, one dot per case",
            ),
            f"{_CASE_LABELS.get(m, m)} per case, every result row (box: median and quartiles)",
            760,
        )


def _per_case_table(rep: Page, run: Run, row: dict[str, Any], names: list[str]) -> None:
    """Every case of the chosen row with its stored per-case values, worst Dice first."""
    lines = _case_rows(run, row)
    if not lines:
        return
    cols = [m for m in names if m in lines[0][1]]

    def key(fl: tuple[str, dict[str, str]]) -> tuple[bool, float, str, str]:
        d = num(fl[1].get("dice"))
        return not math.isfinite(d), d if math.isfinite(d) else 0.0, fl[0], fl[1].get("case", "")

    order = sorted(lines, key=key)
    body = [
        [fold, x.get("case", ""), *(_case_value(m, num(x.get(m))) for m in cols)]
        for fold, x in order
    ]
    rep.add(
        f"<details><summary>Every case of {esc(row['name'])} ({len(body)} cases, "
        "lowest case Dice first, click to open; click a column header to sort)</summary>\n"
        + html_table(
            ["fold", "case", *(_CASE_LABELS.get(m, m) for m in cols)], body, "percase sortable"
        )
        + "</details>\n"
    )


def _reference_table(rep: Page, key: str) -> None:
    metrics_ = REFERENCE_METRICS[key]
    rows = []
    for ref in REFERENCE_FIGURES[key]:
        cells = []
        for m in metrics_:
            v, s = ref.values.get(m, (float("nan"), None))
            cells.append(f"{v:.1f}" + (f" ± {s:.1f}" if s is not None else ""))
        rows.append([ref.method, *cells])
    rep.add(html_table(["method", *metrics_], rows))
    rep.p(f"Source: {REFERENCE_SOURCES[key]}.")


def section_heatmaps(rep: Page, run: Run, folds: list[str]) -> None:
    rep.h2("thresholds", "Threshold search (the paper's Fig. 4)")
    rep.p(
        "One heatmap per fold: the objective of the fold's chosen operator and member "
        "pair over the threshold grid, on the calibration part (the held-out part is "
        "never used to choose). Members and thresholds can differ between folds."
    )
    made = 0
    rep.add('<div class="grid">\n')
    for fold in folds:
        best = best_json(run, fold)
        if best is None:
            continue
        png = _heatmap_for(run.layout.fold(fold), best)
        if png is None:
            continue
        safe = re.sub(r"[^\w.-]", "_", fold)
        objective = str(best.get("objective", ""))
        members = [str(m) for m in best.get("members", [])]
        axes = (
            f"y: {members[0]}, x: {members[1]}"
            if len(members) >= 2
            else f"x: {members[0] if members else '?'} threshold"
        )
        rep.figure(
            f"threshold_heatmap_{safe}.png",
            png,
            f"{fold}: {objective} on the calibration part of every threshold pair of "
            f"the fold's chosen operator '{best.get('operator')}' and members ({axes}); "
            f"red frame: chosen {describe_config(best)} = "
            f"{format_metric(objective, best.get(objective))}",
            560,
        )
        made += 1
    rep.add("</div>\n")
    if not made:
        rep.p("No search results found (fold*/search/best.json with grid files).", "note")


def _heatmap_for(f: FoldLayout, best: dict[str, Any]) -> bytes | None:
    """The fold's threshold heatmap (or single-member curve) from the search's grid files."""
    fold = f.name
    op = str(best.get("operator", ""))
    members = [str(m) for m in best.get("members", [])]
    objective = str(best.get("objective", "paper_miou"))
    all_members = (best.get("search") or {}).get("members") or members
    if op == "single" and len(all_members) > 1:
        return _single_curve(f, best, members, objective)
    name = f"grid_{op.replace(':', '')}"
    if len(members) != len(all_members):
        name += "__" + "+".join(members)
    npy, meta_p = f.grid(name)
    if not npy.is_file():
        return None
    meta = fsutil.read_json(meta_p, "grid metadata") if meta_p.is_file() else {}
    values = np.load(npy, allow_pickle=False)
    thresholds = meta.get("thresholds") or (best.get("search") or {}).get("grid_values")
    if thresholds is None:
        thresholds = parse_grid((best.get("search") or {}).get("grid", DEFAULT_GRID)).tolist()
    return threshold_heatmap(
        values,
        thresholds,
        meta.get("members", members),
        objective,
        op,
        f"{fold}: '{op}' {objective}",
    )


def _single_curve(
    f: FoldLayout, best: dict[str, Any], members: list[str], objective: str
) -> bytes | None:
    """Objective vs threshold of the best single member, from ranking.csv."""
    path = f.ranking_csv
    if not path.is_file():
        return None
    pts: dict[float, float] = {}
    gate = "" if best.get("gate") is None else str(best.get("gate"))
    for row in read_csv(path):
        if (
            row.get("operator") == "single"
            and row.get("members") == "+".join(members)
            and (row.get("gate") or "") == gate
        ):
            t = float(row["thresholds"])
            pts.setdefault(t, float(row[objective]))
    if not pts:
        return None
    ts = sorted(pts)
    return threshold_heatmap(
        np.array([pts[t] for t in ts]),
        ts,
        members,
        objective,
        "single",
        f"{f.name}: single member {members[0]}",
    )
