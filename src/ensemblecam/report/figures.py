"""Figures of the report: plain functions on arrays (matplotlib ``Figure`` + Agg canvas,
no pyplot state), each returning PNG bytes."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemblecam.errors import InputError


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
        raise InputError(
            f"threshold grid of {operator}: shape {v.shape} does not fit {t.size} thresholds"
        )
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
            ax.text(
                j,
                i,
                "-" if not np.isfinite(x) else f"{x * 100:.1f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if light else "black",
            )
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
    ax.set_xlim(*bar_limits(m + s))
    return figure_png(fig)


def bar_limits(ends: np.ndarray) -> tuple[float, float]:
    """x-range (%) of the results bar chart: from 0 (a bar's length is its value, so no
    row looks like a fraction of another it nearly equals) to 5 past the longest bar end
    (mean + std), at most 100."""
    finite = np.asarray(ends, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 0.0
    return 0.0, min(100.0, max(top + 5.0, 5.0))


def case_box_plot(
    names: Sequence[str], values: Sequence[Sequence[float]], label: str, seed: int = 0
) -> bytes:
    """Per-case values of one metric per result row: a horizontal box (median, quartiles,
    whiskers at 1.5 IQR) with every case as a jittered dot (seeded); non-finite values are
    left out and the number of cases shown is given per row."""
    import inspect

    from matplotlib.figure import Figure

    vals = [np.asarray(v, dtype=np.float64) for v in values]
    vals = [v[np.isfinite(v)] for v in vals]
    fig = Figure(figsize=(10, 1.0 + 0.45 * max(len(names), 1)))
    ax = fig.subplots()
    pos = np.arange(1, len(names) + 1)
    horizontal = (
        {"orientation": "horizontal"}
        if "orientation" in inspect.signature(ax.boxplot).parameters
        else {"vert": False}
    )
    ax.boxplot(
        [v if v.size else [np.nan] for v in vals],
        positions=pos,
        widths=0.6,
        showfliers=False,
        **horizontal,
    )
    rng = np.random.default_rng(seed)
    for p, v in zip(pos, vals, strict=True):
        ax.scatter(
            v, p + rng.uniform(-0.18, 0.18, v.size), s=9, alpha=0.6, color="#4c72b0", zorder=3
        )
    ax.set_yticks(
        pos,
        [
            f"{n if len(n) <= 60 else n[:57] + '...'} (n={v.size})"
            for n, v in zip(names, vals, strict=True)
        ],
        fontsize=11,
    )
    ax.tick_params(axis="x", labelsize=11)
    ax.invert_yaxis()
    ax.set_xlabel(label, fontsize=11)
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


def gallery_cell(
    image: np.ndarray,
    gt: np.ndarray,
    overlay: np.ndarray | None = None,
    kind: str = "image",
) -> np.ndarray:
    """RGB (float, [0, 1]) of one gallery cell: the image in gray (1st-99th percentile to
    [0, 1]), then by ``kind``: "gt" the ground truth in lime at alpha 0.5; "map" the map
    ``overlay`` (in [0, 1]) in jet at alpha 0.5; "mask" the mask ``overlay`` in red at alpha
    0.5; for maps and masks the ground truth's outline (its pixels with a 4-neighbour
    outside it) in yellow. ``rgb = 0.5 gray + 0.5 colour`` where a colour is laid."""
    from matplotlib import colormaps
    from scipy.ndimage import binary_erosion

    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    gray = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    gt = np.asarray(gt, dtype=bool)
    if kind == "gt":
        rgb[gt] = 0.5 * rgb[gt] + 0.5 * np.array([0.0, 1.0, 0.0])
    elif kind == "map" and overlay is not None:
        colour = colormaps["jet"](np.clip(np.asarray(overlay, np.float32), 0, 1))[..., :3]
        rgb = 0.5 * rgb + 0.5 * colour
    elif kind == "mask" and overlay is not None:
        mk = np.asarray(overlay, dtype=bool)
        rgb[mk] = 0.5 * rgb[mk] + 0.5 * np.array([1.0, 0.0, 0.0])
    if kind in ("map", "mask") and gt.any() and not gt.all():
        rgb[gt & ~binary_erosion(gt, border_value=1)] = (1.0, 1.0, 0.0)
    return rgb


def gallery_figure(rows: Sequence[GalleryRow], title: str = "") -> bytes:
    """The paper's Fig. 3: image | ground truth | member maps | masks, one row per slice.

    Maps are drawn as a jet heatmap in [0, 1] over the image; masks in red over the image
    with the ground-truth outline in yellow (:func:`gallery_cell`). Columns are the union
    over rows (a missing entry stays blank); ``notes`` (e.g. thresholds) are printed under
    their cell. The cells form one mosaic image, drawn once (one axes for the whole grid).
    """
    from matplotlib.figure import Figure

    if not rows:
        raise InputError("gallery: no slice to show")
    map_cols = list(dict.fromkeys(k for r in rows for k in r.maps))
    mask_cols = list(dict.fromkeys(k for r in rows for k in r.masks))
    cols = ["image", "ground truth", *map_cols, *mask_cols]
    size = 1.7  # inches per cell
    # notes wrapped to the cell's width (7 pt text: about 0.6 x 7 pt per character)
    width = int(size * 72 / (0.6 * 7))
    notes = [
        {c: "\n".join(textwrap.fill(ln, width) for ln in n.split("\n")) for c, n in r.notes.items()}
        for r in rows
    ]
    note_lines = max((n.count("\n") + 1 for ns in notes for n in ns.values()), default=0)
    h = max(np.shape(r.image)[0] for r in rows)
    w = max(np.shape(r.image)[1] for r in rows)
    per_inch = max(h, w) / size  # mosaic pixels per inch
    col_gap = max(1, round(0.05 * w))
    row_gap = round((0.15 * note_lines + 0.2) * per_inch)  # room for the notes
    pitch_x, pitch_y = w + col_gap, h + row_gap
    mosaic = np.ones((pitch_y * len(rows) - row_gap, pitch_x * len(cols) - col_gap, 3))
    fig = Figure(figsize=(mosaic.shape[1] / per_inch, mosaic.shape[0] / per_inch))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    for i, row in enumerate(rows):
        cells: dict[str, np.ndarray] = {
            "image": gallery_cell(row.image, row.gt),
            "ground truth": gallery_cell(row.image, row.gt, kind="gt"),
            **{c: gallery_cell(row.image, row.gt, m, "map") for c, m in row.maps.items()},
            **{c: gallery_cell(row.image, row.gt, m, "mask") for c, m in row.masks.items()},
        }
        top = i * pitch_y
        for j, col in enumerate(cols):
            left = j * pitch_x
            if col in cells:
                cell = cells[col]
                mosaic[top : top + cell.shape[0], left : left + cell.shape[1]] = cell
            if i == 0:
                name = col if len(col) <= 24 else col[:22] + ".."
                ax.text(left + w / 2, -0.04 * h, name, ha="center", va="bottom", fontsize=8.5)
            if col in notes[i]:
                ax.text(left + w / 2, top + h + 0.04 * h, notes[i][col], ha="center", va="top",
                        fontsize=7)  # fmt: skip
        ax.text(-0.04 * w, top + h / 2, row.title, ha="right", va="center", rotation=90,
                fontsize=8)  # fmt: skip
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9, pad=24)  # above the column titles
    return figure_png(fig)
