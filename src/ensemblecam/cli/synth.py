"""``ensemblecam synth``: procedural phantom data in a real data set's on-disk layout."""

from __future__ import annotations

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption
from ensemblecam.cli.options import config_command
from ensemblecam.config import SynthConfig
from ensemblecam.io import fsutil


@config_command(app, "synth")
def synth_cmd(cfg: SynthConfig, force: ForceOption = False) -> None:
    """Write a phantom data set (BraTS 2020, MSD prostate or KiTS21 layout) from a seed."""
    from ensemblecam.synth import synth_dataset

    with fsutil.output_guard(cfg.out):
        path = synth_dataset(cfg, force=force)
    typer.echo(
        f"wrote {cfg.n_cases} {cfg.layout} phantom cases "
        f"({'x'.join(map(str, cfg.shape))}) to {path}"
    )
