"""``ensemblecam synth``: procedural phantom data in a real data set's on-disk layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ConfigOption, ForceOption, one_line_errors, split_csv
from ensemblecam.config import section
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil

Opt = typer.Option


@app.command("synth")
@one_line_errors
def synth_cmd(
    layout: Annotated[str | None, Opt(help="brats (default) | msd | kits.")] = None,
    out: Annotated[Path | None, Opt(help="Output folder (default ./phantom).")] = None,
    n_cases: Annotated[int | None, Opt("--n-cases", help="Number of cases (default 40).")] = None,
    shape: Annotated[str | None, Opt(help="Volume shape x,y,z (default 96,96,64).")] = None,
    seed: Annotated[int | None, Opt(help="Random seed: same seed, same data (default 0).")] = None,
    tumour_free_fraction: Annotated[
        float | None, Opt(help="Share of cases without any lesion (default 0.15).")
    ] = None,
    workers: Annotated[int | None, Opt(help="Parallel processes (default 2).")] = None,
    config: ConfigOption = None,
    force: ForceOption = False,
) -> None:
    """Write a phantom data set (BraTS 2020, MSD prostate or KiTS21 layout) from a seed."""
    from ensemblecam.synth import synth_dataset

    dims = split_csv(shape, int)
    if dims is not None and len(dims) != 3:
        raise InputError(f"--shape {shape!r}: expected three sizes x,y,z")
    cfg = section(config, "synth", layout=layout, out=out, n_cases=n_cases,
                  shape=tuple(dims) if dims else None, seed=seed,
                  tumour_free_fraction=tumour_free_fraction, workers=workers)
    with fsutil.output_guard(cfg.out):
        path = synth_dataset(cfg, force=force)
    typer.echo(f"wrote {cfg.n_cases} {cfg.layout} phantom cases "
               f"({'x'.join(map(str, cfg.shape))}) to {path}")
