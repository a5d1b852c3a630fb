"""``ensemblecam prepare`` (volumes -> slice store) and ``ensemblecam split``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ensemblecam.cli import app
from ensemblecam.cli._common import (
    ConfigOption,
    ForceOption,
    check_output,
    one_line_errors,
    split_csv,
)
from ensemblecam.config import section
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil


def _pair(value: str | None, cast: type, n: int, what: str) -> tuple | None:
    items = split_csv(value, cast)
    if items is not None and len(items) != n:
        raise InputError(f"{what} {value!r}: expected {n} comma-separated values")
    return tuple(items) if items is not None else None


@app.command("prepare")
@one_line_errors
def prepare_command(
    data: Annotated[Path | None, typer.Option("--data", help="Data set root folder.")] = None,
    layout: Annotated[
        str | None, typer.Option("--layout", help="brats | msd | kits | folder (default brats).")
    ] = None,
    labels_csv: Annotated[
        Path | None,
        typer.Option("--labels-csv", help="CSV case,slice,label of image-level labels for "
                     "data without masks (slice = index along the canonical slice axis)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Slice store folder to write.")] = None,
    masks: Annotated[
        bool | None,
        typer.Option("--masks/--no-masks", help="Read seg files (default); --no-masks: "
                     "unlabelled scans, slice labels unknown (-1)."),
    ] = None,
    modalities: Annotated[
        str | None,
        typer.Option("--modalities", help="Channels in order, e.g. flair,t1ce,t2 (default per "
                     "layout: brats flair,t1ce,t2; msd adc; kits ct; folder all found)."),
    ] = None,
    axis: Annotated[
        int | None, typer.Option("--axis", help="Slice axis of the RAS+ canonical volume "
                                 "(2 = axial, default).")
    ] = None,
    normalise: Annotated[
        str | None,
        typer.Option("--normalise", help="minmax_slice (paper, default) | zscore_volume | "
                     "percentile."),
    ] = None,
    percentiles: Annotated[
        str | None, typer.Option("--percentiles", help="low,high for percentile (0.5,99.5).")
    ] = None,
    crop: Annotated[
        str | None, typer.Option("--crop", help="none (default) | fixed | bbox | kidney.")
    ] = None,
    crop_box: Annotated[
        str | None, typer.Option("--crop-box", help="Fixed crop y0,y1,x0,x1 (paper: "
                                 "56,184,56,184); may reach outside the slice (zero padding).")
    ] = None,
    crop_size: Annotated[
        str | None, typer.Option("--crop-size", help="h,w window of bbox (default: largest "
                                 "bbox, multiple of 8) and kidney (default 150,150) crops.")
    ] = None,
    slice_range: Annotated[
        str | None, typer.Option("--slice-range", help="first,last slice kept, inclusive "
                                 "(paper: 13,140).")
    ] = None,
    every_nth: Annotated[
        int | None, typer.Option("--every-nth", help="Keep every n-th slice (thesis: 5).")
    ] = None,
    lesion_labels: Annotated[
        str | None, typer.Option("--lesion-labels", help="Seg labels merged into the lesion "
                                 "(default brats 1,2,4; msd 1,2; kits 2,3; folder any non-zero).")
    ] = None,
    min_lesion_fraction: Annotated[
        float | None, typer.Option("--min-lesion-fraction", help="Slice label 1 only if lesion "
                                   "pixels / crop pixels exceed this (default 0).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float16 (default) | float32.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Parallel processes (default 2).")
    ] = None,
    nonfinite: Annotated[
        str | None, typer.Option("--nonfinite", help="NaN/Inf voxels: error (default) | "
                                 "replace (by the volume's finite minimum; count printed).")
    ] = None,
    config: ConfigOption = None,
    force: ForceOption = False,
) -> None:
    """Volumes -> 2-D slices in a slice store (resumes an interrupted run)."""
    from ensemblecam.stages.prepare import prepare_store

    cfg = section(
        config, "prepare", data=data, layout=layout, labels_csv=labels_csv, out=out,
        masks=masks,
        modalities=split_csv(modalities), axis=axis, normalise=normalise,
        percentiles=_pair(percentiles, float, 2, "--percentiles"), crop=crop,
        crop_box=_pair(crop_box, int, 4, "--crop-box"),
        crop_size=_pair(crop_size, int, 2, "--crop-size"),
        slice_range=_pair(slice_range, int, 2, "--slice-range"), every_nth=every_nth,
        lesion_labels=split_csv(lesion_labels, int), min_lesion_fraction=min_lesion_fraction,
        dtype=dtype, workers=workers, nonfinite=nonfinite,
    )
    check_output(cfg.out)
    with fsutil.output_guard(cfg.out, [cfg.data, cfg.labels_csv]):
        path = prepare_store(cfg, force=force)
    from ensemblecam.io.store import SliceStore

    store = SliceStore.open(path)
    n_pos = int(store.labels.sum())
    print(f"wrote {path}: {len(store.case_names)} cases, {store.n_slices} slices "
          f"({n_pos} positive), channels {','.join(store.channels)}, size "
          f"{store.size[0]}x{store.size[1]}")


@app.command("split")
@one_line_errors
def split_command(
    store: Annotated[Path | None, typer.Option("--store", help="Slice store to split.")] = None,
    scheme: Annotated[
        str | None, typer.Option("--scheme", help="kfold (default) | holdout | list.")
    ] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="k of k-fold (default 3).")] = None,
    fractions: Annotated[
        str | None, typer.Option("--fractions", help="Holdout train,val,test (0.6,0.2,0.2).")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="k-fold: share of the non-test "
                                   "cases used for validation (default 0.2; 0 = none).")
    ] = None,
    list_file: Annotated[
        Path | None, typer.Option("--list-file", help="User split for --scheme list: JSON "
                                  "{train,val,test} (or a list of them) or CSV case,part[,fold].")
    ] = None,
    stratify: Annotated[
        bool | None, typer.Option("--stratify/--no-stratify", help="Stratify by lesion "
                                  "presence per case (default on).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Shuffle seed (default 0).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Split file (default <store>/splits.json).")
    ] = None,
    config: ConfigOption = None,
    force: ForceOption = False,
) -> None:
    """Patient-level splits (k-fold, holdout or a user list) written as a JSON file."""
    from ensemblecam.io.split import make_splits, split_summary
    from ensemblecam.io.store import SliceStore

    cfg = section(
        config, "split", store=store, scheme=scheme, folds=folds,
        fractions=_pair(fractions, float, 3, "--fractions"), val_fraction=val_fraction,
        list_file=list_file, stratify=stratify, seed=seed, out=out,
    )
    check_output(cfg.out if cfg.out is not None else cfg.store / "splits.json", folder=False)
    target, result = make_splits(cfg, force=force)
    rows = split_summary(SliceStore.open(cfg.store), result)
    table = Table(title=f"{target} ({cfg.scheme}, seed {cfg.seed})")
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("fold", "part") else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
