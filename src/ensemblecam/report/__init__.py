"""``ensemblecam report``: one self-contained HTML report of a run folder, plus its PNGs.

Input: a run folder of ``ensemblecam run`` (layout and ``results.json`` format: see
:mod:`ensemblecam.pipeline`). Output: ``<run>/report/report.html`` (every figure embedded
as a base64 ``data:image/png`` URI, inline CSS, no script, nothing fetched) and the same
figures as PNG files beside it. The HTML is written last and atomically; an existing
report is replaced only with ``force``.

Sections, in order (:data:`SECTIONS`): Summary (what was run; chosen ensemble vs Empty vs
U-Net in :data:`SUMMARY_METRICS`, mean +- std; where the run's folders are), Results
(headline table with published figures, bar chart, per-fold configurations, every metric
convention in two tables, per-fold objective; then per-case 3-D metrics with 95% CIs,
paired Wilcoxon tests against the chosen configuration and per-case box/strip plots, all
read from results.json and the per-case CSVs it names), Thresholds, Gallery, Classifiers (model x
fold table; figures one row per model, folds side by side), Data, Configuration
(config.yaml collapsed, run.json facts and one timings table).

Figures are made by plain functions on arrays (matplotlib ``Figure`` + Agg canvas, no
pyplot state), each returning PNG bytes:

- :func:`lesion_fraction_histogram`: share of the slice covered by lesion, lesion slices
  only (the thesis's Fig. 3.4);
- :func:`threshold_heatmap`: objective over the threshold grid of one operator (the
  paper's Fig. 4: member-1 threshold on y, member-2 threshold on x, value in each cell,
  best cell framed); one member: a curve; more than two: the 2-D slice through the best
  point;
- :func:`results_bar_chart`: mean +- std over folds of one metric per result row;
- :func:`gallery_figure`: rows = slices; columns = image, ground truth, each member's
  map, each operator's best mask, the chosen ensemble's mask (the paper's Fig. 3).

Learning curves and confusion matrices are the PNGs the train stage wrote (redrawn with
:mod:`ensemblecam.stages.train`'s plot functions from ``metrics.csv``/``train.json`` if absent).

Gallery cases: the evaluated (held-out) cases of every fold are pooled and ranked by the
case Dice of the fold's chosen configuration (``eval/masks.npz`` when present, else
``apply_config(best.json)`` on the fold's maps), computed over all of the case's
evaluated slices: 2TP/(2TP+FP+FN), cases without lesion excluded. Each shown case is
represented by its slice with the largest ground-truth lesion.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.errors import InputError
from ensemblecam.io import fsutil

RESULTS_FORMAT = "ensemblecam-results"
REPORT_DIR = "report"
REPORT_FILE = "report.html"

# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    """One published figure: method label, which of our rows it matches, values in %.

    ``match``: {"kind": ..., "model": ..., "method": ..., "operator": ...}, each optional;
    a row matches when every given key agrees (None: shown in the reference table only).
    ``values``: metric -> (mean, std or None), in percent.
    """

    method: str
    match: dict[str, str] | None
    values: dict[str, tuple[float, float | None]]


def _pm(miou: float, dsc: float, miou_sd: float | None = None, dsc_sd: float | None = None
        ) -> dict[str, tuple[float, float | None]]:
    return {"paper_miou": (miou, miou_sd), "paper_dsc": (dsc, dsc_sd)}


#: Where each reference table comes from.
REFERENCE_SOURCES: dict[str, str] = {
    "brats": "EnsembleCAM paper (Ostrowski, Prabakaran, Shafique), BraTS 2020, FLAIR/T1ce/T2: "
             "Table 1 (means) and Table 3 (+- std over the 3 validation samples)",
    "prostate": "EnsembleCAM paper (Ostrowski, Prabakaran, Shafique), MSD prostate (ADC): "
                "Table 2 (means) and Table 4 (+- std over the 3 validation samples)",
    "kits": "Thesis on weakly supervised kidney-tumour segmentation (KiTS21): Tables 4.3 "
            "and 4.5, lesion IoU on correctly classified tumour slices of the test split",
}

#: Metrics the published figures are given in, per setting.
REFERENCE_METRICS: dict[str, tuple[str, ...]] = {
    "brats": ("paper_miou", "paper_dsc"),
    "prostate": ("paper_miou", "paper_dsc"),
    "kits": ("slice_iou_correct_mean",),
}

_GC = "gradcam"
#: The seeds' published figures (percent), DESIGN.md "Reference figures".
REFERENCE_FIGURES: dict[str, list[Reference]] = {
    "brats": [
        Reference("Empty", {"kind": "empty"}, _pm(47.7, 64.6)),
        Reference("SEAM", None, _pm(39.0, 56.1, 6.3, 11.9)),
        Reference("WSS-CMER", None, _pm(42.6, 59.7, 6.3, 11.8)),
        Reference("ResNet-34 Grad-CAM", {"kind": "single", "model": "resnet34", "method": _GC},
                  _pm(50.7, 67.3)),
        Reference("ResNet-50 Grad-CAM", {"kind": "single", "model": "resnet50", "method": _GC},
                  _pm(52.1, 68.5)),
        Reference("Ensemble ResNet-34x50 'or'", {"operator": "or"}, _pm(51.3, 67.8)),
        Reference("Ensemble ResNet-34x50 '<'", {"operator": "min"}, _pm(51.9, 68.3)),
        Reference("Ensemble ResNet-34x50 '>'", {"operator": "max"}, _pm(52.2, 68.6)),
        Reference("Ensemble ResNet-34x50 'and'", {"operator": "and"},
                  _pm(54.2, 70.3, 0.8, 1.5)),
        Reference("Fully supervised (FSSS)", {"kind": "unet"}, _pm(69.2, 81.8)),
    ],
    "prostate": [
        Reference("Empty", {"kind": "empty"}, _pm(48.7, 65.5)),
        Reference("SEAM", None, _pm(49.1, 65.9, 7.2, 13.35)),
        Reference("WSS-CMER", None, _pm(55.4, 71.3, 7.9, 14.6)),
        Reference("ResNet-34 Grad-CAM", {"kind": "single", "model": "resnet34", "method": _GC},
                  _pm(63.8, 78.0)),
        Reference("ResNet-50 Grad-CAM", {"kind": "single", "model": "resnet50", "method": _GC},
                  _pm(61.4, 76.1)),
        Reference("Ensemble ResNet-34x50 'or'", {"operator": "or"}, _pm(63.0, 77.3)),
        Reference("Ensemble ResNet-34x50 '<'", {"operator": "min"}, _pm(63.5, 77.7)),
        Reference("Ensemble ResNet-34x50 '>'", {"operator": "max"}, _pm(64.4, 78.4)),
        Reference("Ensemble ResNet-34x50 'and'", {"operator": "and"},
                  _pm(65.7, 79.3, 1.6, 3.1)),
        Reference("Fully supervised (FSSS)", {"kind": "unet"}, _pm(76.7, 86.8)),
    ],
    "kits": [
        Reference("Grad-CAM (ResNet-101)", {"kind": "single", "method": "gradcam"},
                  {"slice_iou_correct_mean": (31.6, None)}),
        Reference("Grad-CAM++", {"kind": "single", "method": "gradcampp"},
                  {"slice_iou_correct_mean": (25.1, None)}),
        Reference("Smooth Grad-CAM++", {"kind": "single", "method": "smoothgradcampp"},
                  {"slice_iou_correct_mean": (25.1, None)}),
        Reference("Score-CAM", {"kind": "single", "method": "scorecam"},
                  {"slice_iou_correct_mean": (32.3, None)}),
        Reference("U-Net (supervised)", {"kind": "unet"},
                  {"slice_iou_correct_mean": (54.2, None)}),
    ],
}

#: Short explanation of each metric convention (DESIGN.md "Metrics").
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
HEADLINE = ("paper_miou", "paper_dsc", "lesion_iou", "lesion_dice", "slice_dice_mean",
            "case_dice_mean")


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def reference_matches(ref: Reference, identity: dict[str, Any]) -> bool:
    """Whether a result row (``row_identity``) is the row a published figure refers to."""
    if ref.match is None:
        return False
    for key, want in ref.match.items():
        if key == "kind":
            if identity["kind"] != want:
                return False
        elif key == "operator":
            if identity["kind"] not in ("operator", "ensemble") or identity["operator"] != want:
                return False
        else:  # model / method of a single member
            got = [m[key] for m in identity["members"]]
            if len(got) != 1 or _norm(want) not in _norm(got[0]):
                return False
            if key == "method" and _norm(got[0]) != _norm(want):
                return False
    return True


def _fold_configs(cfg: Any) -> list[dict[str, Any]]:
    """The configuration(s) of a row's ``config``: one dict, or {fold: dict} per fold."""
    if isinstance(cfg, dict) and "operator" in cfg:
        return [cfg]
    if isinstance(cfg, dict):
        return [v for v in cfg.values() if isinstance(v, dict) and "operator" in v]
    return []


def row_identity(row: dict[str, Any]) -> dict[str, Any]:
    """kind, operator and members (model tag, method) of a results.json row.

    From ``config`` ({"operator", "members"}, or {fold: {...}} per fold: the operator is
    kept when every fold agrees, else "mixed"; members are the union over folds, in
    order) or else parsed from the row's name (``"ensemble (and: a__gradcam 0.7 x ...)"``).
    """
    kind = str(row.get("kind", ""))
    configs = _fold_configs(row.get("config"))
    name = str(row.get("name", ""))
    if configs:
        ops = list(dict.fromkeys(str(c.get("operator")) for c in configs))
        op: str | None = ops[0] if len(ops) == 1 else "mixed"
        members = list(dict.fromkeys(str(m) for c in configs for m in c.get("members", [])))
    else:
        found = re.search(r"\b(and|or|min|max|mean|single|vote(?::\d+)?)\b", name)
        op = found.group(1) if found else None
        members = re.findall(r"[\w.\-]+__[\w.\-]+", name)
    parsed = []
    for m in members:
        model, _, method = m.partition("__")
        parsed.append({"model": model, "method": method})
    if kind == "single" and op is None:
        op = "single"
    return {"kind": kind, "operator": op, "members": parsed}


# --------------------------------------------------------------------------- run facts


def is_phantom(prepare: dict[str, Any], run_json: dict[str, Any] | None = None) -> bool | None:
    """True if the store was prepared from a synth phantom (``phantom.json`` in the data
    root, or the run records ``phantom``); None if the data folder cannot be checked."""
    if run_json and isinstance(run_json.get("phantom"), bool):
        return bool(run_json["phantom"])
    data = prepare.get("data")
    if not data:
        return None
    root = Path(str(data))
    if (root / "phantom.json").is_file():
        return True
    return False if root.is_dir() else None


def reference_setting(prepare: dict[str, Any], phantom: bool | None) -> tuple[str | None, str]:
    """(key of REFERENCE_FIGURES or None, one-sentence reason) from the store's settings.

    brats + flair,t1ce,t2 -> "brats"; msd + adc -> "prostate"; kits -> "kits"; a phantom
    is never comparable.
    """
    layout = str(prepare.get("layout", ""))
    mods = [str(m).lower() for m in prepare.get("modalities", []) or []]
    key = None
    if layout == "brats" and mods == ["flair", "t1ce", "t2"]:
        key = "brats"
    elif layout == "msd" and mods == ["adc"]:
        key = "prostate"
    elif layout == "kits":
        key = "kits"
    if key is None:
        return None, (f"layout {layout or '?'} with channels {','.join(mods) or '?'} matches "
                      "none of the seeds' settings, so no published figure is comparable.")
    if phantom:
        return None, ("The data is the synthetic phantom (ensemblecam synth), not the real "
                      f"{key} data: its numbers are NOT comparable to the seeds' published "
                      "figures, which are listed below for orientation only.")
    note = "" if phantom is False else (" (the data folder could not be checked; the "
                                        "comparison assumes it holds the real data)")
    return key, (f"The store's settings (layout {layout}, channels {','.join(mods)}) match "
                 f"the seeds' setting for {key}: published figures are shown beside ours{note}.")


# --------------------------------------------------------------------------- figures


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib ``Figure`` rendered with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def lesion_fraction_histogram(
    fractions: np.ndarray, log: bool | None = None, bins: int = 40, mark: float | None = 0.02
) -> bytes:
    """Histogram of lesion share per slice (percent of the slice), lesion slices only.

    Slices with fraction 0 are left out (thesis Fig. 3.4); ``log``: log-scaled counts
    (None: log when the fullest bin holds more than 20 times the emptiest non-empty one);
    ``mark``: a dashed line at that share (thesis: 2%).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    f = np.asarray(fractions, dtype=np.float64)
    f = f[f > 0] * 100.0
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    if f.size:
        counts, _ = np.histogram(f, bins=bins)
        nz = counts[counts > 0]
        if log is None:
            log = bool(nz.max() > 20 * nz.min())
        ax.hist(f, bins=bins, color="#4c72b0", edgecolor="white", log=log)
        if log:
            ax.yaxis.set_major_formatter(ScalarFormatter())
    else:
        ax.text(0.5, 0.5, "no lesion slice", ha="center", va="center", transform=ax.transAxes)
    if mark is not None and f.size:
        ax.axvline(mark * 100, color="grey", ls="--", lw=1, label=f"{mark:.0%} of the slice")
        ax.legend(fontsize=8)
    ax.set_xlabel("lesion share of the slice (%)")
    ax.set_ylabel("lesion slices" + (" (log scale)" if log else ""))
    ax.set_title(f"{f.size} lesion slices", fontsize=9)
    return figure_png(fig)


def threshold_heatmap(
    values: np.ndarray,
    thresholds: Sequence[float],
    members: Sequence[str],
    objective: str,
    operator: str,
    title: str = "",
) -> bytes:
    """Objective over the threshold grid (the paper's Fig. 4), best point marked.

    ``values``: shape (L,) (one member, or ``mean``) or (L,)*M, axis i = member i's
    threshold index. 2 members: member 1 on y, member 2 on x, value (%) in each cell.
    M > 2: the (member 1, member 2) slice through the best point, other members fixed.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    v = np.asarray(values, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if v.size == 0 or v.shape[0] != t.size or any(s != t.size for s in v.shape):
        raise InputError(f"threshold grid of {operator}: shape {v.shape} does not fit "
                         f"{t.size} thresholds")
    finite = np.where(np.isfinite(v), v, -np.inf)
    best = np.unravel_index(int(np.argmax(finite)), v.shape)
    head = title or f"{operator}: {objective}"
    if v.ndim == 1:
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        ax.plot(t, v * 100, "o-")
        ax.plot(t[best[0]], v[best] * 100, "r*", ms=14, label=f"best {t[best[0]]:g}")
        ax.set_xlabel(f"threshold ({members[0] if len(members) == 1 else operator})")
        ax.set_ylabel(f"{objective} (%)")
        ax.legend(fontsize=8)
        ax.set_title(head, fontsize=9)
        return figure_png(fig)
    fixed = ""
    if v.ndim > 2:
        idx = (slice(None), slice(None), *best[2:])
        fixed = ", ".join(f"{m} = {t[b]:g}" for m, b in zip(members[2:], best[2:], strict=False))
        v = v[idx]
    n = t.size
    fig = Figure(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax = fig.subplots()
    im = ax.imshow(v * 100, origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label=f"{objective} (%)")
    if n <= 16:
        lo, hi = np.nanmin(v), np.nanmax(v)
        for (i, j), x in np.ndenumerate(v):
            light = np.isfinite(x) and hi > lo and (x - lo) / (hi - lo) < 0.55
            ax.text(j, i, "-" if not np.isfinite(x) else f"{x * 100:.1f}", ha="center",
                    va="center", fontsize=7, color="white" if light else "black")
    ax.add_patch(Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
    labels = [f"{x:g}" for x in t]
    ax.set_xticks(range(n), labels, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel(f"threshold {members[1]}")
    ax.set_ylabel(f"threshold {members[0]}")
    ax.set_title(head + (f"\n(slice at {fixed})" if fixed else ""), fontsize=9)
    return figure_png(fig)


def results_bar_chart(
    names: Sequence[str], means: Sequence[float], stds: Sequence[float], metric: str
) -> bytes:
    """Horizontal bars of ``metric`` (%) per result row, mean +- std over folds."""
    from matplotlib.figure import Figure

    m = np.asarray(means, dtype=np.float64) * 100
    s = np.nan_to_num(np.asarray(stds, dtype=np.float64) * 100)
    fig = Figure(figsize=(7, 0.8 + 0.35 * max(len(names), 1)))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(m), xerr=s, color="#55a868", capsize=3)
    ax.set_yticks(y, [n if len(n) <= 60 else n[:57] + "..." for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (%), mean +- std over folds")
    finite = m[np.isfinite(m)]
    if finite.size:
        ax.set_xlim(max(0.0, float(finite.min()) - 10), min(100.0, float(finite.max()) + 5))
    return figure_png(fig)


def case_box_plot(names: Sequence[str], values: Sequence[Sequence[float]], label: str,
                  seed: int = 0) -> bytes:
    """Per-case values of one metric per result row: a horizontal box (median, quartiles,
    whiskers at 1.5 IQR) with every case as a jittered dot (seeded); non-finite values are
    left out and the number of cases shown is given per row."""
    import inspect

    from matplotlib.figure import Figure

    vals = [np.asarray(v, dtype=np.float64) for v in values]
    vals = [v[np.isfinite(v)] for v in vals]
    fig = Figure(figsize=(7, 0.8 + 0.4 * max(len(names), 1)))
    ax = fig.subplots()
    pos = np.arange(1, len(names) + 1)
    horizontal = ({"orientation": "horizontal"}
                  if "orientation" in inspect.signature(ax.boxplot).parameters
                  else {"vert": False})
    ax.boxplot([v if v.size else [np.nan] for v in vals], positions=pos, widths=0.6,
               showfliers=False, **horizontal)
    rng = np.random.default_rng(seed)
    for p, v in zip(pos, vals, strict=True):
        ax.scatter(v, p + rng.uniform(-0.18, 0.18, v.size), s=9, alpha=0.6, color="#4c72b0",
                   zorder=3)
    ax.set_yticks(pos, [f"{n if len(n) <= 72 else n[:69] + '...'} (n={v.size})"
                        for n, v in zip(names, vals, strict=True)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    return figure_png(fig)


@dataclass
class GalleryRow:
    """One gallery slice: image (H, W), ground truth, member maps and named masks."""

    title: str
    image: np.ndarray
    gt: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # column -> text under the cell


def gallery_figure(rows: Sequence[GalleryRow], title: str = "") -> bytes:
    """The paper's Fig. 3: image | ground truth | member maps | masks, one row per slice.

    Maps are drawn as a jet heatmap in [0, 1] over the image; masks in red over the image
    with the ground-truth outline in yellow. Columns are the union over rows (a missing
    entry stays blank); ``notes`` (e.g. thresholds) are printed under their cell.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not rows:
        raise InputError("gallery: no slice to show")
    map_cols = list(dict.fromkeys(k for r in rows for k in r.maps))
    mask_cols = list(dict.fromkeys(k for r in rows for k in r.masks))
    cols = ["image", "ground truth", *map_cols, *mask_cols]
    size = 1.7
    note_lines = max((n.count("\n") + 1 for r in rows for n in r.notes.values()), default=0)
    gap = 0.15 * note_lines + 0.15  # inches under each row for the notes
    fig = Figure(figsize=(size * len(cols), (size + gap) * len(rows) + (0.4 if title else 0.1)))
    axes = np.asarray(fig.subplots(len(rows), len(cols), squeeze=False,
                                   gridspec_kw={"hspace": gap / size + 0.05, "wspace": 0.05}))
    red = ListedColormap(["red"])
    green = ListedColormap(["lime"])
    for i, row in enumerate(rows):
        img = np.asarray(row.image, dtype=np.float32)
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
        gt = np.asarray(row.gt, dtype=bool)

        def base(ax: Any, img: np.ndarray = img, lo: float = lo, hi: float = hi) -> None:
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)

        def outline(ax: Any, gt: np.ndarray = gt) -> None:
            if gt.any() and not gt.all():
                ax.contour(gt.astype(np.float32), levels=[0.5], colors="yellow",
                           linewidths=0.8)

        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col if len(col) <= 24 else col[:22] + "..", fontsize=8.5)
            if j == 0:
                base(ax)
                ax.set_ylabel(row.title, fontsize=8)
            elif j == 1:
                base(ax)
                ax.imshow(np.ma.masked_where(~gt, gt), cmap=green, alpha=0.5, vmin=0, vmax=1)
            elif col in row.maps:
                base(ax)
                ax.imshow(np.asarray(row.maps[col], np.float32), cmap="jet", alpha=0.5,
                          vmin=0, vmax=1)
                outline(ax)
            elif col in row.masks:
                mk = np.asarray(row.masks[col], dtype=bool)
                base(ax)
                ax.imshow(np.ma.masked_where(~mk, mk), cmap=red, alpha=0.5, vmin=0, vmax=1)
                outline(ax)
            else:
                ax.axis("off")
            if col in row.notes:
                ax.set_xlabel(row.notes[col], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return figure_png(fig)


# --------------------------------------------------------------------------- reading


@dataclass
class Run:
    """What the report reads from a run folder (missing optional parts are None)."""

    path: Path
    results: dict[str, Any]
    run_json: dict[str, Any]
    config_text: str | None
    store: Any | None
    store_error: str | None


def open_run(run_dir: str | Path) -> Run:
    """Open a run folder; not a run folder or a missing/foreign results.json: InputError."""
    path = Path(run_dir)
    if not path.is_dir():
        raise InputError(f"{path}: run folder not found")
    if not (path / "run.json").is_file() and not (path / "config.yaml").is_file():
        raise InputError(f"{path}: not an ensemblecam run folder (no run.json or config.yaml)")
    res_path = path / "results.json"
    if not res_path.is_file():
        raise InputError(f"{res_path}: results.json not found; finish the run first "
                         "(ensemblecam run)")
    results = fsutil.read_json(res_path, "results file")
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise InputError(f"{res_path}: not an ensemblecam results file")
    rows = results.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise InputError(f"{res_path}: 'rows' must be a list of rows with a name")
    run_json: dict[str, Any] = {}
    if (path / "run.json").is_file():
        loaded = fsutil.read_json(path / "run.json", "run record")
        run_json = loaded if isinstance(loaded, dict) else {}
    config_text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None
    store = None
    store_error = None
    try:
        from ensemblecam.io.store import SliceStore

        store = SliceStore.open(path / "store")
    except InputError as exc:
        store_error = str(exc)
    return Run(path, results, run_json, config_text, store, store_error)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _fold_names(run: Run) -> list[str]:
    folds = run.results.get("folds")
    if isinstance(folds, list) and folds:
        return [str(f) for f in folds]
    return sorted(p.name for p in run.path.glob("fold*") if p.is_dir())


def _best_per_operator(search_dir: Path) -> dict[str, dict[str, Any]]:
    """First (= best) configuration of every multi-member operator in ranking.csv."""
    path = search_dir / "ranking.csv"
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            op = row.get("operator", "")
            if op in ("", "single") or op in out:
                continue
            try:
                out[op] = {"operator": op, "members": row["members"].split("+"),
                           "thresholds": [float(t) for t in row["thresholds"].split("+")],
                           "gate": float(row["gate"]) if row.get("gate") else None}
            except (KeyError, ValueError) as exc:
                raise InputError(f"{path}: malformed row ({exc})") from exc
    return out


# --------------------------------------------------------------------------- sections


def _fmt_pct(mean: Any, std: Any = None) -> str:
    try:
        m = float(mean)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(m):
        return "–"
    out = f"{100 * m:.1f}"
    try:
        s = float(std)
    except (TypeError, ValueError):
        return out
    return out + (f" ± {100 * s:.1f}" if math.isfinite(s) else "")


def _fmt_num(mean: Any, std: Any = None) -> str:
    try:
        m = float(mean)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(m):
        return "–"
    out = f"{m:.4g}" if abs(m) < 1e4 else f"{m:.0f}"
    try:
        s = float(std)
    except (TypeError, ValueError):
        return out
    return out + (f" ± {s:.3g}" if math.isfinite(s) else "")


def is_fraction_metric(name: str) -> bool:
    """Metrics shown as percentages (everything except counts and distances)."""
    return not (name.startswith("n_") or "hd95" in name or "undefined" in name
                or name in ("tp", "fp", "fn", "tn"))


def format_metric(name: str, mean: Any, std: Any = None) -> str:
    """'54.2 ± 0.8' for fractions (percent, one decimal as the paper), plain otherwise."""
    return _fmt_pct(mean, std) if is_fraction_metric(name) else _fmt_num(mean, std)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _th(h: str) -> str:
    """Header cell text: escaped, with a break opportunity after each underscore."""
    return _e(h).replace("_", "_<wbr>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_th(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{_e(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def _flatten(obj: Any, prefix: str = "", sep: str = ".") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep)
        return out
    if isinstance(obj, float):
        return [(prefix, f"{obj:.4g}")]
    text = json.dumps(obj) if isinstance(obj, list) else str(obj)
    return [(prefix, text if len(text) <= 200 else text[:197] + "...")]


class _Report:
    """Collects HTML parts and figures; figures go to PNG files and data URIs."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.pngs: list[Path] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def h2(self, ident: str, title: str) -> None:
        self.parts.append(f'<h2 id="{_e(ident)}">{_e(title)}</h2>\n')

    def p(self, text: str, cls: str = "") -> None:
        c = f' class="{_e(cls)}"' if cls else ""
        self.parts.append(f"<p{c}>{_e(text)}</p>\n")

    def figure(self, name: str, png: bytes, caption: str, width: int | None = None) -> None:
        """Write ``name`` beside the report and embed it; ``width``: shown width in px."""
        if not png.startswith(b"\x89PNG"):
            raise InputError(f"{name}: not a PNG image")
        path = self.out_dir / name
        with fsutil.atomic_path(path) as tmp:
            tmp.write_bytes(png)
        self.pngs.append(path)
        data = base64.b64encode(png).decode("ascii")
        style = f' style="width:{int(width)}px"' if width else ""
        cap = f' style="max-width:{int(width)}px"' if width else ""
        self.parts.append(f'<figure><img alt="{_e(caption)}"{style} '
                          f'src="data:image/png;base64,{data}">'
                          f"<figcaption{cap}>{_e(caption)} ({_e(name)})</figcaption></figure>\n")


def _config_yaml(run: Run) -> dict[str, Any]:
    """config.yaml of the run as a dict ({} when absent or unreadable)."""
    if run.config_text is None:
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(run.config_text)
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _splits_path(run: Run) -> Path | None:
    """The run's splits.json: <run>/splits.json, <run>/split/splits.json or the store's."""
    cands = [run.path / "splits.json", run.path / "split" / "splits.json"]
    if run.store is not None:
        cands.append(Path(run.store.path) / "splits.json")
    return next((c for c in cands if c.is_file()), None)


def _best_json(run: Run, fold: str) -> dict[str, Any] | None:
    p = run.path / fold / "search" / "best.json"
    if not p.is_file():
        return None
    got = fsutil.read_json(p, "chosen configuration")
    return got if isinstance(got, dict) else None


def _describe_config(cfg: dict[str, Any]) -> str:
    """'and: resnet18__layercam > 0.4, resnet34__gradcam > 0.3' (+ gate): each member's
    mask is map > threshold (DESIGN.md), combined by the operator."""
    pairs = [f"{m} > {float(t):g}" for m, t in
             zip(cfg.get("members", []), cfg.get("thresholds", []), strict=False)]
    text = f"{cfg.get('operator')}: " + ", ".join(pairs)
    gate = cfg.get("gate")
    return text + (f", classifier gate {float(gate):g}" if gate is not None else "")


def _row_config_text(row: dict[str, Any], fold: str) -> str:
    cfg = row.get("config")
    if isinstance(cfg, dict) and "operator" in cfg:
        return _describe_config(cfg)
    if isinstance(cfg, dict) and isinstance(cfg.get(fold), dict):
        return _describe_config(cfg[fold])
    return "–"


#: Summary metrics: the paper's two and the two Dice conventions users know.
SUMMARY_METRICS = ("paper_miou", "paper_dsc", "lesion_dice", "case_dice_mean")
_SUMMARY_KINDS = ("ensemble", "empty", "unet", "pseudo_unet")


def _section_summary(rep: _Report, run: Run, folds: list[str]) -> None:
    rep.h2("summary", "Summary")
    cfg = _config_yaml(run)
    res = run.results
    rows: list[dict[str, Any]] = res["rows"]
    objective = str(res.get("objective", "paper_miou"))
    facts: list[tuple[str, str]] = []
    store = run.store
    prep = (store.manifest.get("prepare", {}) or {}) if store is not None else {}
    phantom = is_phantom(prep, run.run_json)
    if store is not None:
        n_pos = int(store.labels.sum())
        what = ("synthetic phantom (ensemblecam synth)" if phantom
                else f"{prep.get('layout', '?')} data")
        facts.append(("data", f"{what} from {prep.get('data', '?')}: {len(store.case_names)} "
                              f"cases, {store.n_slices} slices ({n_pos} with lesion), channels "
                              f"{', '.join(store.channels)}, {' x '.join(map(str, store.size))} "
                              "pixels"))
    else:
        facts.append(("data", f"slice store not available ({run.store_error})"))
    split = cfg.get("split") or {}
    scheme = f" ({split.get('scheme')})" if split.get("scheme") else ""
    facts.append(("folds", f"{len(folds)}{scheme}: {', '.join(folds)}; calibration part "
                           f"{(cfg.get('run') or {}).get('calibration_part', '?')}, evaluated "
                           f"part {(cfg.get('run') or {}).get('eval_part', '?')} (held out)"))
    models = [str(m) for m in (cfg.get("run") or {}).get("models") or []]
    if not models:
        models = sorted({p.name for f in folds for p in (run.path / f / "models").glob("*")
                         if p.is_dir()})
    facts.append(("classifiers", ", ".join(models) or "?"))
    best0 = next((b for b in (_best_json(run, f) for f in folds) if b), None) or {}
    search = best0.get("search") or {}
    members = [str(m) for m in search.get("members") or []]
    methods = list(dict.fromkeys(m.partition("__")[2] for m in members))
    cam = cfg.get("cam") or {}
    methods = methods or [str(m) for m in cam.get("methods") or []]
    layer = f" at {cam['layer']}" if cam.get("layer") else ""
    facts.append(("CAM methods", (", ".join(methods) or "?") + layer
                  + (f" ({len(members)} ensemble members)" if members else "")))
    ops = search.get("operators") or (cfg.get("search") or {}).get("operators") or []
    grid = search.get("grid") or (cfg.get("search") or {}).get("grid")
    facts.append(("search", f"operators {', '.join(map(str, ops)) or '?'}, threshold grid "
                            f"{grid or '?'}, up to {search.get('max_members', '?')} members, "
                            f"chosen by {objective} on the calibration part"))
    rep.add(_table(["", "what was run"], facts, "facts"))

    chosen = [r for k in _SUMMARY_KINDS for r in rows if r.get("kind") == k]
    names = [str(n) for n in res.get("metric_names") or []] or list(
        dict.fromkeys(k for r in rows for k in (r.get("mean") or {})))
    metrics = [m for m in SUMMARY_METRICS if m in names]
    if chosen and metrics:
        rep.add(f"<h3>Headline (mean ± std over {len(folds)} folds, %)</h3>\n")
        rep.add(_table(["result", *metrics],
                       [[r["name"], *(format_metric(m, (r.get("mean") or {}).get(m),
                                                    (r.get("std") or {}).get(m))
                                      for m in metrics)] for r in chosen], "headline"))
        ens = next((r for r in chosen if r.get("kind") == "ensemble"), None)
        empty = next((r for r in chosen if r.get("kind") == "empty"), None)
        unet = next((r for r in chosen if r.get("kind") == "unet"), None)
        if ens is not None:
            e = _num((ens.get("mean") or {}).get(objective))
            parts = [f"On held-out data the chosen ensemble reaches {objective} "
                     f"{format_metric(objective, e, (ens.get('std') or {}).get(objective))}"]
            for other, label in ((empty, "the Empty baseline"), (unet, "the supervised U-Net")):
                if other is None:
                    continue
                o = _num((other.get("mean") or {}).get(objective))
                if math.isfinite(e) and math.isfinite(o):
                    d = 100 * (e - o)
                    parts.append(f"{abs(d):.1f} points {'above' if d >= 0 else 'below'} "
                                 f"{label} ({format_metric(objective, o)})")
            rep.p("; ".join(parts) + ".")
        if ens is not None and folds:
            rep.p("Chosen configuration per fold: " + "; ".join(
                f"{f}: {_row_config_text(ens, f)}" for f in folds) + ".")
    where = [("run folder", str(run.path.resolve())),
             ("results", "results.json, results.csv"),
             ("per fold", "fold*/models (classifiers), fold*/maps (CAMs), fold*/search "
                          "(threshold grids, ranking), fold*/eval/<row> (metrics.json, "
                          "per_case.csv, per_slice.csv; rows: ensemble, op_<operator>, "
                          "single_<member>, unet)")]
    if store is not None:
        where.append(("slice store", str(Path(store.path).resolve())))
    sp = _splits_path(run)
    if sp is not None:
        where.append(("splits", str(sp.resolve())))
    export = run.path / "export"
    if export.is_dir():
        n = len(list(export.glob("*.nii*")))
        where.append(("NIfTI masks", f"{export.resolve()} ({n} files)"))
    where.append(("this report", str(rep.out_dir.resolve())))
    rep.add("<h3>Where things are</h3>\n" + _table(["", "path"], where, "facts"))


def _section_config(rep: _Report, run: Run) -> None:
    rep.h2("configuration", "Configuration")
    rep.p(f"Run folder: {run.path.resolve()}")
    if run.config_text is not None:
        rep.add(f"<details><summary>config.yaml ({len(run.config_text.splitlines())} lines, "
                f"click to open)</summary><pre>{_e(run.config_text)}</pre></details>\n")
    else:
        rep.p("config.yaml: not found in the run folder.", "note")
    if not run.run_json:
        rep.p("run.json: not found (no versions or timings recorded).", "note")
        return
    facts: list[tuple[str, str]] = []
    timings: list[tuple[str, str]] = []
    for key, value in run.run_json.items():
        if key == "timings" and isinstance(value, dict):
            timings = _flatten(value, sep="/")
        elif isinstance(value, dict):
            facts.append((key, ", ".join(f"{k} {v}" for k, v in _flatten(value)) or "–"))
        else:
            facts += _flatten(value, key)
    if facts:
        rep.add("<h3>Run record (run.json)</h3>\n" + _table(["key", "value"], facts, "facts"))
    if timings:
        total = sum(_num(v) for _, v in timings if math.isfinite(_num(v)))
        rows = [(k, f"{_num(v):.1f}" if math.isfinite(_num(v)) else v) for k, v in timings]
        rows.append(("total", f"{total:.1f}"))
        rep.add("<h3>Timings</h3>\n" + _table(["stage", "seconds"], rows, "timings"))


def _section_data(rep: _Report, run: Run) -> None:
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
    rows = [("cases", len(cases)), ("lesion cases", len(pos_cases)),
            ("slices", store.n_slices), ("positive (lesion) slices", int(labels.sum())),
            ("negative slices", int((labels == 0).sum())),
            ("channels", ", ".join(store.channels)),
            ("slice size", " x ".join(map(str, store.size)))]
    rows += [(f"prepare.{k}", v) for k, v in _flatten(prep)]
    rep.add('<div class="grid">\n<div>\n' + _table(["", "value"], rows, "facts") + "</div>\n")
    frac = store.table["lesion_fraction"].astype(np.float64)
    rep.add("<div>\n")
    rep.figure("lesion_fraction_histogram.png", lesion_fraction_histogram(frac),
               "Lesion share of the slice, lesion slices only (as the thesis's Fig. 3.4)", 560)
    rep.add("</div>\n</div>\n")
    split_path = _splits_path(run)
    if split_path is not None:
        from ensemblecam.io.split import read_splits, split_summary

        summary = split_summary(store, read_splits(split_path))
        if summary:
            rep.add(f"<h3>Split parts ({_e(split_path.name)})</h3>\n")
            keys = list(summary[0])
            rep.add(_table(keys, [[r[k] for k in keys] for r in summary]))


_CLS_KEYS = ("accuracy", "precision", "recall", "f1", "auroc")
_CLS_HEAD = ("acc", "prec", "rec", "F1", "AUROC")


def _section_classifiers(rep: _Report, run: Run, folds: list[str]) -> None:
    rep.h2("classifiers", "Classifiers")
    per_model: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    figures: dict[str, dict[str, list[tuple[str, bytes, str]]]] = {}
    for fold in folds:
        mdir = run.path / fold / "models"
        if not mdir.is_dir():
            continue
        for d in sorted(p for p in mdir.iterdir() if p.is_dir()):
            tj = d / "train.json"
            info = fsutil.read_json(tj, "train run") if tj.is_file() else {}
            info = info if isinstance(info, dict) else {}
            best = info.get("best", {}) or {}
            if not best and (d / "metrics.csv").is_file():
                hist = _read_csv(d / "metrics.csv")
                if hist:
                    best = max(hist, key=lambda r: _num(r.get("auroc")))
            if not best:
                continue
            per_model.setdefault(d.name, []).append((fold, info, best))
            figures.setdefault(d.name, {})[fold] = _train_figures(d, info, fold, rep.out_dir)
    if not per_model:
        rep.p("No classifier training runs found (fold*/models/*/train.json).", "note")
        return
    rep.p("Validation metrics of each classifier at its best epoch (%, slice called "
          "positive at the run's classifier threshold); acc = accuracy, prec = precision, "
          "rec = recall; the bold line is the mean ± std over folds.")
    body = []
    for model, entries in per_model.items():
        for fold, info, best in entries:
            body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in (
                model, fold, info.get("best_epoch", "?"),
                *(_fmt_pct(best.get(k)) for k in _CLS_KEYS),
                f"{info.get('n_train', '?')} / {info.get('n_val', '?')}")) + "</tr>")
        vals = [np.array([_num(b.get(k)) for _, _, b in entries]) for k in _CLS_KEYS]
        cells = [_fmt_pct(np.nanmean(v), np.nanstd(v)) if np.isfinite(v).any() else "–"
                 for v in vals]
        body.append('<tr class="mean">' + "".join(f"<td>{_e(c)}</td>" for c in (
            model, f"mean of {len(entries)}", "", *cells, "")) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in ("model", "fold", "best epoch", *_CLS_HEAD,
                                                  "train / val slices"))
    rep.add(f'<table class="cls"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            "</tbody></table>\n")
    unet = _unet_figures(run, folds)
    if unet:
        figures["U-Net (supervised, segmentation loss)"] = unet
    rep.p("Learning curves (loss; validation AUROC and F1, dotted line: best epoch) and "
          "validation confusion matrices at the best epoch: one row per model, folds side "
          "by side. Full-size PNGs are beside the report.")
    for model, per_fold in figures.items():
        if not any(per_fold.values()):
            continue
        rep.add(f"<h3>{_e(model)}</h3>\n<div class=\"grid\">\n")
        for figs in per_fold.values():
            rep.add('<div class="fold">\n')
            for name, png, caption in figs:
                rep.figure(name, png, caption, 200 if "confusion" in name else 370)
            rep.add("</div>\n")
        rep.add("</div>\n")


def _unet_figures(run: Run, folds: list[str]) -> dict[str, list[tuple[str, bytes, str]]]:
    """Learning curves the U-Net stage wrote (fold*/unet/learning_curve.png), per fold."""
    out: dict[str, list[tuple[str, bytes, str]]] = {}
    for fold in folds:
        src = run.path / fold / "unet" / "learning_curve.png"
        if src.is_file():
            png = src.read_bytes()
            safe = re.sub(r"[^\w.-]", "_", fold)
            if png.startswith(b"\x89PNG"):
                out[fold] = [(f"{safe}_unet_learning_curve.png", png,
                              f"U-Net {fold}: learning curve")]
    return out


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _train_figures(d: Path, info: dict[str, Any], fold: str, out_dir: Path
                   ) -> list[tuple[str, bytes, str]]:
    """Learning curve and confusion matrix PNGs of a train run (redrawn if absent)."""
    out = []
    tag = re.sub(r"[^\w.-]", "_", f"{fold}_{d.name}")
    for fname, what in (("learning_curve.png", "learning curve"),
                        ("confusion_matrix.png", "val. confusion matrix")):
        name = f"{tag}_{fname}"
        src = d / fname
        if not src.is_file():
            src = out_dir / name
            _redraw_train_figure(d, info, fname, src)
        if src.is_file():
            out.append((name, src.read_bytes(), f"{d.name} {fold}: {what}"))
    return out


def _redraw_train_figure(d: Path, info: dict[str, Any], fname: str, target: Path) -> None:
    """Redraw a missing train PNG with train.py's own plot functions (into ``target``)."""
    from ensemblecam.stages import train

    if fname == "learning_curve.png" and (d / "metrics.csv").is_file():
        try:
            hist = train.read_metrics_csv(d / "metrics.csv")
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{d / 'metrics.csv'}: unreadable history ({exc})") from exc
        if hist:
            best = info.get("best_epoch") or max(hist, key=lambda r: _num(r.get("auroc")))["epoch"]
            train.plot_learning_curve(target, hist, int(best))
    elif fname == "confusion_matrix.png" and (info.get("best") or {}).get("confusion"):
        train.plot_confusion(target, info["best"]["confusion"],
                             f"{d.name} {info.get('fold', '')}, epoch {info.get('best_epoch')}")


def _is_set_level(name: str) -> bool:
    """Metrics of ONE confusion matrix over the data set (vs per-slice / per-case means)."""
    return not any(x in name for x in ("slice_", "case_", "hd95"))


def _metric_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    return _table(["result", *names],
                  [[r["name"], *(format_metric(n, (r.get("mean") or {}).get(n),
                                               (r.get("std") or {}).get(n)) for n in names)]
                   for r in rows])


def _section_results(rep: _Report, run: Run, folds: list[str]) -> None:
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
    rep.p(f"{len(folds)} fold(s): {', '.join(folds)}. Mean ± std over folds (population "
          f"std), in percent with one decimal as in the paper. Configurations were chosen "
          f"on the calibration part by {objective}; every number is on held-out data. "
          "Operator and single-member rows use each fold's own best members and "
          "thresholds (listed below).")
    rep.p(reason, "note" if ref_key is None else "")
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
                pub.append(f"{v:.1f}" + (f" ± {s:.1f}" if s is not None else "")
                           + f" ({hit.method})")
        body.append([r["name"], r.get("kind", ""),
                     *(format_metric(n, mean.get(n), std.get(n)) for n in head), *pub])
    rep.add(_table(header, body, "results"))
    if ref_key is not None:
        rep.p(f"Published: {REFERENCE_SOURCES[ref_key]}.")
    okrows = [r for r in rows if np.isfinite(_num((r.get("mean") or {}).get(objective)))]
    if okrows:
        rep.figure("results_" + re.sub(r"[^\w]", "_", objective) + ".png",
                   results_bar_chart([str(r["name"]) for r in okrows],
                                     [_num(r["mean"][objective]) for r in okrows],
                                     [_num((r.get("std") or {}).get(objective)) for r in okrows],
                                     objective),
                   f"{objective}: mean ± std over folds per result row", 760)
    with_cfg = [r for r in rows if _fold_configs(r.get("config"))]
    if folds and with_cfg:
        rep.add("<h3>Configuration of each row per fold (operator: member map > threshold)</h3>\n")
        rep.add(_table(["result", *folds], [[r["name"], *(_row_config_text(r, f)
                                                           for f in folds)] for r in with_cfg],
                       "configs"))
    set_level = [n for n in names if _is_set_level(n)]
    per_item = [n for n in names if not _is_set_level(n)]
    rep.add("<h3>Every metric convention</h3>\n")
    if set_level:
        rep.add("<p>Over the data set (one confusion matrix of all evaluated pixels):</p>\n"
                + _metric_table(rows, set_level))
    if per_item:
        rep.add("<p>Per slice and per case (means over lesion slices / cases):</p>\n"
                + _metric_table(rows, per_item))
    if folds:
        rep.add(f"<h3>{_e(objective)} per fold</h3>\n")
        rep.add(_table(["result", *folds],
                       [[r["name"], *(format_metric(objective, ((r.get("per_fold") or {})
                                                                .get(f) or {}).get(objective))
                                      for f in folds)] for r in rows]))
    legend = []
    for n in names:
        text = METRIC_EXPLANATIONS.get(n) or METRIC_EXPLANATIONS.get(
            re.sub(r"_(mean|std)$", "", n))
        if text is not None:
            legend.append((n, text))
    if legend:
        rep.add("<h3>Metric conventions</h3>\n" + _table(["metric", "meaning"], legend, "facts"))
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
_CASE_LABELS = {"dice": "case Dice (3-D)", "nsd": "NSD", "hd95_mm": "HD95 (mm)",
                "lesionwise_dice": "lesion-wise Dice (BraTS 2023)",
                "lesionwise_hd95_mm": "lesion-wise HD95 (mm, BraTS 2023)",
                "lesion_sensitivity": "lesion sensitivity", "fp_lesions": "FP lesions per case"}


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
    if v is None or not np.isfinite(_num(v)):
        return "–"
    v = float(v)
    if metric in ("hd95_mm", "lesionwise_hd95_mm", "fp_lesions"):
        return f"{v:.3g}"
    return f"{100 * v:.1f}"


def _case_diff(metric: str, v: Any) -> str:
    if v is None or not np.isfinite(_num(v)):
        return "–"
    return ("+" if float(v) >= 0 else "") + _case_value(metric, v)


def _p_text(p: Any) -> str:
    if p is None or not np.isfinite(_num(p)):
        return "p –"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _section_case_statistics(rep: _Report, run: Run) -> None:
    """Per-case 3-D metrics with 95% CIs, paired tests against the chosen configuration and
    box/strip plots; every number is read from results.json and the per-case CSV files
    it names (nothing is recomputed)."""
    stats = run.results.get("case_statistics")
    rows = [r for r in run.results["rows"] if isinstance(r.get("cases"), dict)]
    if not isinstance(stats, dict) or not rows:
        return
    names = [m for m in (stats.get("metrics") or {}) if isinstance(m, str)]
    chosen, best_single = stats.get("chosen"), stats.get("best_single")
    rep.add('<h3 id="cases">Per case (3-D, scan spacing): means with 95% confidence '
            "intervals</h3>\n")
    rep.p(f"Unit: {stats.get('unit', 'case')}. CI: {stats.get('ci', '')}. Dice, NSD, "
          "lesion-wise Dice and lesion sensitivity in percent; HD95 in mm; FP lesions per "
          "case. HD95 is left out where exactly one of prediction and reference is empty; "
          "lesion sensitivity where the reference has no lesion.")

    def label(r: dict[str, Any]) -> str:
        return str(r["name"]) + (" [best single member]" if r["name"] == best_single else "")

    body = []
    for r in rows:
        c = r["cases"]
        cells = [label(r), str(c.get("n_cases", ""))]
        for m in names:
            ci = (c.get("ci95") or {}).get(m) or [None, None]
            cells.append(f"{_case_value(m, (c.get('mean') or {}).get(m))} "
                         f"[{_case_value(m, ci[0])}, {_case_value(m, ci[1])}]")
        body.append(cells)
    rep.add(_table(["result", "cases", *(_CASE_LABELS.get(m, m) for m in names)], body,
                   "cases"))
    rep.add("<details><summary>Per-case conventions</summary>\n"
            + _table(["metric", "meaning"], [(_CASE_LABELS.get(m, m), CASE_EXPLANATIONS[m])
                                             for m in names if m in CASE_EXPLANATIONS],
                     "facts") + "</details>\n")
    compared = [r for r in rows if isinstance(r["cases"].get("vs_chosen"), dict)]
    if chosen and compared:
        rep.add(f"<h3>Paired comparison: {_e(chosen)} minus each row</h3>\n")
        rep.p(f"Mean difference over the cases both rows scored [95% bootstrap CI], and the "
              f"p-value of the {stats.get('test', 'paired Wilcoxon signed-rank test')}. "
              "Higher is better for Dice, NSD and sensitivity, lower for HD95 and FP lesions.")
        body = []
        for r in compared:
            vs = r["cases"]["vs_chosen"]
            cells = [label(r)]
            for m in names:
                t = vs.get(m) or {}
                ci = t.get("ci95") or [None, None]
                cells.append(f"{_case_diff(m, t.get('mean_difference'))} "
                             f"[{_case_diff(m, ci[0])}, {_case_diff(m, ci[1])}], "
                             f"{_p_text(t.get('p_value'))} (n={t.get('n', 0)})")
            body.append(cells)
        rep.add(_table(["compared with", *(_CASE_LABELS.get(m, m) for m in names)], body,
                       "comparisons"))
    for m in CASE_PLOT_METRICS:
        if m not in names:
            continue
        shown, values = [], []
        for r in rows:
            vals = []
            for f in (r["cases"].get("files") or {}).values():
                path = run.path / str(f)
                if not path.is_file():
                    raise InputError(f"{path}: per-case file named in results.json not found")
                try:
                    vals += [float(x[m]) for x in _read_csv(path) if x.get(m) not in (None, "")]
                except (KeyError, ValueError) as exc:
                    raise InputError(f"{path}: malformed per-case file ({exc})") from exc
            shown.append(label(r))
            values.append(vals)
        scale = 100.0 if m not in ("hd95_mm", "lesionwise_hd95_mm", "fp_lesions") else 1.0
        unit = " (%)" if scale == 100.0 else ""
        rep.figure(f"cases_{m}.png",
                   case_box_plot(shown, [np.asarray(v) * scale for v in values],
                                 f"{_CASE_LABELS.get(m, m)}{unit}, one dot per case"),
                   f"{_CASE_LABELS.get(m, m)} per case, every result row (box: median and "
                   "quartiles)", 760)


def _reference_table(rep: _Report, key: str) -> None:
    metrics_ = REFERENCE_METRICS[key]
    rows = []
    for ref in REFERENCE_FIGURES[key]:
        cells = []
        for m in metrics_:
            v, s = ref.values.get(m, (float("nan"), None))
            cells.append(f"{v:.1f}" + (f" ± {s:.1f}" if s is not None else ""))
        rows.append([ref.method, *cells])
    rep.add(_table(["method", *metrics_], rows))
    rep.p(f"Source: {REFERENCE_SOURCES[key]}.")


def _section_heatmaps(rep: _Report, run: Run, folds: list[str]) -> None:
    rep.h2("thresholds", "Threshold search (the paper's Fig. 4)")
    rep.p("One heatmap per fold: the objective of the fold's chosen operator and member "
          "pair over the threshold grid, on the calibration part (the held-out part is "
          "never used to choose). Members and thresholds can differ between folds.")
    made = 0
    rep.add('<div class="grid">\n')
    for fold in folds:
        sdir = run.path / fold / "search"
        if not (sdir / "best.json").is_file():
            continue
        best = fsutil.read_json(sdir / "best.json", "chosen configuration")
        png = _heatmap_for(sdir, best, fold)
        if png is None:
            continue
        safe = re.sub(r"[^\w.-]", "_", fold)
        objective = str(best.get("objective", ""))
        members = [str(m) for m in best.get("members", [])]
        axes = (f"y: {members[0]}, x: {members[1]}" if len(members) >= 2
                else f"x: {members[0] if members else '?'} threshold")
        rep.figure(f"threshold_heatmap_{safe}.png", png,
                   f"{fold}: {objective} on the calibration part of every threshold pair of "
                   f"the fold's chosen operator '{best.get('operator')}' and members ({axes}); "
                   f"red frame: chosen {_describe_config(best)} = "
                   f"{format_metric(objective, best.get(objective))}", 360)
        made += 1
    rep.add("</div>\n")
    if not made:
        rep.p("No search results found (fold*/search/best.json with grid files).", "note")


def _heatmap_for(sdir: Path, best: dict[str, Any], fold: str) -> bytes | None:
    op = str(best.get("operator", ""))
    members = [str(m) for m in best.get("members", [])]
    objective = str(best.get("objective", "paper_miou"))
    all_members = (best.get("search") or {}).get("members") or members
    if op == "single" and len(all_members) > 1:
        return _single_curve(sdir, best, members, objective, fold)
    name = f"grid_{op.replace(':', '')}"
    if len(members) != len(all_members):
        name += "__" + "+".join(members)
    npy, meta_p = sdir / f"{name}.npy", sdir / f"{name}.json"
    if not npy.is_file():
        return None
    meta = fsutil.read_json(meta_p, "grid metadata") if meta_p.is_file() else {}
    values = np.load(npy)
    thresholds = meta.get("thresholds") or (best.get("search") or {}).get("grid_values")
    if thresholds is None:
        from ensemblecam.ensemble.search import parse_grid

        thresholds = parse_grid((best.get("search") or {}).get("grid", "0:0.9:0.1")).tolist()
    return threshold_heatmap(values, thresholds, meta.get("members", members), objective, op,
                             f"{fold}: '{op}' {objective}")


def _single_curve(sdir: Path, best: dict[str, Any], members: list[str], objective: str,
                  fold: str) -> bytes | None:
    """Objective vs threshold of the best single member, from ranking.csv."""
    path = sdir / "ranking.csv"
    if not path.is_file():
        return None
    pts: dict[float, float] = {}
    gate = "" if best.get("gate") is None else str(best.get("gate"))
    for row in _read_csv(path):
        if (row.get("operator") == "single" and row.get("members") == "+".join(members)
                and (row.get("gate") or "") == gate):
            t = float(row["thresholds"])
            pts.setdefault(t, float(row[objective]))
    if not pts:
        return None
    ts = sorted(pts)
    return threshold_heatmap(np.array([pts[t] for t in ts]), ts, members, objective, "single",
                             f"{fold}: single member {members[0]}")


# --------------------------------------------------------------------------- gallery


@dataclass
class _CaseScore:
    fold: str
    case: str
    dice: float
    indices: np.ndarray  # store indices of the case's evaluated slices


def _eval_indices(run: Run, fold: str) -> tuple[np.ndarray, Path | None]:
    """Store indices of the fold's evaluated slices (eval/masks.npz, else the test part)."""
    store = run.store
    assert store is not None
    npz = run.path / fold / "eval" / "masks.npz"
    if npz.is_file():
        with np.load(npz) as z:
            return z["index"].astype(np.int64), npz
    from ensemblecam.io.split import get_fold

    splits = _splits_path(run)
    if splits is None:
        return np.zeros(0, np.int64), None
    cases = get_fold(splits, fold).part("test")
    idx = store.indices_for_cases([c for c in cases if c in store.cases])
    return idx[store.table["has_mask"][idx].astype(bool)], None


def _config_of(d: Path) -> dict[str, Any] | None:
    if not (d / "metrics.json").is_file():
        return None
    cfg = fsutil.read_json(d / "metrics.json", "metrics").get("config")
    return cfg if isinstance(cfg, dict) else None


def _same_config(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    if a is None:
        return False
    return all(a.get(k) == b.get(k) for k in ("operator", "members", "thresholds", "gate"))


def _per_case_csv(run: Run, fold: str, best: dict[str, Any]) -> dict[str, float] | None:
    """Case Dice of the chosen configuration's lesion cases from eval/<row>/per_case.csv."""
    edir = run.path / fold / "eval"
    if not edir.is_dir():
        return None
    for d in sorted(p for p in edir.iterdir() if p.is_dir()):
        if (d / "per_case.csv").is_file() and (d.name.startswith("ensemble")
                                               or _same_config(_config_of(d), best)):
            try:
                return {r["case"]: float(r["dice"]) for r in _read_csv(d / "per_case.csv")
                        if int(r["tp"]) + int(r["fn"]) > 0}
            except (KeyError, ValueError) as exc:
                raise InputError(f"{d / 'per_case.csv'}: malformed ({exc})") from exc
    return None


def _chosen_masks(run: Run, fold: str, best: dict[str, Any], indices: np.ndarray,
                  npz: Path | None) -> np.ndarray:
    """The chosen configuration's masks at ``indices``: apply_config on the fold's maps
    (what evaluate did), or rows of eval/masks.npz when the maps are gone."""
    from ensemblecam.io.mapstore import MapSet
    from ensemblecam.stages.evaluate import apply_config

    mdir = run.path / fold / "maps"
    if all((mdir / m / "meta.json").is_file() for m in best["members"]):
        sets = [MapSet.open(mdir / m) for m in best["members"]]
        rows = [s.rows_for(indices) for s in sets]
        return apply_config([np.asarray(s.maps[r]) for s, r in zip(sets, rows, strict=True)],
                            best, [s.probs[r] for s, r in zip(sets, rows, strict=True)])
    if npz is None:
        raise InputError(f"{mdir}: no maps of {', '.join(best['members'])} and no "
                         f"{run.path / fold / 'eval' / 'masks.npz'}")
    with np.load(npz) as z:
        index = z["index"].astype(np.int64)
        pos = np.searchsorted(index, indices) if np.all(np.diff(index) > 0) else None
        if pos is None:
            pos = np.array([int(np.flatnonzero(index == i)[0]) for i in indices])
        return z["masks"][pos].astype(bool)


def _fold_case_scores(run: Run, fold: str) -> tuple[list[_CaseScore], dict[str, Any]] | None:
    """Case Dice of the fold's chosen configuration on its evaluated lesion cases."""
    store = run.store
    fdir = run.path / fold
    if store is None or store.masks is None or not (fdir / "search" / "best.json").is_file():
        return None
    best = fsutil.read_json(fdir / "search" / "best.json", "chosen configuration")
    idx, npz = _eval_indices(run, fold)
    if len(idx) == 0:
        return None
    cases = store.table["case"][idx]
    listed = _per_case_csv(run, fold, best)
    out = []
    for case in dict.fromkeys(cases.tolist()):
        sel = idx[cases == case]
        if listed is not None:
            if case in listed:
                out.append(_CaseScore(fold, str(case), listed[case], sel))
            continue
        g = np.asarray(store.masks[sel]).astype(bool)
        if not g.any():
            continue
        p = _chosen_masks(run, fold, best, sel, npz)
        tp = int((g & p).sum())
        d = 2 * tp / (2 * tp + int((p & ~g).sum()) + int((g & ~p).sum()))
        out.append(_CaseScore(fold, str(case), d, sel))
    return out, best


def _gallery_row(run: Run, score: _CaseScore, best: dict[str, Any]) -> GalleryRow:
    from ensemblecam.io.mapstore import MapSet, dequantise
    from ensemblecam.stages.evaluate import apply_config

    store = run.store
    assert store is not None and store.masks is not None
    fdir = run.path / score.fold
    gt_all = np.asarray(store.masks[score.indices]).astype(bool)
    k = int(np.argmax(gt_all.reshape(len(gt_all), -1).sum(axis=1)))
    i = int(score.indices[k])
    all_members = (best.get("search") or {}).get("members") or best["members"]
    maps, probs = {}, {}
    for m in all_members:
        if (fdir / "maps" / m / "meta.json").is_file():
            s = MapSet.open(fdir / "maps" / m)
            r = s.rows_for(np.array([i]))
            maps[m] = np.asarray(s.maps[r])
            probs[m] = s.probs[r]
    masks: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    for op, cfg in _best_per_operator(fdir / "search").items():
        if all(m in maps for m in cfg["members"]):
            masks[op] = apply_config([maps[m] for m in cfg["members"]], cfg,
                                     [probs[m] for m in cfg["members"]])[0]
            notes[op] = _config_note(cfg)
    _, npz = _eval_indices(run, score.fold)
    masks["chosen ensemble"] = _chosen_masks(run, score.fold, best, np.array([i]), npz)[0]
    notes["chosen ensemble"] = f"{best.get('operator')}:\n{_config_note(best)}"
    return GalleryRow(
        title=f"{score.case} s{int(store.table['slice'][i])}\n{score.fold}, "
              f"case Dice {100 * score.dice:.1f}",
        image=np.asarray(store.images[i, 0], np.float32), gt=gt_all[k],
        maps={m: dequantise(v[0]) for m, v in maps.items()}, masks=masks, notes=notes)


def _config_note(cfg: dict[str, Any]) -> str:
    """One line per member, 'resnet18__gradcam > 0.7' (+ gate), for a gallery cell."""
    lines = [f"{m} > {float(t):g}" for m, t in
             zip(cfg.get("members", []), cfg.get("thresholds", []), strict=False)]
    if cfg.get("gate") is not None:
        lines.append(f"gate {float(cfg['gate']):g}")
    return "\n".join(lines)


def _section_gallery(rep: _Report, run: Run, folds: list[str], n_cases: int) -> None:
    rep.h2("gallery", "Gallery (the paper's Fig. 3)")
    scores: list[_CaseScore] = []
    bests: dict[str, dict[str, Any]] = {}
    for fold in folds:
        got = _fold_case_scores(run, fold)
        if got is None:
            continue
        scores += got[0]
        bests[fold] = got[1]
    if not scores:
        rep.p("No evaluated lesion case found (needs the store with masks, "
              "fold*/search/best.json and fold*/maps or fold*/eval/masks.npz).", "note")
        return
    order = sorted(scores, key=lambda s: (-s.dice, s.fold, s.case))
    n_best = min(n_cases, math.ceil(len(order) / 2))
    best_cases = order[:n_best]
    worst_cases = [s for s in order[::-1][:n_cases] if s not in best_cases]
    rep.p(f"{len(order)} evaluated lesion cases ranked by the case Dice of their fold's "
          "chosen configuration; each case is shown at its slice with the largest lesion. "
          "Columns: image (first channel), ground truth (green), each member's map (jet, "
          "0 to 1), then in red each operator's best configuration in that case's fold "
          "(chosen on the calibration part) and the fold's chosen ensemble; yellow line: "
          "ground truth. Under each mask: its members and thresholds, which differ per "
          "fold. Row label: case, slice, fold and the case Dice (all evaluated slices of "
          "the case, chosen ensemble).")
    rep.p("Chosen ensemble per fold: " + "; ".join(
        f"{f}: {_describe_config(b)}" for f, b in bests.items()) + ".")
    for label, sel in (("best", best_cases), ("worst", worst_cases)):
        if not sel:
            continue
        rows = [_gallery_row(run, s, bests[s.fold]) for s in sel]
        cases = ", ".join(f"{s.case} ({s.fold}, case Dice {100 * s.dice:.1f})" for s in sel)
        rep.figure(f"gallery_{label}.png", gallery_figure(rows, f"{label} cases"),
                   f"{label.capitalize()} {len(rows)} case(s) by case Dice: {cases}")


# --------------------------------------------------------------------------- assembly

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #4c72b0}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f3f8}tbody tr:nth-child(even){background:#fafafa}
table{display:block;overflow-x:auto;max-width:100%}
tr.mean td{font-weight:bold;border-bottom:2px solid #999}
table.headline td,table.headline th{font-size:1.05em;padding:.3em .8em}
table.facts td:first-child{font-weight:bold;white-space:nowrap}
table.timings td:last-child{text-align:right}
details{margin:.6em 0}summary{cursor:pointer;font-weight:bold}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}
figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.8em;color:#555;max-width:600px}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em .8em}
.grid{display:flex;flex-wrap:wrap;align-items:flex-start;gap:.2em}
.fold{display:flex;flex-direction:column;align-items:center}
.fold figure{margin:.2em}
dt{font-weight:bold;margin-top:.4em}
nav{position:sticky;top:0;background:#fff;padding:.3em 0;border-bottom:1px solid #eee}
nav a{margin-right:1em}
"""


#: Section anchors and titles, in the report's order.
SECTIONS = (("summary", "Summary"), ("results", "Results"), ("thresholds", "Thresholds"),
            ("gallery", "Gallery"), ("classifiers", "Classifiers"), ("data", "Data"),
            ("configuration", "Configuration"))


def write_report(
    run_dir: str | Path, out: str | Path | None = None, force: bool = False,
    n_cases: int = 3,
) -> Path:
    """Write the run's HTML report (default ``<run>/report/report.html``) and its PNGs.

    The PNGs go beside the HTML; the HTML is written last and atomically. An existing
    report is an InputError unless ``force``. ``n_cases``: best and worst gallery cases.
    """
    run = open_run(run_dir)
    target = Path(out) if out is not None else run.path / REPORT_DIR / REPORT_FILE
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give the report's file name")
    if target.exists() and not force:
        raise InputError(f"{target}: report exists; use --force to replace it")
    if n_cases < 1:
        raise InputError(f"gallery cases {n_cases}: must be >= 1")
    target.parent.mkdir(parents=True, exist_ok=True)
    folds = _fold_names(run)
    rep = _Report(target.parent)
    title = f"ensemblecam report: {run.path.resolve().name}"
    rep.add(f"<h1>{_e(title)}</h1>\n")
    rep.add("<nav>" + "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in SECTIONS) + "</nav>\n")
    _section_summary(rep, run, folds)
    _section_results(rep, run, folds)
    _section_case_statistics(rep, run)
    _section_heatmaps(rep, run, folds)
    _section_gallery(rep, run, folds, n_cases)
    _section_classifiers(rep, run, folds)
    _section_data(rep, run)
    _section_config(rep, run)
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
           + "".join(rep.parts) + "</body></html>\n")
    fsutil.write_text(target, doc)
    return target
