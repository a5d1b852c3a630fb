"""``ensemblecam train``: a slice classifier on one fold of a store (stages.train)."""

from __future__ import annotations

import typer

from ensemblecam.cli import app
from ensemblecam.cli.options import config_command
from ensemblecam.config import TrainConfig
from ensemblecam.io import fsutil


@config_command(app, "train")
def train_command(cfg: TrainConfig) -> None:
    """Train a slice classifier; writes best.pt, last.pt, metrics.csv, plots and train.json."""
    from ensemblecam.stages.train import train_classifier

    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.weights]):
        result = train_classifier(cfg)
    if result is not None:
        typer.echo(f"trained {cfg.model} on {cfg.fold}: {result}")
