"""``ensemblecam cam`` and ``ensemblecam sanity`` (see ensemblecam.stages.cam / .sanity)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import int_or_str, json_object, one_line_errors
from ensemblecam.cli.options import config_command
from ensemblecam.config import CamConfig
from ensemblecam.io import fsutil

Opt = typer.Option


@config_command(app, "cam")
def cam_command(cfg: CamConfig) -> None:
    """CAM maps of every slice of a split, one map-store member per (checkpoint, method)."""
    from ensemblecam.stages.cam import run_cam

    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, *cfg.checkpoints], replaces=False):
        result = run_cam(cfg, progress=None)
    if result is not None:
        for path in result["members"]:
            print(path)


@app.command("sanity")
@one_line_errors
def sanity_command(
    store: Annotated[Path, Opt("--store", help="Slice store folder (never modified).")],
    splits: Annotated[Path | None, Opt("--splits", help="Split file.")] = None,
    fold: Annotated[str, Opt("--fold", help="Fold position or name.")] = "0",
    model: Annotated[str, Opt("--model", help="Classifier name.")] = "resnet18",
    model_args: Annotated[str | None, Opt("--model-args", help="Model arguments (JSON).")] = None,
    method: Annotated[str, Opt("--method", help="CAM method checked.")] = "gradcam",
    epochs: Annotated[int, Opt("--epochs", help="Training epochs.")] = 5,
    lr: Annotated[float | None, Opt("--lr", help="Learning rate.")] = None,
    optimizer: Annotated[str | None, Opt("--optimizer", help="sgd, adam, adamw.")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="Batch size.")] = None,
    marker_size: Annotated[int | None, Opt("--marker-size", help="Square side (px).")] = None,
    marker_value: Annotated[
        str,
        Opt(
            "--marker-value",
            help="Square intensity: a number, or 'auto' = per slice and channel the store's "
            "max if the covered corner is darker than mid-range, else its min.",
        ),
    ] = "auto",
    min_fraction: Annotated[float, Opt("--min-fraction", help="Pass threshold.")] = 0.9,
    work: Annotated[
        Path | None, Opt("--work", help="Folder for the marked copy and the run (default: temp).")
    ] = None,
) -> None:
    """Plant a corner square in every lesion slice (on a copy), train, check CAM peaks.

    The square contrasts with the corner by default (bright on dark background)."""
    from ensemblecam.stages.sanity import parse_marker_value, run_sanity

    marker = parse_marker_value(marker_value)
    opts: dict = {"epochs": epochs}
    for key, value in (("lr", lr), ("optimizer", optimizer), ("batch_size", batch_size)):
        if value is not None:
            opts[key] = value
    if model_args is not None:
        opts["model_args"] = json_object(model_args, "--model-args")
    fold_v = int_or_str(fold)
    assert fold_v is not None
    with tempfile.TemporaryDirectory(prefix="ensemblecam-sanity-") as tmp:
        res = run_sanity(
            store, work or tmp, splits, fold_v, model, method, marker_size, marker,
            min_fraction, opts,
        )  # fmt: skip
    verdict = "PASS" if res.passed else "FAIL"
    planted = ", ".join(f"{v:g}" for v in res.marker_values)
    print(
        f"sanity {verdict}: CAM peak inside the marker for {100 * res.fraction:.1f}% of "
        f"{res.n_slices} lesion slices (need >= {100 * min_fraction:.0f}%; marker {planted})"
    )
    if not res.passed:
        sys.exit(1)
