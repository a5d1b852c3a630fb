"""``ensemblecam mil``: the MIL localiser on one fold, then its maps as a map-store member."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption, int_or_str
from ensemblecam.cli.options import config_command
from ensemblecam.config import MilConfig

Opt = typer.Option


@config_command(app, "mil")
def mil_command(
    cfg: MilConfig,
    store: Annotated[Path, Opt("--store", help="Slice store folder.")] = Path("store"),
    splits: Annotated[
        Path | None, Opt("--splits", help="Split file (default <store>/splits.json).")
    ] = None,
    fold: Annotated[str, Opt("--fold", help="Fold position or name.")] = "0",
    out: Annotated[Path, Opt("--out", help="Run output folder.")] = Path("runs/mil"),
    maps: Annotated[
        Path, Opt("--maps", help="Map store root: the member localiser__<name> is written there.")
    ] = Path("maps"),
    name: Annotated[
        str, Opt("--name", help="Localiser name (mil, then letters, digits or _; as run's).")
    ] = "mil",
    parts: Annotated[
        str, Opt("--parts", help="Split parts mapped (comma-separated, or all).")
    ] = "train,val,test",
    force: ForceOption = False,
) -> None:
    """Train a localiser from the slice labels alone (multiple-instance loss, or with
    --objective denoise a denoising autoencoder of the lesion-free slices; no mask is read)
    on a fold's training part, and write its maps for --parts as the map-store member
    localiser__<name>, which `ensemblecam search --members` can combine with CAM members."""
    from ensemblecam.config import check_localiser_name
    from ensemblecam.errors import InputError
    from ensemblecam.io import fsutil
    from ensemblecam.io.mapstore import localiser_member
    from ensemblecam.io.store import SliceStore
    from ensemblecam.stages.cam import split_indices
    from ensemblecam.stages.mil import write_mil_maps
    from ensemblecam.stages.unet import train_unet

    try:
        check_localiser_name(name)
    except ValueError as exc:
        raise InputError(f"--name: {exc}") from None
    fold_key = int_or_str(fold)
    assert fold_key is not None
    if cfg.epochs is None:
        cfg = cfg.model_copy(update={"epochs": 30})
    member = maps / localiser_member(name)
    with fsutil.output_guard(out, [store, splits]):
        result = train_unet(cfg, store, splits, fold_key, out, "labels", force=force)
    if result is None:
        return
    opened = SliceStore.open(store)
    idx = split_indices(opened, splits, fold_key, parts.split(","))
    train = split_indices(opened, splits, fold_key, ["train"])
    with fsutil.output_guard(member, [store, splits, out]):
        write_mil_maps(cfg, result / "best.pt", store, idx, member, force, scale_from=train)
    typer.echo(f"trained the MIL localiser on {fold} ({len(idx)} slices mapped): {member}")
