"""The report's sections about the run itself: Summary, Data, Classifiers, Configuration
(and the section order). Each reads stage outputs through :class:`Run` and never
recomputes a result."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.io import fsutil
from ensemblecam.io.mapstore import LOCALISER_TAG
from ensemblecam.io.runlayout import TRAIN_FIGURES, FoldLayout
from ensemblecam.pipeline.results import SUMMARY_METRICS, final_text, final_unet
from ensemblecam.report.figures import (
    lesion_fraction_histogram,
)
from ensemblecam.report.html import Page, esc, flatten, html_table
from ensemblecam.report.reference import (
    is_phantom,
)
from ensemblecam.report.run import (
    Run,
    best_json,
    config_yaml,
    read_csv,
    splits_path,
)
from ensemblecam.report.text import (
    fmt_pct,
    format_metric,
    num,
    row_config_text,
)

#: the headline rows, in the order of the chain: ensemble -> refined pseudo-labels ->
#: self-trained U-Net, then the bounds
_SUMMARY_KINDS = ("ensemble", "pseudo_labels", "pseudo_round", "pseudo_unet", "unet", "empty")


def section_summary(rep: Page, run: Run, folds: list[str]) -> None:
    """What was run, the headline rows (chosen ensemble, Empty, U-Nets) and where the
    run's outputs are."""
    rep.h2("summary", "Summary")
    objective = str(run.results.get("objective", "paper_miou"))
    rep.add(html_table(["", "what was run"], _run_facts(run, folds, objective), "facts"))
    _masks_notes(rep, run)
    _headline(rep, run, folds, objective)
    _where(rep, run)


def _masks_notes(rep: Page, run: Run) -> None:
    """What chose the configuration (masks of how many cases, or slice labels only), the
    labels criterion's choice against the masks' one, and, without masks, that nothing is
    scored."""
    from ensemblecam.pipeline.results import LABELS_ROW, NO_MASKS_NOTE, criteria_text

    res = run.results
    if res.get("scored") is False:
        rep.p(NO_MASKS_NOTE, "note")
    text = criteria_text(res)
    if text:
        rep.p(text)
    rows = {r.get("kind"): r for r in res.get("rows") or []}
    lab, ens = rows.get("labels"), rows.get("ensemble")
    if lab is not None and ens is not None:
        cells = [
            f"{m} {fmt_pct(_mean(lab, m))} vs {fmt_pct(_mean(ens, m))}"
            for m in ("lesion_dice", "paper_miou")
        ]
        rep.p(
            esc(
                f"Mask-free against mask-calibrated choice on held-out data: the "
                f"'{LABELS_ROW}' row reaches {'; '.join(cells)} (the chosen ensemble's)."
            )
        )


def _run_facts(run: Run, folds: list[str], objective: str) -> list[tuple[str, str]]:
    """(what, description) of the data, folds, classifiers, CAM methods and search."""
    cfg = config_yaml(run)
    facts: list[tuple[str, str]] = []
    store = run.store
    prep = (store.manifest.get("prepare", {}) or {}) if store is not None else {}
    phantom = is_phantom(prep, run.run_json)
    if store is not None:
        n_pos = int(store.labels.sum())
        what = (
            "synthetic phantom (ensemblecam synth)"
            if phantom
            else f"{prep.get('layout', '?')} data"
        )
        facts.append(
            (
                "data",
                f"{what} from {prep.get('data', '?')}: {len(store.case_names)} "
                f"cases, {store.n_slices} slices ({n_pos} with lesion), channels "
                f"{', '.join(store.channels)}, {' x '.join(map(str, store.size))} "
                "pixels",
            )
        )
    else:
        facts.append(("data", f"slice store not available ({run.store_error})"))
    split = cfg.get("split") or {}
    scheme = f" ({split.get('scheme')})" if split.get("scheme") else ""
    facts.append(
        (
            "folds",
            f"{len(folds)}{scheme}: {', '.join(folds)}; calibration part "
            f"{(cfg.get('run') or {}).get('calibration_part', '?')}, evaluated "
            f"part {(cfg.get('run') or {}).get('eval_part', '?')} (held out)",
        )
    )
    models = [str(m) for m in (cfg.get("run") or {}).get("models") or []]
    if not models:
        models = sorted(
            {p.name for f in folds for p in run.layout.fold(f).models.glob("*") if p.is_dir()}
        )
    facts.append(("classifiers", ", ".join(models) or "?"))
    best0 = next((b for b in (best_json(run, f) for f in folds) if b), None) or {}
    search = best0.get("search") or {}
    members = [str(m) for m in search.get("members") or []]
    methods = list(dict.fromkeys(m.partition("__")[2] for m in members))
    cam = cfg.get("cam") or {}
    methods = methods or [str(m) for m in cam.get("methods") or []]
    names = cam.get("layers") or ([cam["layer"]] if cam.get("layer") else [])
    layer = f" at {' + '.join(map(str, names))}" if names else ""
    layer += " with flip test-time augmentation" if cam.get("flip_tta") else ""
    facts.append(
        (
            "CAM methods",
            (", ".join(methods) or "?")
            + layer
            + (f" ({len(members)} ensemble members)" if members else ""),
        )
    )
    ops = search.get("operators") or (cfg.get("search") or {}).get("operators") or []
    grid = search.get("grid") or (cfg.get("search") or {}).get("grid")
    facts.append(
        (
            "search",
            f"operators {', '.join(map(str, ops)) or '?'}, threshold grid "
            f"{grid or '?'}, up to {search.get('max_members', '?')} members, "
            f"chosen by {_criterion_name(best0, objective)} on the calibration part",
        )
    )
    return facts


def _criterion_name(best: dict[str, Any], objective: str) -> str:
    """ "paper_miou" (masks) or "the labels criterion" (slice labels only)."""
    if (best.get("criterion") or {}).get("name") == "labels":
        return "the labels criterion (slice labels only, no masks)"
    return objective


def _headline(rep: Page, run: Run, folds: list[str], objective: str) -> None:
    """The headline table and the chosen ensemble against Empty and the U-Net."""
    res = run.results
    rows: list[dict[str, Any]] = res["rows"]
    chosen = [r for k in _SUMMARY_KINDS for r in rows if r.get("kind") == k]
    names = [str(n) for n in res.get("metric_names") or []] or list(
        dict.fromkeys(k for r in rows for k in (r.get("mean") or {}))
    )
    metrics = [m for m in SUMMARY_METRICS if m in names]
    if chosen and metrics:
        rep.add(f"<h3>Headline (mean ± std over {len(folds)} folds, %)</h3>\n")
        rep.add(
            html_table(
                ["result", *metrics],
                [
                    [
                        r["name"],
                        *(
                            format_metric(
                                m, (r.get("mean") or {}).get(m), (r.get("std") or {}).get(m)
                            )
                            for m in metrics
                        ),
                    ]
                    for r in chosen
                ],
                "headline",
            )
        )
        ens = next((r for r in chosen if r.get("kind") == "ensemble"), None)
        empty = next((r for r in chosen if r.get("kind") == "empty"), None)
        unet = next((r for r in chosen if r.get("kind") == "unet"), None)
        if ens is not None:
            e = num((ens.get("mean") or {}).get(objective))
            parts = [
                f"On held-out data the chosen ensemble reaches {objective} "
                f"{format_metric(objective, e, (ens.get('std') or {}).get(objective))}"
            ]
            for other, label in ((empty, "the Empty baseline"), (unet, "the supervised U-Net")):
                if other is None:
                    continue
                o = num((other.get("mean") or {}).get(objective))
                if math.isfinite(e) and math.isfinite(o):
                    d = 100 * (e - o)
                    parts.append(
                        f"{abs(d):.1f} points {'above' if d >= 0 else 'below'} "
                        f"{label} ({format_metric(objective, o)})"
                    )
            rep.p("; ".join(parts) + ".")
            _other_headline_metrics(rep, ens, empty, [m for m in metrics if m != objective])
        _final_method(rep, res, chosen, metrics)
        if empty is not None:
            _not_better_than_empty(rep, rows, empty, metrics)
        _refine_notes(rep, run, folds)
        _threshold_notes(rep, run, folds)
        _gate_notes(rep, run, folds)
        if ens is not None and folds:
            rep.p(
                "Chosen configuration per fold: "
                + "; ".join(f"{f}: {row_config_text(ens, f)}" for f in folds)
                + "."
            )


def _final_method(
    rep: Page, results: dict[str, Any], rows: list[dict[str, Any]], metrics: list[str]
) -> None:
    """The final masks (results.json ``final``: a self-trained U-Net's or the ensemble's)
    against the ensemble or the last round's U-Net and the supervised U-Net, in each
    summary metric."""
    method = (results.get("final") or {}).get("method", "self_trained")
    unet, ens = final_unet(results), next((r for r in rows if r.get("kind") == "ensemble"), None)
    by_slug = {
        r.get("slug", r["kind"]): r  # a results.json before slugs: pseudo_unet and unet
        for r in rows
        if r.get("kind") in ("pseudo_unet", "pseudo_round", "unet")
    }
    own = by_slug.get(unet) if method == "self_trained" else ens
    if own is None or "pseudo_unet" not in by_slug:
        return
    other = ens if method == "self_trained" else by_slug["pseudo_unet"]
    label = "the ensemble" if method == "self_trained" else "the self-trained U-Net"
    parts = []
    for m in metrics:
        text = f"{m} {format_metric(m, _mean(own, m), (own.get('std') or {}).get(m))}"
        for row, name in ((other, label), (by_slug.get("unet"), "supervised U-Net")):
            if row is not None and math.isfinite(_mean(row, m)):
                text += f", {name} {format_metric(m, _mean(row, m))}"
                if row.get("kind") == "unet" and _mean(row, m) > 0 and math.isfinite(_mean(own, m)):
                    text += f" (weak / supervised {_mean(own, m) / _mean(row, m):.2f})"
        parts.append(text)
    why = final_text(results)
    rep.p(f"The final masks are the {own['name']}'s: " + "; ".join(parts) + ". " + why)


def _refine_notes(rep: Page, run: Run, folds: list[str]) -> None:
    """Per fold: which refiner made the self-training labels and why (refine.json), and
    which localisers (MIL, denoising autoencoder) the chosen ensemble uses."""
    lines = []
    for f in folds:
        path = run.layout.fold(f).refine_record
        if not path.is_file():
            continue
        rec = fsutil.read_json(path, "refine record")
        cands = rec.get("candidates") or {}
        scores = ", ".join(
            f"{name} {fmt_pct((c.get('train_quality') or {}).get('lesion_dice'))}"
            for name, c in cands.items()
            if c.get("train_quality")
        )
        why = (
            f"highest lesion Dice against the training part's masks ({scores})"
            if rec.get("criterion") == "masks"
            else "no masks to choose with: the configured fallback"
        )
        members = (rec.get("config") or {}).get("members") or []
        names = [m.split("__", 1)[1] for m in members if m.startswith(f"{LOCALISER_TAG}__")]
        mil = f" (the ensemble includes the localiser {', '.join(names)})" if names else ""
        lines.append(f"{f}: {rec.get('chosen')}, {why}{mil}")
    if lines:
        rep.p("Refiner of the self-training labels per fold: " + "; ".join(lines) + ".")


def _threshold_notes(rep: Page, run: Run, folds: list[str]) -> None:
    """Per fold: the final self-trained U-Net's decision threshold as its evaluation recorded it
    and, when calibrated, the calibration part's lesion Dice at it and at 0.5 (its table)."""
    lines, kind = [], final_unet(run.results)  # the final self-trained U-Net
    for f in folds:
        lay = run.layout.fold(f)
        path = lay.eval_metrics(kind)
        t = fsutil.read_json(path, "evaluation").get("threshold") if path.is_file() else None
        if t is None:
            continue
        text = f"{f}: P(lesion) > {t:g}"
        calibrated = lay.threshold_record(kind)
        if calibrated.is_file():
            rec = fsutil.read_json(calibrated, "threshold calibration")
            dice = {r["threshold"]: r["lesion_dice"] for r in rec.get("table", [])}
            text += (
                f", calibrated on the {rec.get('part')} part's masks (lesion Dice there "
                f"{fmt_pct(dice.get(t))}; at 0.5: {fmt_pct(dice.get(0.5))})"
            )
        lines.append(text)
    if lines:
        rep.p("Decision threshold of the self-trained U-Net per fold: " + "; ".join(lines) + ".")


def _gate_notes(rep: Page, run: Run, folds: list[str]) -> None:
    """Per fold: the final self-trained U-Net's classifier gate as its evaluation recorded it
    (threshold, slices emptied) and, when calibrated, the val part's slice F1 behind it."""
    lines, kind = [], final_unet(run.results)  # the final self-trained U-Net
    for f in folds:
        lay = run.layout.fold(f)
        path = lay.eval_metrics(kind)
        gate = fsutil.read_json(path, "evaluation").get("gate") if path.is_file() else None
        if not gate:
            continue
        t = float(gate["threshold"])
        text = f"{f}: threshold {t:g}" + (" (no gating)" if t == 0 else "")
        calibrated = lay.gate_record(kind)
        if calibrated.is_file():
            rec = fsutil.read_json(calibrated, "gate calibration")
            f1 = next((r["f1"] for r in rec.get("table", []) if r["threshold"] == t), None)
            text += f", calibrated on the val part (slice F1 {fmt_pct(f1)})"
        lines.append(f"{text}, {gate['n_gated']} of {gate['n_slices']} evaluated slices emptied")
    if lines:
        rep.p("Classifier gate of the self-trained U-Net per fold: " + "; ".join(lines) + ".")


def _mean(row: dict[str, Any], metric: str) -> float:
    return num((row.get("mean") or {}).get(metric))


def _other_headline_metrics(
    rep: Page, ens: dict[str, Any], empty: dict[str, Any] | None, metrics: list[str]
) -> None:
    """The chosen ensemble in the other summary metrics (lesion Dice, case Dice ...), each
    beside the Empty prediction's value."""
    parts = []
    for m in metrics:
        text = f"{m} {format_metric(m, _mean(ens, m), (ens.get('std') or {}).get(m))}"
        if empty is not None and math.isfinite(_mean(empty, m)):
            text += f" (Empty: {format_metric(m, _mean(empty, m))})"
        parts.append(text)
    if parts:
        rep.p("In the other headline metrics the chosen ensemble reaches " + "; ".join(parts) + ".")


def _not_better_than_empty(
    rep: Page, rows: list[dict[str, Any]], empty: dict[str, Any], metrics: list[str]
) -> None:
    """Name, per summary metric, every result row whose mean is not above the Empty
    prediction's (all background), so no row is read as a gain it does not make."""
    for m in metrics:
        base = _mean(empty, m)
        if not math.isfinite(base):
            continue
        names = [
            str(r["name"])
            for r in rows
            if r is not empty
            and r.get("kind") != "empty"
            and math.isfinite(_mean(r, m))
            and _mean(r, m) <= base
        ]
        if names:
            rep.p(
                f"Not better than Empty (all background, {format_metric(m, base)}) in {m}: "
                + ", ".join(names)
                + ".",
                "note",
            )


def _where(rep: Page, run: Run) -> None:
    """Where the run's outputs are."""
    store = run.store
    where = [
        ("run folder", str(run.path.resolve())),
        ("results", "results.json, results.csv"),
        (
            "per fold",
            "fold*/models (classifiers), fold*/maps (CAMs), fold*/search "
            "(threshold grids, ranking), fold*/eval/<row> (metrics.json, "
            "per_case.csv, per_slice.csv; rows: ensemble, op_<operator>, "
            "single_<member>, unet, pseudo_round<r>, pseudo_unet; masks.npz of the op_ and "
            "U-Net rows), fold*/select (the final candidates on the val part), "
            "fold*/eval/masks.npz (the chosen ensemble's masks)",
        ),
    ]
    if store is not None:
        where.append(("slice store", str(Path(store.path).resolve())))
    sp = splits_path(run)
    if sp is not None:
        where.append(("splits", str(sp.resolve())))
    export = run.layout.export
    if export.is_dir():
        n = len(list(export.glob("*.nii*")))
        where.append(("NIfTI masks", f"{export.resolve()} ({n} files)"))
    ensemble = run.layout.export_ensemble
    if ensemble.is_dir():
        n = len(list(ensemble.glob("*.nii*")))
        where.append(("NIfTI masks of the ensemble", f"{ensemble.resolve()} ({n} files)"))
    where.append(("this report", str(rep.out_dir.resolve())))
    rep.add("<h3>Where things are</h3>\n" + html_table(["", "path"], where, "facts"))


def section_config(rep: Page, run: Run) -> None:
    rep.h2("configuration", "Configuration")
    rep.p(f"Run folder: {run.path.resolve()}")
    if run.config_text is not None:
        rep.add(
            f"<details><summary>config.yaml ({len(run.config_text.splitlines())} lines, "
            f"click to open)</summary><pre>{esc(run.config_text)}</pre></details>\n"
        )
    else:
        rep.p("config.yaml: not found in the run folder.", "note")
    if not run.run_json:
        rep.p("run.json: not found (no versions or timings recorded).", "note")
        return
    facts: list[tuple[str, str]] = []
    timings: list[tuple[str, str]] = []
    for key, value in run.run_json.items():
        if key == "timings" and isinstance(value, dict):
            timings = flatten(value, sep="/")
        elif isinstance(value, dict):
            facts.append((key, ", ".join(f"{k} {v}" for k, v in flatten(value)) or "–"))
        else:
            facts += flatten(value, key)
    if facts:
        rep.add("<h3>Run record (run.json)</h3>\n" + html_table(["key", "value"], facts, "facts"))
    if timings:
        total = sum(num(v) for _, v in timings if math.isfinite(num(v)))
        rows = [(k, f"{num(v):.1f}" if math.isfinite(num(v)) else v) for k, v in timings]
        rows.append(("total", f"{total:.1f}"))
        rep.add("<h3>Timings</h3>\n" + html_table(["stage", "seconds"], rows, "timings"))


def section_data(rep: Page, run: Run) -> None:
    rep.h2("data", "Data")
    store = run.store
    if store is None:
        rep.p(f"Slice store not available: {run.store_error}", "note")
        return
    labels = store.labels
    cases = store.case_names
    case_col = store.table["case"]
    pos_cases = {str(c) for c in case_col[labels > 0]}
    prep = store.manifest.get("prepare", {}) or {}
    rows = [
        ("cases", len(cases)),
        ("lesion cases", len(pos_cases)),
        ("slices", store.n_slices),
        ("positive (lesion) slices", int(labels.sum())),
        ("negative slices", int((labels == 0).sum())),
        ("channels", ", ".join(store.channels)),
        ("slice size", " x ".join(map(str, store.size))),
    ]
    rows += [(f"prepare.{k}", v) for k, v in flatten(prep)]
    rep.add('<div class="grid">\n<div>\n' + html_table(["", "value"], rows, "facts") + "</div>\n")
    frac = store.table["lesion_fraction"].astype(np.float64)
    rep.add("<div>\n")
    rep.figure(
        "lesion_fraction_histogram.png",
        lesion_fraction_histogram(frac),
        "Lesion share of the slice, lesion slices only (as the thesis's Fig. 3.4)",
        560,
    )
    rep.add("</div>\n</div>\n")
    split_path = splits_path(run)
    if split_path is not None:
        from ensemblecam.io.split import read_splits, split_summary

        summary = split_summary(store, read_splits(split_path))
        if summary:
            rep.add(f"<h3>Split parts ({esc(split_path.name)})</h3>\n")
            keys = list(summary[0])
            rep.add(html_table(keys, [[r[k] for k in keys] for r in summary]))


_CLS_KEYS = ("accuracy", "precision", "recall", "f1", "auroc")
_CLS_HEAD = ("acc", "prec", "rec", "F1", "AUROC")


def section_classifiers(rep: Page, run: Run, folds: list[str]) -> None:
    rep.h2("classifiers", "Classifiers")
    per_model: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    figures: dict[str, dict[str, list[tuple[str, bytes, str]]]] = {}
    missing: list[str] = []
    for fold in folds:
        f = run.layout.fold(fold)
        if not f.models.is_dir():
            continue
        for tag in sorted(p.name for p in f.models.iterdir() if p.is_dir()):
            info, best = _train_run(f, tag)
            if not best:
                continue
            per_model.setdefault(tag, []).append((fold, info, best))
            figures.setdefault(tag, {})[fold] = _train_figures(f, tag, missing)
    if not per_model:
        rep.p("No classifier training runs found (fold*/models/*/train.json).", "note")
        return
    rep.p(
        "Validation metrics of each classifier at its best epoch (%, slice called "
        "positive at the run's classifier threshold); acc = accuracy, prec = precision, "
        "rec = recall; the bold line is the mean ± std over folds."
    )
    body = []
    for model, entries in per_model.items():
        for fold, info, best in entries:
            body.append(
                "<tr>"
                + "".join(
                    f"<td>{esc(c)}</td>"
                    for c in (
                        model,
                        fold,
                        info.get("best_epoch", "?"),
                        *(fmt_pct(best.get(k)) for k in _CLS_KEYS),
                        f"{info.get('n_train', '?')} / {info.get('n_val', '?')}",
                    )
                )
                + "</tr>"
            )
        vals = [np.array([num(b.get(k)) for _, _, b in entries]) for k in _CLS_KEYS]
        cells = [
            fmt_pct(np.nanmean(v), np.nanstd(v)) if np.isfinite(v).any() else "–" for v in vals
        ]
        body.append(
            '<tr class="mean">'
            + "".join(
                f"<td>{esc(c)}</td>" for c in (model, f"mean of {len(entries)}", "", *cells, "")
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{esc(h)}</th>"
        for h in ("model", "fold", "best epoch", *_CLS_HEAD, "train / val slices")
    )
    rep.add(
        f'<table class="cls"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>\n'
    )
    unet = _unet_figures(run, folds)
    if unet:
        figures["U-Net (supervised, segmentation loss)"] = unet
    rep.p(
        "Learning curves (loss; validation AUROC and F1, dotted line: best epoch) and "
        "validation confusion matrices at the best epoch: one row per model, folds side "
        "by side. Full-size PNGs are beside the report."
    )
    if missing:
        rep.p(
            "Not written by the train stage (the report draws no figure of its own): "
            + ", ".join(missing)
            + ".",
            "note",
        )
    for model, per_fold in figures.items():
        if not any(per_fold.values()):
            continue
        rep.add(f'<h3>{esc(model)}</h3>\n<div class="grid">\n')
        for figs in per_fold.values():
            rep.add('<div class="fold">\n')
            for name, png, caption in figs:
                rep.figure(name, png, caption, 280 if "confusion" in name else 560)
            rep.add("</div>\n")
        rep.add("</div>\n")


def _unet_figures(run: Run, folds: list[str]) -> dict[str, list[tuple[str, bytes, str]]]:
    """Learning curves the U-Net stage wrote (fold*/unet/learning_curve.png), per fold."""
    out: dict[str, list[tuple[str, bytes, str]]] = {}
    for fold in folds:
        src = run.layout.fold(fold).unet_learning_curve("unet")
        if src.is_file():
            png = src.read_bytes()
            safe = re.sub(r"[^\w.-]", "_", fold)
            if png.startswith(b"\x89PNG"):
                out[fold] = [
                    (f"{safe}_unet_learning_curve.png", png, f"U-Net {fold}: learning curve")
                ]
    return out


def _train_run(f: FoldLayout, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train.json, validation metrics at the best epoch) of a classifier's training run:
    train.json's ``best``, else the line of metrics.csv with the highest AUROC."""
    tj = f.train_record(tag)
    info = fsutil.read_json(tj, "train run") if tj.is_file() else {}
    info = info if isinstance(info, dict) else {}
    best = info.get("best", {}) or {}
    if not best and f.train_metrics(tag).is_file():
        hist = read_csv(f.train_metrics(tag))
        if hist:
            best = max(hist, key=lambda r: num(r.get("auroc")))
    return info, best


def _train_figures(f: FoldLayout, tag: str, missing: list[str]) -> list[tuple[str, bytes, str]]:
    """Learning curve and confusion matrix PNGs the train stage wrote (name, bytes,
    caption); the path of each one absent is appended to ``missing``."""
    out = []
    prefix = re.sub(r"[^\w.-]", "_", f"{f.name}_{tag}")
    for fname, what in TRAIN_FIGURES.items():
        src = f.train_figure(tag, fname)
        if src.is_file():
            out.append((f"{prefix}_{fname}", src.read_bytes(), f"{tag} {f.name}: {what}"))
        else:
            missing.append(str(src))
    return out


#: Section anchors and titles, in the report's order.
SECTIONS = (
    ("summary", "Summary"),
    ("results", "Results"),
    ("thresholds", "Thresholds"),
    ("gallery", "Gallery"),
    ("classifiers", "Classifiers"),
    ("data", "Data"),
    ("configuration", "Configuration"),
)
