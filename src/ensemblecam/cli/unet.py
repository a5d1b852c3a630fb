"""``ensemblecam unet``: supervised U-Net on one fold, then scored on a part (stages.unet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption, int_or_str
from ensemblecam.cli.options import config_command
from ensemblecam.config import UNetConfig

Opt = typer.Option


@config_command(app, "unet")
def unet_command(
    cfg: UNetConfig,
    store: Annotated[Path, Opt("--store", help="Slice store folder.")] = Path("store"),
    splits: Annotated[
        Path | None, Opt("--splits", help="Split file (default <store>/splits.json).")
    ] = None,
    fold: Annotated[str, Opt("--fold", help="Fold position or name.")] = "0",
    targets: Annotated[
        str, Opt("--targets", help="'store' (ground-truth masks) or a pseudo-label masks.npz.")
    ] = "store",
    out: Annotated[Path, Opt("--out", help="Run output folder.")] = Path("runs/unet"),
    part: Annotated[
        str, Opt("--part", help="Split part scored with the store's masks after training.")
    ] = "test",
    metrics_out: Annotated[
        Path | None, Opt("--metrics-out", help="Also write the scores of --part as JSON here.")
    ] = None,
    force: ForceOption = False,
) -> None:
    """Train a MONAI U-Net on a fold's training part and score it on --part."""
    import numpy as np

    from ensemblecam.io import fsutil
    from ensemblecam.io.split import get_fold
    from ensemblecam.io.store import SliceStore
    from ensemblecam.metrics.conventions import score, slice_counts
    from ensemblecam.stages.unet import predict_unet, train_unet

    fold_key = int_or_str(fold)
    assert fold_key is not None
    inputs = [store, splits, None if targets == "store" else targets]
    if metrics_out is not None:
        fsutil.check_not_input(metrics_out, [*inputs, out])
    with fsutil.output_guard(out, inputs):
        result = train_unet(cfg, store, splits, fold_key, out, targets, force=force)
    if result is None:
        return
    typer.echo(f"trained U-Net on {fold} ({targets}): {result}")
    st = SliceStore.open(store)
    if st.masks is None:
        typer.echo("store has no masks: nothing to score")
        return
    f = get_fold(splits if splits is not None else store / "splits.json", fold_key)
    idx = st.indices_for_cases(f.part(part))
    if len(idx) == 0:
        typer.echo(f"{f.name} has no {part} slices: nothing to score")
        return
    pred = predict_unet(result / "best.pt", st, idx, batch_size=cfg.batch_size)
    counts = slice_counts(pred, np.asarray(st.masks[idx]) > 0)
    res = score(*counts, st.table["case"][idx])
    typer.echo(
        f"{f.name} {part}: lesion_dice {res['lesion_dice']:.4f} paper_miou "
        f"{res['paper_miou']:.4f} case_dice {res['case_dice_mean']:.4f} ({len(idx)} slices)"
    )
    if metrics_out is not None:
        fsutil.write_json(metrics_out, {"fold": f.name, "part": part, "run": str(result),
                                        "metrics": res})  # fmt: skip
