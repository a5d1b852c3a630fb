"""``ensemblecam score``: score a folder of NIfTI masks against a data set's ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption, one_line_errors, split_csv
from ensemblecam.config import EvaluateConfig
from ensemblecam.metrics import BRATS_DILATION, BRATS_FP_HD95, BRATS_MIN_VOLUME


@app.command("score")
@one_line_errors
def score_command(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of <case>.nii.gz masks.")],
    data: Annotated[Path, typer.Option("--data", help="Data set root (ground truth).")],
    layout: Annotated[str, typer.Option("--layout", help="brats | msd | kits | folder.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default <pred>_score).")
    ] = None,
    lesion_labels: Annotated[
        str | None,
        typer.Option(
            "--lesion-labels",
            help="Seg labels of the lesion, e.g. 1,2,4 (default per layout; folder: any non-zero).",
        ),
    ] = None,
    cases: Annotated[
        str | None, typer.Option("--cases", help="Score only these cases (comma-separated).")
    ] = None,
    nsd_tolerance: Annotated[
        float, typer.Option("--nsd-tolerance", help="NSD tolerance in mm.")
    ] = EvaluateConfig.model_fields["nsd_tolerance_mm"].default,
    dilation: Annotated[
        int, typer.Option("--dilation", help="Lesion-wise: reference dilations (BraTS 3).")
    ] = BRATS_DILATION,
    min_lesion_volume: Annotated[
        float,
        typer.Option(
            "--min-lesion-volume", help="Lesion-wise: reference lesions <= this (mm^3) dropped."
        ),
    ] = BRATS_MIN_VOLUME,
    fp_hd95: Annotated[
        float,
        typer.Option(
            "--fp-hd95", help="Lesion-wise HD95 of a missed or false positive lesion (mm)."
        ),
    ] = BRATS_FP_HD95,
    connectivity: Annotated[
        int, typer.Option("--connectivity", help="Lesion components: 6, 18 or 26.")
    ] = 26,
    axis: Annotated[
        int, typer.Option("--axis", help="Slice axis of the RAS+ volume (slice conventions).")
    ] = 2,
    force: ForceOption = False,
) -> None:
    """Score any folder of NIfTI masks (ours or another tool's) in every convention;
    writes per_case.csv, per_label.csv (the share of each seg label marked) and
    summary.json."""
    from ensemblecam.stages.score import score_folder

    summary = score_folder(
        pred,
        data,
        layout,
        out,
        lesion_labels=split_csv(lesion_labels, int),
        cases=split_csv(cases),
        nsd_tolerance_mm=nsd_tolerance,
        dilation=dilation,
        min_lesion_volume=min_lesion_volume,
        fp_hd95=fp_hd95,
        connectivity=connectivity,
        axis=axis,
        force=force,
    )
    m = summary["metrics"]

    def f(k: str) -> str:
        v = m[k]["mean"]
        return "-" if v is None else f"{v:.4f}"

    where = out if out is not None else pred.with_name(pred.name + "_score")
    typer.echo(
        f"{len(summary['cases'])} cases: dice {f('dice')}, nsd {f('nsd')}, hd95 "
        f"{f('hd95_mm')} mm, lesion-wise dice {f('lesionwise_dice')}, lesion-wise "
        f"hd95 {f('lesionwise_hd95_mm')} mm -> {where}"
    )
    typer.echo(
        "share of each seg label marked: "
        + ", ".join(
            f"{v}{' (lesion)' if p['lesion'] else ''} {p['marked']} of {p['voxels']} "
            f"({100 * p['share']:.1f}%)"
            for v, p in summary["labels"].items()
        )
    )
