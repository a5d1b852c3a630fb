"""The ``ensemblecam`` command line: one subcommand per stage, a thin layer over the modules.

Each stage's command lives in ``ensemblecam.cli.<stage>`` and registers itself on
``app``; a stage command's flags are generated from its config section
(``ensemblecam.cli.options``): ``--config FILE.yaml`` and one flag per field that overrides it.
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
    # plain help: wraps at the terminal width (at most 120 columns), no truncated cells
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


def main() -> None:
    """Console-script entry point."""
    app()


# Stage commands register themselves on ``app`` when imported (this order = help order).
STAGES = (
    "synth", "prepare", "train", "cam", "mil", "search", "refine", "export", "report", "run",
    "unet", "score",
)  # fmt: skip
for _stage in STAGES:
    importlib.import_module(f"ensemblecam.cli.{_stage}")
