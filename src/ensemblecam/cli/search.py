"""``ensemblecam search`` and ``ensemblecam evaluate``."""

from __future__ import annotations

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption
from ensemblecam.cli.options import config_command
from ensemblecam.config import EvaluateConfig, SearchConfig
from ensemblecam.io import fsutil


@config_command(app, "search")
def search_cmd(cfg: SearchConfig, force: ForceOption = False) -> None:
    """Rank operator x thresholds x member subsets on calibration data (exact).

    Data-set metrics (paper_miou, lesion_dice, ...) are exact for every row of
    ranking.csv. With a data-set objective, slice/case metrics are computed (exactly, in
    a second pass) only for the --top-k best rows of every multi-member operator and for
    every single-member/mean row; elsewhere they are blank. A slice/case objective or
    --top-k 0 computes them for every row. Without masks (or --criterion labels) the
    slice labels alone choose (labels criterion, --fp-budget).
    """
    from ensemblecam.stages.search import run_search_stage

    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.maps]):
        b = run_search_stage(cfg, force=force)
    score = "label_score" if "label_score" in b else cfg.objective
    typer.echo(
        f"best: {b['operator']} {'+'.join(b['members'])} thresholds {b['thresholds']} "
        f"gate {b['gate']} {score}={b[score]:.4f} -> {cfg.out}"
    )


@config_command(app, "evaluate", renames={"config_file": "--best"})
def evaluate_cmd(cfg: EvaluateConfig, force: ForceOption = False) -> None:
    """Apply a chosen configuration to held-out data; write every metric convention."""
    from ensemblecam.stages.evaluate import evaluate_stage

    with fsutil.output_guard(cfg.out, [cfg.store, cfg.splits, cfg.maps, cfg.config_file]):
        chosen = fsutil.read_json(cfg.config_file, "configuration")
        result = evaluate_stage(cfg, chosen, cfg.out, force=force, source=str(cfg.config_file))
    m, e = result["metrics"], result["empty_baseline"]
    typer.echo(
        f"paper_miou {m['paper_miou']:.4f} (Empty {e['paper_miou']:.4f}), paper_dsc "
        f"{m['paper_dsc']:.4f}, lesion_dice {m['lesion_dice']:.4f}, case_dice "
        f"{m['case_dice_mean']:.4f} -> {cfg.out}"
    )
