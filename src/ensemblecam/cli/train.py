"""``ensemblecam train``: a slice classifier on one fold of a store (stages.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import (
    AcceleratorOption,
    ConfigOption,
    DevicesOption,
    FoldOption,
    ForceOption,
    NumNodesOption,
    SplitsOption,
    StoreOption,
    StrategyOption,
    check_output,
    int_or_str,
    json_object,
    one_line_errors,
)
from ensemblecam.config import section
from ensemblecam.io import fsutil

Opt = typer.Option


@app.command("train")
@one_line_errors
def train_command(
    store: StoreOption = None,
    splits: SplitsOption = None,
    fold: FoldOption = None,
    model: Annotated[
        str | None, Opt("--model", help="resnet18/34/50/101, vgg19, simplecnn, timm:<name>...")
    ] = None,
    model_args: Annotated[
        str | None,
        Opt("--model-args", help='Extra model arguments as JSON, e.g. {"widen_factor": 0.5}.'),
    ] = None,
    preset: Annotated[str | None, Opt("--preset", help="Training recipe: paper or thesis.")] = None,
    out: Annotated[Path | None, Opt("--out", help="Run output folder.")] = None,
    epochs: Annotated[int | None, Opt("--epochs", help="Epochs (overrides preset).")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="Batch size per device.")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Learning rate.")] = None,
    optimizer: Annotated[str | None, Opt("--optimizer", help="sgd, adam or adamw.")] = None,
    augment: Annotated[str | None, Opt("--augment", help="none or blur.")] = None,
    imbalance: Annotated[
        str | None, Opt("--imbalance", help="none, weighted_loss or weighted_sampler.")
    ] = None,
    monitor: Annotated[
        str | None, Opt("--monitor", help="Best-checkpoint metric: auroc, val_loss, f1, accuracy.")
    ] = None,
    val_part: Annotated[
        str | None, Opt("--val-part", help="Split part for validation: val (default) or test.")
    ] = None,
    seed: Annotated[int | None, Opt("--seed", help="Seed of init and data order.")] = None,
    accelerator: AcceleratorOption = None,
    devices: DevicesOption = None,
    num_nodes: NumNodesOption = None,
    strategy: StrategyOption = None,
    precision: Annotated[
        str | None, Opt("--precision", help="32-true, 16-mixed, bf16-mixed, ...")
    ] = None,
    workers: Annotated[int | None, Opt("--workers", help="DataLoader worker processes.")] = None,
    weights: Annotated[
        Path | None, Opt("--weights", help="Local pretrained weights file (nothing downloaded).")
    ] = None,
    resume: Annotated[
        bool, Opt("--resume", help="Continue an interrupted run from its last.pt.")
    ] = False,
    force: ForceOption = False,
    config: ConfigOption = None,
) -> None:
    """Train a slice classifier; writes best.pt, last.pt, metrics.csv, plots and train.json."""
    from ensemblecam.stages.train import train_classifier

    cfg = section(
        config, "train",
        store=store, splits=splits, fold=int_or_str(fold), model=model,
        model_args=json_object(model_args, "--model-args"), preset=preset, out=out, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, augment=augment,
        imbalance=imbalance, monitor=monitor, val_part=val_part, seed=seed,
        accelerator=accelerator, devices=int_or_str(devices), num_nodes=num_nodes,
        strategy=strategy, precision=precision, workers=workers, weights=weights,
        resume=True if resume else None, force=True if force else None,
    )  # fmt: skip
    check_output(cfg.out)
    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.weights]):
        result = train_classifier(cfg)
    if result is not None:
        typer.echo(f"trained {cfg.model} on {cfg.fold}: {result}")
