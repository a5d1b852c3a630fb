"""``ensemblecam report``: the run's self-contained HTML report plus its PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption, one_line_errors
from ensemblecam.errors import InputError
from ensemblecam.report import write_report


@app.command("report")
@one_line_errors
def report_command(
    run: Annotated[Path, typer.Option("--run", help="Run folder of `ensemblecam run`.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Report file (default <run>/report/report.html)."),
    ] = None,
    cases: Annotated[
        int, typer.Option("--cases", help="Best and worst cases shown in the gallery.")
    ] = 3,
    force: ForceOption = False,
) -> None:
    """Write one self-contained HTML report (figures embedded) and the PNGs beside it."""
    head = b""
    if out is not None and out.is_file():
        with out.open("rb") as fh:
            head = fh.read(400)
    if out is not None and out.is_file() and b"<title>ensemblecam report" not in head:
        raise InputError(
            f"{out}: exists and is not an ensemblecam report; it is never "
            "replaced, not even with --force"
        )
    path = write_report(run, out, force, n_cases=cases)
    typer.echo(f"report: {path}")
