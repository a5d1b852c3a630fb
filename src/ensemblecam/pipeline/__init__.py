"""``ensemblecam run`` and ``ensemblecam predict``: the whole protocol from one config.

- :mod:`ensemblecam.pipeline.run`: the stages of a run, cached by key, resumable, per fold
  (:func:`run_pipeline`, :class:`Runner`, the stage keys :func:`stable_hash`,
  :func:`config_hash`);
- :mod:`ensemblecam.pipeline.results`: the result rows, their aggregate over folds and the
  files made from it (results.json, results.csv, results.md, the demo's table);
- :mod:`ensemblecam.pipeline.predict`: masks for new scans with a finished run.

The run folder's layout: :class:`ensemblecam.io.runlayout.RunLayout`.
"""

from ensemblecam.pipeline.predict import predict
from ensemblecam.pipeline.results import (
    SUMMARY_METRICS,
    TABLE_METRICS,
    aggregate,
    demo_markdown,
    result_rows,
    results_csv,
    results_markdown,
    summary_rows,
)
from ensemblecam.pipeline.run import (
    Runner,
    check_run_config,
    config_hash,
    load_run_config,
    run_pipeline,
    stable_hash,
)

__all__ = [
    "SUMMARY_METRICS",
    "TABLE_METRICS",
    "Runner",
    "aggregate",
    "check_run_config",
    "config_hash",
    "demo_markdown",
    "load_run_config",
    "predict",
    "result_rows",
    "results_csv",
    "results_markdown",
    "run_pipeline",
    "stable_hash",
    "summary_rows",
]
