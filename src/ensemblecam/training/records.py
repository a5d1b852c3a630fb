"""Training records: the per-epoch ``metrics.csv``, TensorBoard scalars and the figures
(learning curve, confusion matrix), all written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.io import fsutil


def write_metrics_csv(path: Path, history: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write the per-epoch history (``columns``; missing values as empty cells) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    fsutil.write_text(path, buf.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Read a metrics.csv history back (all values as floats)."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_tensorboard(folder: Path, history: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Write ``keys`` of the history as TensorBoard scalars in ``folder/tensorboard`` when
    tensorboard is installed (else nothing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = SummaryWriter(str(folder / "tensorboard"))
    for row in history:
        for key in keys:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.close()


def _save_figure(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")


def robust_limits(
    series: Sequence[Sequence[float]], pad: float = 0.05
) -> tuple[float, float] | None:
    """y-limits of per-epoch curves that an epoch-1 spike does not flatten.

    ``[lo, hi]`` = range of the finite values from epoch 2 on (all epochs when a series has
    fewer than 3: two points cannot tell a spike from a decrease); an epoch-1 value joins
    the range when it lies within one range width of it (``lo - w <= v <= hi + w``,
    ``w = hi - lo``), so an ordinary first epoch stays on the plot and only a spike is
    left off; then ``pad`` of the width is added on each side (a
    flat range uses its magnitude, or 1, as width). None without finite values.
    """

    def finite(values: Sequence[float]) -> list[float]:
        return [float(v) for v in values if np.isfinite(v)]

    later = [v for s in series for v in finite(s[1:] if len(s) > 2 else s)]
    if not later:
        later = [v for s in series for v in finite(s)]
        if not later:
            return None
    lo, hi = min(later), max(later)
    w = hi - lo
    firsts = [v for s in series if len(s) > 2 for v in finite(s[:1])]
    near = [v for v in firsts if lo - w <= v <= hi + w]
    lo, hi = min([lo, *near]), max([hi, *near])
    width = hi - lo if hi > lo else (abs(hi) or 1.0)
    return lo - pad * width, hi + pad * width


def plot_learning_curve(
    path: Path,
    history: list[dict[str, Any]],
    best_epoch: int,
    scores: Sequence[tuple[str, str]] = (("auroc", "val AUROC"), ("f1", "val F1")),
) -> None:
    """Train/val loss (left) and validation ``scores`` (key, label) (right) per epoch; the
    best epoch marked; integer epoch ticks. The loss axis has :func:`robust_limits`: a loss
    off that scale (an epoch-1 spike) is drawn at the edge with its value written beside it.
    Without validation (no ``val_loss``) the right panel says so."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ep = [int(r["epoch"]) for r in history]
    validated = all(r.get("val_loss") not in (None, "") for r in history)
    losses = [("train loss", [float(r["train_loss"]) for r in history])]
    if validated:
        losses.append(("val loss", [float(r["val_loss"]) for r in history]))
    with matplotlib.rc_context({"font.size": 11}):
        fig = Figure(figsize=(8, 3.2))
        ax1, ax2 = fig.subplots(1, 2)
        limits = robust_limits([v for _, v in losses])
        for label, values in losses:
            (line,) = ax1.plot(ep, values, "o-", label=label)
            if limits is None:
                continue
            for e, v in zip(ep, values, strict=True):
                if np.isfinite(v) and not limits[0] <= v <= limits[1]:
                    edge = limits[1] if v > limits[1] else limits[0]
                    marker = "^" if v > limits[1] else "v"
                    ax1.plot([e], [edge], marker, color=line.get_color(), clip_on=False)
                    ax1.annotate(
                        f"{v:.3g}", (e, edge), textcoords="offset points", xytext=(6, -12),
                        fontsize=9, color=line.get_color(),
                    )  # fmt: skip
        if limits is not None:
            ax1.set_ylim(*limits)
        if validated:
            for key, label in scores:
                ax2.plot(ep, [r[key] for r in history], "o-", label=label)
        else:
            ax2.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax2.transAxes)
        for ax in (ax1, ax2):
            ax.axvline(best_epoch, color="grey", ls="--", lw=1)
            ax.set_xlabel("epoch")
            if len(ep) <= 12:  # every epoch a tick (also a run of one epoch)
                ax.set_xticks(ep)
                ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=9)
        ax1.set_title("loss", fontsize=11)
        ax2.set_title("validation", fontsize=11)
        ax2.set_ylim(0, 1.02)
        fig.tight_layout()
        _save_figure(fig, path)


def plot_confusion(path: Path, confusion: list[list[int]], title: str) -> None:
    """Confusion matrix [[tn, fp], [fn, tp]] as an annotated 2x2 image."""
    from matplotlib.figure import Figure

    cm = np.asarray(confusion)
    fig = Figure(figsize=(3.6, 3.2))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black")  # fmt: skip
    ax.set_xticks([0, 1], ["no lesion", "lesion"])
    ax.set_yticks([0, 1], ["no lesion", "lesion"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    _save_figure(fig, path)
