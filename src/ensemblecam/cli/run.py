"""``ensemblecam run``, ``predict`` and ``demo``: the whole pipeline from one config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption, ProgressOption, one_line_errors
from ensemblecam.cli.options import config_command
from ensemblecam.config import RunConfig, load_config
from ensemblecam.errors import InputError

Opt = typer.Option


def results_table(results: dict, title: str) -> Table:
    """The summary table (mean ± std over folds, in %) as a rich Table."""
    from ensemblecam.pipeline import summary_rows

    header, rows = summary_rows(results)
    table = Table(title=title)
    table.add_column(header[0])
    for m in header[1:]:
        table.add_column(m, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


@config_command(app, "run")
def run_cmd(
    cfg: RunConfig,
    config: Annotated[
        Path,
        typer.Argument(
            help="YAML config (sections: prepare, split, train, "
            "cam, search, evaluate, unet, run); the flags "
            "below override its 'run:' section."
        ),
    ],
    data: Annotated[Path | None, Opt("--data", help="Data root (overrides prepare.data).")] = None,
    force: Annotated[
        bool,
        Opt(
            "--force",
            help="Accept a run folder made by another config; "
            "only the stages whose options changed are rerun.",
        ),
    ] = False,
) -> None:
    """Every stage of the protocol for every fold: cached, resumable, one results table."""
    from ensemblecam.pipeline import run_pipeline

    full = load_config(config)
    full.run = cfg
    if data is not None:
        full.prepare.data = data
    root = run_pipeline(full, force=force)
    _summary(root)


def _summary(root: Path) -> None:
    from ensemblecam.io import fsutil

    results = fsutil.read_json(root / "results.json", "results")
    console = Console(width=max(Console().width, 110))
    console.print(results_table(results, f"{root} ({len(results['folds'])} folds)"))
    report = root / "report" / "report.html"
    if report.is_file():
        console.print(f"report: {report.resolve()}")


@app.command("predict")
@one_line_errors
def predict_cmd(
    run: Annotated[Path, Opt("--run", help="Finished run folder.")],
    input: Annotated[Path, Opt("--input", help="Folder of new scans (the run's layout).")],
    out: Annotated[Path, Opt("--out", help="Output folder for the NIfTI masks.")],
    layout: Annotated[
        str | None, Opt("--layout", help="Layout of --input (default: the run's).")
    ] = None,
    fold: Annotated[
        str | None,
        Opt(
            "--fold",
            help="Use only this fold's models and configuration (default: every fold's, "
            "see --all-folds).",
        ),
    ] = None,
    all_folds: Annotated[
        bool,
        Opt(
            "--all-folds/--best-fold",
            help="Combine the models of every fold (self_trained: mean lesion probability "
            "> 0.5; ensemble: strict majority of the folds' masks), or use only the fold "
            "that scored best on its calibration data. [default: all folds]",
            show_default=False,
        ),
    ] = True,
    method: Annotated[
        str | None,
        Opt(
            "--method",
            help="self_trained (the U-Net self-trained on the ensemble's masks, of the round "
            "results.json final names, else the last) or ensemble (default: the run's final "
            "method, results.json final).",
        ),
    ] = None,
    probabilities: Annotated[
        bool,
        Opt(
            "--probabilities",
            help="Also write <case>_prob.nii.gz beside each mask: float32 lesion probability "
            "in [0, 1] (self_trained) or fraction of folds marking the voxel (ensemble).",
        ),
    ] = False,
    gate: Annotated[
        str | None,
        Opt(
            "--gate",
            help="none or classifiers: empty the self-trained U-Net's mask on every slice "
            "the run's classifiers call lesion-free (mean P(lesion) below the fold's gate "
            "threshold: run.gate_threshold, or the one the run calibrated when auto) "
            "(default: the run's run.gate).",
        ),
    ] = None,
    force: ForceOption = False,
    progress: ProgressOption = "auto",
) -> None:
    """Masks for new, unlabelled scans with a run's final method (self-trained U-Net or
    the chosen ensemble configuration), by default combining the models of every fold."""
    from ensemblecam import progress as progress_out
    from ensemblecam.pipeline import predict

    with progress_out.configure(progress_out.check_mode(progress)):
        path = predict(
            run, input, out, layout=layout, fold=fold, force=force, method=method,
            all_folds=all_folds, probabilities=probabilities, gate=gate,
        )  # fmt: skip
        progress_out.info(f"masks written to {path}")


@app.command("demo")
@one_line_errors
def demo_cmd(
    out: Annotated[Path, Opt("--out", help="Demo folder (phantom data + run).")] = Path(
        "ensemblecam-demo"
    ),
    config: Annotated[
        Path | None,
        Opt("--config", "-c", help="Run config (default: the packaged configs/demo.yaml)."),
    ] = None,
    force: ForceOption = False,
    progress: ProgressOption = "auto",
) -> None:
    """Phantom data -> full run (train, CAMs, search, evaluate, U-Net) -> HTML report."""
    from ensemblecam import progress as progress_out

    with progress_out.configure(progress_out.check_mode(progress)):
        _demo(out, config, force)


def _demo(out: Path, config: Path | None, force: bool) -> None:
    """:func:`demo_cmd` in its progress mode."""
    from importlib.resources import files

    from ensemblecam.io import fsutil
    from ensemblecam.pipeline import demo_markdown, run_pipeline
    from ensemblecam.synth import same_phantom, synth_dataset

    path = (
        config if config is not None else Path(str(files("ensemblecam") / "configs" / "demo.yaml"))
    )
    cfg = load_config(path)
    phantom = out / "phantom"
    cfg.synth.out = phantom
    if not same_phantom(cfg.synth):
        synth_dataset(cfg.synth, force=True)
    cfg.prepare.data = phantom
    cfg.run.out = out / "run"
    root = run_pipeline(cfg, force=force)
    _summary(root)
    results = fsutil.read_json(root / "results.json", "results")
    record = fsutil.read_json(root / "run.json", "run record")
    fsutil.write_text(root / "demo.md", demo_markdown(results, record))
    rows = {r["kind"]: r for r in results["rows"]}
    best = rows["ensemble"]["mean"]["paper_miou"]
    empty = rows["empty"]["mean"]["paper_miou"]
    unet = rows.get("unet", {}).get("mean", {}).get("paper_miou")
    verdict = "above" if best > empty else "NOT above"
    msg = f"ensemble paper_miou {100 * best:.1f} is {verdict} the Empty baseline {100 * empty:.1f}"
    if unet is not None:
        msg += f"; supervised U-Net {100 * unet:.1f}"
    typer.echo(msg)
    if best <= empty:
        raise InputError("demo: the ensemble did not beat the Empty baseline")
