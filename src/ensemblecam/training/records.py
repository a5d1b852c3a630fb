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


def plot_learning_curve(
    path: Path,
    history: list[dict[str, Any]],
    best_epoch: int,
    scores: Sequence[tuple[str, str]] = (("auroc", "val AUROC"), ("f1", "val F1")),
) -> None:
    """Train/val loss (left) and validation ``scores`` (key, label) (right) per epoch; the
    best epoch marked. Without validation (no ``val_loss``) the right panel says so."""
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in history]
    validated = all(r.get("val_loss") not in (None, "") for r in history)
    fig = Figure(figsize=(9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss")
    if validated:
        ax1.plot(ep, [r["val_loss"] for r in history], "o-", label="val loss")
        for key, label in scores:
            ax2.plot(ep, [r[key] for r in history], "o-", label=label)
    else:
        ax2.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax2.transAxes)
    for ax in (ax1, ax2):
        ax.axvline(best_epoch, color="grey", ls="--", lw=1)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax2.set_ylim(0, 1.02)
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
