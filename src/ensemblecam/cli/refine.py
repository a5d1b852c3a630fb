"""``ensemblecam refine``."""

from __future__ import annotations

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption
from ensemblecam.cli.options import config_command
from ensemblecam.config import RefineConfig
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import REFINE_FILE


@config_command(app, "refine", renames={"config_file": "--best"})
def refine_cmd(cfg: RefineConfig, force: ForceOption = False) -> None:
    """Three-class pseudo-labels (1 lesion, 0 background, 255 ignore) of a fold's training
    part from the chosen ensemble (best.json), its members' maps, the images and the slice
    labels; the refiner that scores best against the part's masks is kept (without masks:
    --fallback). Writes masks.npz (what `ensemblecam unet --targets` trains on) and
    refine.json."""
    from ensemblecam.stages.refine import refine_stage

    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.maps, cfg.config_file]):
        out = refine_stage(cfg, force=force)
    rec = fsutil.read_json(out / REFINE_FILE, "refine record")
    quality = rec["candidates"][rec["chosen"]]["train_quality"]
    score = "" if quality is None else f", train-part lesion Dice {quality['lesion_dice']:.4f}"
    typer.echo(f"refiner {rec['chosen']} (criterion {rec['criterion']}){score} -> {out}")
