"""The ``ensemblecam`` command line: one subcommand per stage, a thin layer over the modules.

Each stage's command lives in ``ensemblecam.cli.<stage>`` and registers itself on
``app``; every command accepts ``--config FILE.yaml`` and flags that override it.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="ensemblecam",
    help="Weakly supervised lesion segmentation from image-level labels (ensembles of CAMs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point."""
    app()


# Stage commands register themselves on ``app`` when imported (this order = help order).
STAGES = ("synth", "prepare", "train", "cam", "search", "export", "report", "run", "unet",
          "score")
for _stage in STAGES:
    importlib.import_module(f"ensemblecam.cli.{_stage}")
