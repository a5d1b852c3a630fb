"""``ensemblecam report``: one self-contained HTML report of a run folder, plus its PNGs.

Input: a run folder of ``ensemblecam run`` (layout: :mod:`ensemblecam.io.runlayout`;
``results.json`` format: :mod:`ensemblecam.pipeline.results`). Output:
``<run>/report/report.html`` (every figure embedded as a base64 ``data:image/png`` URI and
linked to its full-size PNG beside the report, inline CSS, no script, nothing fetched) and
those PNG files. The HTML is written last and atomically; an existing report is replaced
only with ``force``.

Sections, in order (:data:`~ensemblecam.report.sections.SECTIONS`): Summary (what was run;
chosen ensemble vs Empty vs U-Net in the summary metrics, mean +- std; every row not
better than Empty, per metric; where the run's folders are), Results (headline table with
published figures, bar chart from 0, per-fold configurations, every metric convention in
two tables, per-fold objective; then per-case 3-D metrics with 95% CIs, paired Wilcoxon
tests against the chosen configuration, per-case box/strip plots and every case of the
chosen row, all read from results.json and the per-case CSVs it names), Thresholds,
Gallery, Classifiers (model x fold table; figures one row per model, folds side by side),
Data, Configuration (config.yaml collapsed, run.json facts and one timings table).

Modules: :mod:`~ensemblecam.report.run` reads the run folder (through
:class:`ensemblecam.io.runlayout.RunLayout`), :mod:`~ensemblecam.report.sections`,
:mod:`~ensemblecam.report.results` and :mod:`~ensemblecam.report.gallery` write the
sections (:mod:`~ensemblecam.report.text` formats their numbers),
:mod:`~ensemblecam.report.figures` draws the PNGs, :mod:`~ensemblecam.report.reference`
holds the papers' published figures and :mod:`~ensemblecam.report.html` assembles the page.

The report reads stage outputs only and never recomputes a result: numbers come from
results.json, metrics.json and the per-case CSVs; learning curves and confusion matrices
are the PNGs the train stage wrote (a missing one is named in the report, not redrawn);
the gallery ranks cases by the chosen row's ``eval/ensemble/per_case.csv`` and shows the
chosen masks of ``eval/masks.npz``.
"""

from __future__ import annotations

from pathlib import Path

from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.report.gallery import section_gallery
from ensemblecam.report.html import Page, document
from ensemblecam.report.results import (
    section_case_statistics,
    section_heatmaps,
    section_results,
)
from ensemblecam.report.run import fold_names, open_run
from ensemblecam.report.sections import (
    SECTIONS,
    section_classifiers,
    section_config,
    section_data,
    section_summary,
)

__all__ = ["write_report"]


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    force: bool = False,
    n_cases: int = 3,
) -> Path:
    """Write the run's HTML report (default ``<run>/report/report.html``) and its PNGs.

    The PNGs go beside the HTML; the HTML is written last and atomically. An existing
    report is an InputError unless ``force``. ``n_cases``: best and worst gallery cases.
    """
    run = open_run(run_dir)
    target = Path(out) if out is not None else run.layout.report
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give the report's file name")
    if target.exists() and not force:
        raise InputError(f"{target}: report exists; use --force to replace it")
    if n_cases < 1:
        raise InputError(f"gallery cases {n_cases}: must be >= 1")
    target.parent.mkdir(parents=True, exist_ok=True)
    folds = fold_names(run)
    page = Page(target.parent)
    section_summary(page, run, folds)
    section_results(page, run, folds)
    section_case_statistics(page, run)
    section_heatmaps(page, run, folds)
    section_gallery(page, run, folds, n_cases)
    section_classifiers(page, run, folds)
    section_data(page, run)
    section_config(page, run)
    fsutil.write_text(
        target, document(f"ensemblecam report: {run.path.resolve().name}", SECTIONS, page.parts)
    )
    return target
