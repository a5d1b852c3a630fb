"""``ensemblecam search`` and ``ensemblecam evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import (
    ConfigOption,
    FoldOption,
    ForceOption,
    SplitsOption,
    StoreOption,
    check_output,
    one_line_errors,
    split_csv,
)
from ensemblecam.config import section
from ensemblecam.io import fsutil

Opt = typer.Option


@app.command("search")
@one_line_errors
def search_cmd(
    config: ConfigOption = None,
    store: StoreOption = None,
    splits: SplitsOption = None,
    fold: FoldOption = None,
    part: Annotated[str | None, Opt(help="Calibration part: train, val or test.")] = None,
    maps: Annotated[Path | None, Opt(help="Map store root.")] = None,
    members: Annotated[str | None, Opt(help="Members, comma-separated (a__gradcam,...).")] = None,
    operators: Annotated[str | None, Opt(help="and,or,min,max,vote[:k],mean.")] = None,
    grid: Annotated[str | None, Opt(help="Thresholds start:stop:step or a,b,c.")] = None,
    objective: Annotated[str | None, Opt(help="Ranking metric (default paper_miou).")] = None,
    gate: Annotated[bool | None, Opt("--gate/--no-gate", help="Search gating.")] = None,
    gate_grid: Annotated[str | None, Opt(help="Gate probability thresholds.")] = None,
    max_members: Annotated[int | None, Opt(help="Largest member subset.")] = None,
    calibration_cases: Annotated[
        str | None, Opt(help="N annotated cases, 'all', or N1,N2,all for a table.")
    ] = None,
    seed: Annotated[int | None, Opt(help="Seed for the calibration cases.")] = None,
    min_lesion_fraction: Annotated[float | None, Opt(help="Large-lesion slice share.")] = None,
    chunk: Annotated[int | None, Opt(help="Slices per chunk.")] = None,
    top_k: Annotated[int | None, Opt(
        help="Slice/case metrics for the K best rows per operator (0: every row).")] = None,
    out: Annotated[Path | None, Opt(help="Output folder.")] = None,
    force: ForceOption = False,
) -> None:
    """Rank operator x thresholds x member subsets on calibration data (exact).

    Data-set metrics (paper_miou, lesion_dice, ...) are exact for every row of
    ranking.csv. With a data-set objective, slice/case metrics are computed (exactly, in
    a second pass) only for the --top-k best rows of every multi-member operator and for
    every single-member/mean row; elsewhere they are blank. A slice/case objective or
    --top-k 0 computes them for every row.
    """
    from ensemblecam.ensemble.search import run_search_stage

    cfg = section(config, "search", store=store, splits=splits, fold=fold, part=part, maps=maps,
                  members=split_csv(members), operators=split_csv(operators), grid=grid,
                  objective=objective, gate=gate, gate_grid=gate_grid, max_members=max_members,
                  calibration_cases=calibration_cases, seed=seed,
                  min_lesion_fraction=min_lesion_fraction, chunk=chunk, top_k=top_k, out=out)
    check_output(cfg.out)
    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.maps]):
        b = run_search_stage(cfg, force=force)
    typer.echo(f"best: {b['operator']} {'+'.join(b['members'])} thresholds {b['thresholds']} "
               f"gate {b['gate']} {cfg.objective}={b[cfg.objective]:.4f} -> {cfg.out}")


@app.command("evaluate")
@one_line_errors
def evaluate_cmd(
    config: ConfigOption = None,
    config_file: Annotated[Path | None, Opt(help="Chosen configuration (best.json).")] = None,
    store: StoreOption = None,
    splits: SplitsOption = None,
    fold: FoldOption = None,
    part: Annotated[str | None, Opt(help="Evaluated part (default test).")] = None,
    maps: Annotated[Path | None, Opt(help="Map store root.")] = None,
    min_lesion_fraction: Annotated[float | None, Opt(help="Large-lesion slice share.")] = None,
    hd95: Annotated[bool | None, Opt("--hd95/--no-hd95", help="HD95 per case.")] = None,
    out: Annotated[Path | None, Opt(help="Output folder.")] = None,
    force: ForceOption = False,
) -> None:
    """Apply a chosen configuration to held-out data; write every metric convention."""
    from ensemblecam.stages.evaluate import evaluate_stage

    cfg = section(config, "evaluate", config_file=config_file, store=store, splits=splits,
                  fold=fold, part=part, maps=maps, min_lesion_fraction=min_lesion_fraction,
                  hd95=hd95, out=out)
    check_output(cfg.out)
    chosen = fsutil.read_json(cfg.config_file, "configuration")
    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.maps, cfg.config_file]):
        result = evaluate_stage(cfg, chosen, cfg.out, force=force, source=str(cfg.config_file))
    m, e = result["metrics"], result["empty_baseline"]
    typer.echo(f"paper_miou {m['paper_miou']:.4f} (Empty {e['paper_miou']:.4f}), paper_dsc "
               f"{m['paper_dsc']:.4f}, lesion_dice {m['lesion_dice']:.4f}, case_dice "
               f"{m['case_dice_mean']:.4f} -> {cfg.out}")
