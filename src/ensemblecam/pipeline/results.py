"""Results of a run: the rows evaluated per fold, their aggregate over folds, and the
files written from it (results.json, results.csv, results.md, the demo's table).

``results.json``::

    {"format": "ensemblecam-results", "version": 1, "objective": "paper_miou",
     "folds": ["fold0", ...], "metric_names": [...],
     "scored": true (false: no masks in the evaluation part, every metric null),
     "criteria": {"fold0": best.json's "criterion" (what chose the configuration), ...},
     "final": {"method": "self_trained" | "ensemble", "round": r (self_trained: the
               self-training round whose U-Net is final), "chosen_by": ...,
               "val_lesion_dice": {"ensemble" | "self_trained" | "self_trained_round<r>":
               mean over folds} (run.final auto with masks in the val part),
               "val_pseudo_labels": the refined pseudo-labels' mean lesion Dice on the same
               val slices (the chain's middle step; they use the slice labels)},
     "rows": [{"name": "ensemble (best configuration)", "kind": "ensemble" | "operator" |
               "single" | "labels" | "empty" | "unet" | "pseudo_unet" | "pseudo_round",
               "slug": its folder in fold<k>/eval/ (the chosen ensemble and Empty: "ensemble"),
               "config": {"fold0": {"operator", "members", "thresholds", "gate"} | null, ...},
               "per_fold": {"fold0": {metric: value, ...}, ...},
               "mean": {metric: value}, "std": {metric: value},
               "cases": {per-case means, 95% CIs, paired tests vs the chosen row}}, ...],
     "case_statistics": {...}}   (see ensemblecam.stages.evaluate.add_case_statistics)

Metric values are fractions in [0, 1] (the report shows percentages like the paper).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ensemblecam.ensemble.operators import CONFIG_KEYS
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import CHOSEN_SLUG, RESULTS_FORMAT, FoldLayout, operator_slug

#: metrics aggregated over folds into the results table (all in [0, 1], higher is better)
TABLE_METRICS = (
    "paper_miou", "paper_dsc", "background_iou", "lesion_iou", "lesion_dice",
    "slice_dice_mean", "slice_iou_mean", "slice_dice_large_mean", "slice_dice_correct_mean",
    "case_dice_mean",
)  # fmt: skip


def describe_config(conf: dict[str, Any]) -> str:
    ths = ", ".join(
        f"{m} > {t:g}" for m, t in zip(conf["members"], conf["thresholds"], strict=False)
    )
    if conf["operator"] == "mean":
        ths = f"mean({', '.join(conf['members'])}) > {conf['thresholds'][0]:g}"
    gate = f", gate p >= {conf['gate']:g}" if conf.get("gate") is not None else ""
    return f"{conf['operator']}: {ths}{gate}"


#: the results row of the labels criterion's choice when masks chose the ensemble
LABELS_ROW = "ensemble chosen from slice labels only (no masks)"
LABELS_SLUG = "labels_choice"


def result_rows(fold: FoldLayout, scored: bool = True) -> list[dict[str, Any]]:
    """Rows evaluated per fold, each chosen on calibration data only: the ensemble (the best
    configuration overall), each operator's best (over member subsets and thresholds), each
    single member at its best threshold, the labels criterion's choice when masks chose
    the ensemble (search/best_labels.json), and the Empty prediction (read from the chosen
    row's evaluation, ``empty_baseline``). Not ``scored`` (no masks to score with): only
    the ensemble row, whose masks are still written."""
    best = fsutil.read_json(fold.best, "search result")
    per = fsutil.read_json(fold.best_per_candidate, "search result")
    objective = best.get("objective", "paper_miou")
    keys = CONFIG_KEYS
    rows = [
        {
            "name": "ensemble (best configuration)",
            "kind": "ensemble",
            "slug": CHOSEN_SLUG,
            "config": {k: best[k] for k in keys},
        }
    ]
    if not scored:
        return rows
    by_op: dict[str, tuple[dict[str, Any], float]] = {}
    singles = []
    for cand in per:  # best row of every (operator, member subset), best first
        conf = {k: cand[k] for k in keys}
        if conf["operator"] == "single":
            singles.append(conf)
        elif conf["operator"] not in by_op or _value(cand[objective]) > by_op[conf["operator"]][1]:
            by_op[conf["operator"]] = (conf, _value(cand[objective]))
    for op, (conf, _) in by_op.items():
        rows.append(
            {
                "name": f"{op} ensemble (best members and thresholds)",
                "kind": "operator",
                "slug": operator_slug(op),
                "config": conf,
            }
        )
    for conf in sorted(singles, key=lambda c: c["members"][0]):
        member = conf["members"][0]
        rows.append(
            {
                "name": f"{member} alone (best threshold)",
                "kind": "single",
                "slug": f"single_{member}",
                "config": conf,
            }
        )
    labels_file = fold.search / "best_labels.json"
    if labels_file.is_file():
        lab = fsutil.read_json(labels_file, "search result")
        if "skipped" not in lab:
            rows.append(
                {
                    "name": LABELS_ROW,
                    "kind": "labels",
                    "slug": LABELS_SLUG,
                    "config": {k: lab[k] for k in keys},
                }
            )
    rows.append(
        {"name": "Empty (all background)", "kind": "empty", "slug": CHOSEN_SLUG, "config": None}
    )
    return rows


def _value(v: Any) -> float:
    """A metric read back from JSON for ranking: null (undefined) ranks last."""
    return -np.inf if v is None or not np.isfinite(v) else float(v)


def with_metrics(rows: list[dict[str, Any]], fold: FoldLayout) -> list[dict[str, Any]]:
    """``rows`` with the :data:`TABLE_METRICS` of their evaluation (eval/<slug>/metrics.json;
    the Empty row: that file's ``empty_baseline``)."""
    out = []
    for row in rows:
        if row.get("scored") is False:  # no masks in the evaluation part
            out.append({**row, "metrics": {m: None for m in TABLE_METRICS}})
            continue
        res = fsutil.read_json(fold.eval_metrics(row["slug"]), "evaluation")
        metrics = res["empty_baseline"] if row["kind"] == "empty" else res["metrics"]
        out.append({**row, "metrics": {m: metrics.get(m) for m in TABLE_METRICS}})
    return out


def aggregate(fold_results: dict[str, dict[str, Any]], objective: str) -> dict[str, Any]:
    """Mean and std (ddof=0) over folds of every row; rows matched by kind and slug.

    The configuration behind a row (thresholds, members) is chosen per fold on that fold's
    calibration data, so a row is a protocol ("the best 'and' ensemble"), and ``config``
    holds the configuration of each fold.
    """
    order: list[tuple[str, str]] = []
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for fold, res in fold_results.items():
        for row in res["rows"]:
            key = (row["kind"], row["slug"])
            if key not in table:
                order.append(key)
                table[key] = {
                    "name": row["name"],
                    "kind": row["kind"],
                    "slug": row["slug"],
                    "per_fold": {},
                    "config": {},
                }
            table[key]["per_fold"][fold] = row["metrics"]
            table[key]["config"][fold] = row["config"]
    rows = []
    for key in order:
        entry = table[key]
        mean, std = {}, {}
        for m in TABLE_METRICS:
            vals = [v[m] for v in entry["per_fold"].values() if v.get(m) is not None]
            vals = [v for v in vals if np.isfinite(v)]
            mean[m] = float(np.mean(vals)) if vals else None
            std[m] = float(np.std(vals)) if vals else None
        rows.append({**entry, "mean": mean, "std": std})
    return {
        "format": RESULTS_FORMAT,
        "version": 1,
        "objective": objective,
        "folds": list(fold_results),
        "scored": all(r.get("scored", True) for r in fold_results.values()),
        "criteria": {f: r.get("criterion") for f, r in fold_results.items()},
        "metric_names": list(TABLE_METRICS),
        "rows": rows,
    }


def results_csv(results: dict[str, Any]) -> str:
    """One line per row: name, kind, mean and std of every table metric, then the per-case
    statistics columns (:func:`ensemblecam.stages.evaluate.case_statistics_columns`)."""
    import csv
    import io

    from ensemblecam.stages.evaluate import case_statistics_columns

    buf = io.StringIO()
    w = csv.writer(buf)
    extra_head, extra = case_statistics_columns(results)  # per-case CIs and p-values
    w.writerow(
        [
            "name",
            "kind",
            *[f"{m}_{s}" for m in results["metric_names"] for s in ("mean", "std")],
            *extra_head,
        ]
    )
    for row, more in zip(results["rows"], extra, strict=True):
        vals = []
        for m in results["metric_names"]:
            vals += [_fmt(row["mean"][m]), _fmt(row["std"][m])]
        w.writerow([row["name"], row["kind"], *vals, *more])
    return buf.getvalue()


#: the metrics of the printed summary table (``ensemblecam run``/``demo``, results.md)
SUMMARY_METRICS = ("paper_miou", "paper_dsc", "lesion_dice", "case_dice_mean")


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table: each metric as ``mean ± std`` over folds, in %."""
    rows = []
    for row in results["rows"]:
        cells = [row["name"]]
        for m in SUMMARY_METRICS:
            mu, sd = row["mean"].get(m), row["std"].get(m)
            cells.append("-" if mu is None else f"{100 * mu:.1f} ± {100 * sd:.1f}")
        rows.append(cells)
    return ["method", *SUMMARY_METRICS], rows


#: what results.md and the report say when the evaluation part has no masks
NO_MASKS_NOTE = (
    "No masks in the evaluated data, so nothing is scored: the masks are written (export/) "
    "but every metric is undefined (-)."
)


def criteria_text(results: dict[str, Any]) -> str:
    """One sentence per distinct criterion of the folds: what chose the configuration."""
    out = []
    for fold, c in (results.get("criteria") or {}).items():
        if not c:
            continue
        if c.get("name") == "labels":
            text = (
                f"slice labels only (labels criterion: at most {100 * c['fp_budget']:g}% of "
                f"the pixels of lesion-free slices called lesion; {c.get('n_cases')} cases)"
            )
        else:
            text = (
                f"masks of {c.get('n_annotated_cases')} annotated of {c.get('n_cases')} "
                f"calibration cases ({c.get('objective')})"
            )
        out.append(f"{fold}: {text}")
    return "Configuration chosen by " + "; ".join(out) + "." if out else ""


#: results.json ``final.method`` -> what the final masks are (export/, predict)
FINAL_NAMES = {
    "self_trained": "the U-Net self-trained on the refined pseudo-labels",
    "ensemble": "the ensemble's (best configuration)",
}


def candidate_label(name: str) -> str:
    """A final candidate's name in text: ``self_trained_round1`` -> "self-trained round 1",
    ``self_trained`` -> "self-trained (last round)", ``ensemble`` -> "ensemble"."""
    if name.startswith("self_trained_round"):
        return f"self-trained round {name.removeprefix('self_trained_round')}"
    return "self-trained (last round)" if name == "self_trained" else name


def final_unet(results: dict[str, Any] | None = None) -> str:
    """The U-Net kind behind the self-trained method (export/, predict, the report): the
    one results.json ``final.unet`` names (:func:`choose_final`), else the last round's
    (``pseudo_unet``)."""
    return ((results or {}).get("final") or {}).get("unet") or "pseudo_unet"


def final_text(results: dict[str, Any]) -> str:
    """One sentence: whose masks are final (exported, used by predict) and what chose it."""
    final = results.get("final")
    if not final:
        return ""
    text = f"Final masks (export/, predict): {FINAL_NAMES[final['method']]}"
    if final["method"] == "self_trained" and final.get("round"):
        text += f" (round {final['round']})"
    scores = final.get("val_lesion_dice")
    if scores:
        listed = ", ".join(f"{candidate_label(m)} {100 * v:.1f}%" for m, v in scores.items())
        text += f", the highest mean lesion Dice on the val part's masks ({listed})"
        if final.get("val_pseudo_labels") is not None:
            text += (
                "; on the same slices the refined pseudo-labels the first round learnt from"
                f" score {100 * final['val_pseudo_labels']:.1f}%"
            )
    else:
        text += f" ({final.get('chosen_by')})"
    return text + "."


def results_markdown(results: dict[str, Any]) -> str:
    """The summary table as Markdown (written as results.md; the README quotes the demo's),
    then what chose the configuration and the final method and, without masks, that
    nothing is scored."""
    header, rows = summary_rows(results)
    lines = [f"| {' | '.join(header)} |", f"|---|{'---:|' * (len(header) - 1)}"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    notes = [n for n in (criteria_text(results), final_text(results)) if n]
    if results.get("scored") is False:
        notes.insert(0, NO_MASKS_NOTE)
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def demo_markdown(results: dict[str, Any], run_record: dict[str, Any]) -> str:
    """The demo's summary table with the machine and time it was measured on (demo.md)."""
    env = run_record.get("environment", {})
    cpu, thr = env.get("cpu", {}), env.get("threads", {})
    minutes = sum(run_record.get("timings", {}).values()) / 60
    return results_markdown(results) + (
        f"\nMeasured on {cpu.get('model') or cpu.get('machine')} "
        f"({thr.get('torch_threads')} threads, PyTorch CPU kernels "
        f"{cpu.get('torch_cpu_capability')}): the stages took {minutes:.0f} min.\n"
    )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"
